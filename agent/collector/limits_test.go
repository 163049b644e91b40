package collector_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	"github.com/nodeprefetch/image-prefetcher/agent/collector/collectortest"
	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

// A message over MaxMessageBytes is refused before the collector decodes
// it, with or without a token; one just under it is taken.
func TestOversizedMessageIsRefused(t *testing.T) {
	t.Parallel()
	store := collector.NewStore(0)
	srv := collectortest.Start(t, collector.New(store, nil), "127.0.0.1:0")
	big := record("big", "node-a")
	big.Error = strings.Repeat("e", collector.MaxMessageBytes)
	if got := submit(t, srv.GRPC, "", big); got != codes.ResourceExhausted {
		t.Errorf("a %d-byte message: Submit = %s, want ResourceExhausted", collector.MaxMessageBytes, got)
	}
	fits := record("fits", "node-a")
	fits.Error = strings.Repeat("e", collector.MaxMessageBytes-1024)
	if got := submit(t, srv.GRPC, "", fits); got != codes.OK {
		t.Errorf("a message under the limit: Submit = %s, want OK", got)
	}
	if store.Has("big") || !store.Has("fits") {
		t.Error("the oversized result was stored or the one under the limit was not")
	}
}

// GET /metrics serves pages: a reader that follows X-Continue gets every
// result once; a bad limit or token is a 400.
func TestMetricsArePaginated(t *testing.T) {
	t.Parallel()
	store := collector.NewStore(0)
	srv := collectortest.Start(t, collector.New(store, nil), "127.0.0.1:0")
	const n = collector.DefaultPageSize + 234
	for i := range n {
		store.Add([]*resultsv1.Result{record(fmt.Sprint("id-", i), "node-a")})
	}

	var first []collector.JSONResult
	resp := getPage(t, srv.HTTP+"/metrics", &first)
	if len(first) != collector.DefaultPageSize || resp.Get(collector.ContinueHeader) == "" {
		t.Fatalf("first page: %d results, continue %q; want %d and a token", len(first), resp.Get(collector.ContinueHeader), collector.DefaultPageSize)
	}

	seen := map[string]bool{}
	url := srv.HTTP + "/metrics?limit=100&node=node-a"
	pages := 0
	for {
		var page []collector.JSONResult
		h := getPage(t, url, &page)
		pages++
		for _, r := range page {
			if seen[r.AttemptID] {
				t.Fatalf("%s served twice", r.AttemptID)
			}
			seen[r.AttemptID] = true
		}
		next := h.Get(collector.ContinueHeader)
		if next == "" {
			break
		}
		url = srv.HTTP + "/metrics?limit=100&node=node-a&continue=" + next
	}
	if len(seen) != n || pages != (n+99)/100 {
		t.Errorf("pages of 100 gave %d results in %d pages, want %d in %d", len(seen), pages, n, (n+99)/100)
	}

	for _, q := range []string{"limit=0", fmt.Sprintf("limit=%d", collector.MaxPageSize+1), "limit=x", "continue=abc"} {
		resp, err := http.Get(srv.HTTP + "/metrics?" + q)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("/metrics?%s = %d, want 400", q, resp.StatusCode)
		}
	}
}

func getPage(t *testing.T, url string, v any) http.Header {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.Header
}
