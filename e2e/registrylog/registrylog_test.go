package registrylog

import (
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	log := `time="2026-12-04T16:34:00Z" level=warning msg="something the registry says"
10.89.0.12 - - [04/Dec/2026:16:34:00 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "cri-o/1.35.2"
10.89.0.12 - - [04/Dec/2026:16:34:01 +0000] "HEAD /v2/e2e/random/manifests/4mib HTTP/1.1" 200 - "" "containerd/v2.2.1"
10.89.0.13 - - [04/Dec/2026:16:34:02 +0000] "GET /v2/e2e/random/blobs/sha256:949a HTTP/1.1" 200 4194304 "" "containerd/1.6.20"
10.89.0.1 - - [04/Dec/2026:16:34:03 +0000] "GET /v2/library/a/b/manifests/sha256:1 HTTP/1.1" 404 19 "" "x"
`
	got, err := Parse(strings.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 {
		t.Fatalf("%d entries, want 4 (the registry's own message skipped): %+v", len(got), got)
	}
	e := got[2]
	if e.Addr != "10.89.0.13" || e.Method != "GET" || e.Status != 200 || e.Bytes != 4194304 ||
		!e.At.Equal(time.Date(2026, 12, 4, 16, 34, 2, 0, time.UTC)) || e.Repository() != "e2e/random" {
		t.Errorf("entry %+v (repository %q)", e, e.Repository())
	}
	if got[1].Bytes != 0 || got[1].Repository() != "e2e/random" {
		t.Errorf("a HEAD with '-' bytes: %+v", got[1])
	}
	if got[0].Repository() != "" || got[3].Repository() != "library/a/b" || got[3].Status != 404 {
		t.Errorf("ping %q, nested repository %q status %d", got[0].Repository(), got[3].Repository(), got[3].Status)
	}
}

func TestParseNamesTheLineOfABadTime(t *testing.T) {
	_, err := Parse(strings.NewReader("\n10.0.0.1 - - [99/Foo/2026:16:34:00 +0000] \"GET /v2/ HTTP/1.1\" 200 2\n"))
	if err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Errorf("error %v, want one naming line 2", err)
	}
}
