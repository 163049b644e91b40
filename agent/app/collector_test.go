package app

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	"github.com/nodeprefetch/image-prefetcher/agent/collector/collectortest"
	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/health"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

const flaky = "registry.test/app/flaky:1"

// startCollector serves a collector on loopback until the test ends.
func startCollector(t *testing.T) (*collector.Store, string) {
	t.Helper()
	store := collector.NewStore(0)
	return store, collectortest.Start(t, collector.New(store, nil), "127.0.0.1:0").GRPC
}

// TestFetchSendsEveryAttemptToTheCollector runs the fetch command against the
// fake runtime with one image that cannot be pulled and one that fails once:
// when fetch returns, the collector holds each of its attempts once, failed
// ones included, under the node's name.
func TestFetchSendsEveryAttemptToTheCollector(t *testing.T) {
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 10})
	cri.OnPull(missing, critest.NotFound(missing))
	cri.OnPull(flaky, critest.Fail(codes.Unavailable, "connection reset by peer"), critest.Succeed())
	list := writeList(t, present, pullable, missing, flaky)
	store, addr := startCollector(t)

	var stdout, stderr bytes.Buffer
	code := Main([]string{"fetch",
		"--cri-socket=" + cri.Path(), "--image-list-file=" + list, "--label=false",
		"--node-name=" + testNode, "--instance=" + testInstance,
		"--initial-pull-attempt-delay=10ms", "--max-pull-attempt-delay=50ms",
		"--initial-pull-attempt-timeout=2s", "--overall-timeout=30s",
		"--metrics-endpoint=" + addr, // the reference tool's name for --collector-address
	}, &stdout, &stderr)
	if code != ExitFailed {
		t.Fatalf("fetch exit code = %d, want %d (an image is missing)\n%s", code, ExitFailed, stderr.String())
	}

	type key struct {
		image   string
		attempt uint32
	}
	got := map[key]int{}
	for _, r := range store.List(collector.Filter{}) {
		got[key{r.GetImage(), r.GetAttempt()}]++
		if r.GetNode() != testNode || r.GetInstance() != testInstance {
			t.Errorf("result of %s from node %q instance %q, want %q, %q", r.GetImage(), r.GetNode(), r.GetInstance(), testNode, testInstance)
		}
		switch {
		case r.GetImage() == missing:
			if r.GetError() == "" || r.GetReason() != string(pull.ReasonNotFound) {
				t.Errorf("missing image's attempt = %v, want its NotFound error", r)
			}
		case r.GetImage() == flaky && r.GetAttempt() == 1:
			if r.GetError() == "" || r.GetReason() != string(pull.ReasonUnavailable) {
				t.Errorf("flaky image's first attempt = %v, want its Unavailable error", r)
			}
		default:
			if r.GetError() != "" || r.GetImageRef() == "" || r.GetSizeBytes() == 0 {
				t.Errorf("successful attempt = %v, want an image ref and a size", r)
			}
		}
	}
	want := map[key]int{{pullable, 1}: 1, {missing, 1}: 1, {flaky, 1}: 1, {flaky, 2}: 1}
	if len(got) != len(want) {
		t.Errorf("collector holds %v, want %v", got, want)
	}
	for k, n := range want {
		if got[k] != n {
			t.Errorf("%s attempt %d held %d times, want %d (all: %v)", k.image, k.attempt, got[k], n, got)
		}
	}
	// Every PullImage call was reported: the fake counts them too.
	if calls := cri.PullCalls(pullable) + cri.PullCalls(missing) + cri.PullCalls(flaky); calls != store.Len() {
		t.Errorf("PullImage calls = %d, collector holds %d", calls, store.Len())
	}
	if !strings.Contains(stderr.String(), "results collector flushed") {
		t.Errorf("no flush logged:\n%s", stderr.String())
	}
}

// TestFetchWithoutCollectorStillFinishes: an unreachable collector costs at
// most the flush timeout and does not change the exit code.
func TestFetchWithUnreachableCollectorFinishes(t *testing.T) {
	cri := critest.Start(t)
	list := writeList(t, pullable)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	var stdout, stderr bytes.Buffer
	code := Main([]string{"fetch", "--cri-socket=" + cri.Path(), "--image-list-file=" + list, "--label=false",
		"--node-name=" + testNode, "--collector-address=" + addr, "--collector-flush-timeout=300ms"}, &stdout, &stderr)
	if code != ExitOK {
		t.Fatalf("fetch exit code = %d, want 0\n%s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "1 attempts not delivered") {
		t.Errorf("undelivered attempt not logged:\n%s", stderr.String())
	}
}

func TestCollectorFlagsAreChecked(t *testing.T) {
	for _, args := range [][]string{
		{"fetch", "--label=false", "--collector-address=no-port"},
		{"fetch", "--label=false", "--collector-address=h:1", "--collector-flush-timeout=0s"},
		{"collect", "--agent-service-account=ns/sa", "--max-results=0"},
		{"aggregate-metrics", "--agent-service-account=ns/sa", "extra"},
		// Nobody may write to a collector that does not say whose agents it serves.
		{"collect"},
		{"collect", "--agent-service-account=system:serviceaccount:ns:sa"},
		{"collect", "--agent-service-account=ns/sa", "--max-bytes=0"},
		{"collect", "--agent-service-account=ns/sa", "--max-node-bytes=lots"},
		{"collect", "--agent-service-account=ns/sa", "--token-audience="},
	} {
		if code := Main(args, io.Discard, io.Discard); code != ExitUsage {
			t.Errorf("%v: exit code %d, want %d", args, code, ExitUsage)
		}
	}
}

// TestAgentPrometheusMetricsAfterAPass scrapes the agent's /metrics (the
// handler `run` serves) after a pass over the fake runtime.
func TestAgentPrometheusMetricsAfterAPass(t *testing.T) {
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 10})
	cri.OnPull(missing, critest.NotFound(missing))
	cri.OnPull(flaky, critest.Fail(codes.Unavailable, "connection reset by peer"), critest.Succeed())
	list := writeList(t, present, pullable, missing, flaky)
	p, _, _ := newTestPrefetcher(t, testOptions(cri.Path(), list))
	if _, err := p.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer((&health.Server{Gatherer: p.metrics.Registry(), Ready: p.readiness.Check}).Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	body := string(b)
	for _, want := range []string{
		`image_prefetcher_pull_attempts_total{outcome="success",reason=""} 2`,
		`image_prefetcher_pull_attempts_total{outcome="failure",reason="NotFound"} 1`,
		`image_prefetcher_pull_attempts_total{outcome="failure",reason="Unavailable"} 1`,
		`image_prefetcher_image_failures_total{reason="NotFound"} 1`,
		`image_prefetcher_image_duration_seconds_count{outcome="pulled"} 2`,
		`image_prefetcher_image_duration_seconds_count{outcome="present"} 1`,
		`image_prefetcher_image_duration_seconds_count{outcome="failed"} 1`,
		`image_prefetcher_pulled_bytes_total 2.097152e+06`,
		`image_prefetcher_images_present 3`,
		`image_prefetcher_images_missing 1`,
		`image_prefetcher_node_label_state{state="failed"} 1`,
		`image_prefetcher_passes_total{result="failed"} 1`,
		`image_prefetcher_last_pass_timestamp_seconds `,
		`image_prefetcher_last_pass_duration_seconds `,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", body)
	}
}
