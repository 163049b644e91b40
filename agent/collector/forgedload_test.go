package collector_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	"github.com/nodeprefetch/image-prefetcher/agent/collector/collectortest"
	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

// TestHeapUnderForgedLoad measures the collector's heap under forged
// results sent without any token: four of 60 MiB each, then 500 of 100 KiB
// from one node, then 100000 ordinary ones from 50 nodes, and what one
// GET /metrics allocates. The senders run in child processes (this test
// binary again), so the heap measured is the collector's alone. It uses only
// the API the collector had before it authenticated its callers, so the same
// file measures the old code too (see docs/collector.md). Figures are
// logged; the assertions are on what was accepted and served, not on the
// heap.
//
//	COLLECTOR_HEAP_REPORT=1 go test -count=1 -run TestHeapUnderForgedLoad -v ./agent/collector/
func TestHeapUnderForgedLoad(t *testing.T) {
	t.Parallel()
	if addr := os.Getenv("COLLECTOR_HEAP_CLIENT"); addr != "" {
		forge(t, addr, os.Getenv("COLLECTOR_HEAP_PHASE"))
		return
	}
	if os.Getenv("COLLECTOR_HEAP_REPORT") == "" {
		t.Skip("a measurement: set COLLECTOR_HEAP_REPORT=1")
	}
	store := collector.NewStore(0) // the command's default bounds
	srv := collectortest.Start(t, collector.New(store, nil), "127.0.0.1:0")
	send := func(phase string) string {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHeapUnderForgedLoad$", "-test.v")
		cmd.Env = append(os.Environ(), "COLLECTOR_HEAP_CLIENT="+srv.GRPC, "COLLECTOR_HEAP_PHASE="+phase)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("forging client %s: %v\n%s", phase, err, out)
		}
		_, accepted, _ := strings.Cut(string(out), "accepted=")
		accepted, _, _ = strings.Cut(accepted, "\n")
		return accepted
	}
	heap := func() int64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return int64(m.HeapAlloc)
	}
	const mib = 1 << 20
	base := heap()
	huge := send("huge")
	t.Logf("4 forged results of 60 MiB: %s accepted; heap %+.1f MiB", huge, float64(heap()-base)/mib)
	big := send("big")
	t.Logf("500 forged results of 100 KiB from one node: %s accepted; heap %+.1f MiB since the start", big, float64(heap()-base)/mib)
	send("ordinary")
	t.Logf("then 100000 ordinary results from 50 nodes: %d held; heap %+.1f MiB since the start", store.Len(), float64(heap()-base)/mib)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	resp, err := http.Get(srv.HTTP + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	n, _ := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	runtime.ReadMemStats(&after)
	t.Logf("one GET /metrics: %.1f MiB of JSON, %.1f MiB allocated", float64(n)/mib, float64(after.TotalAlloc-before.TotalAlloc)/mib)

	if huge != "0" {
		t.Errorf("%s results of 60 MiB were accepted", huge)
	}
	if n > 8*mib {
		t.Errorf("one GET /metrics served %d bytes", n)
	}
}

// forge is the child process of TestHeapUnderForgedLoad: it sends one
// phase's results to addr and prints how many were accepted.
func forge(t *testing.T, addr, phase string) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(1<<30)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := resultsv1.NewResultsClient(conn)
	accepted := 0
	send := func(results ...*resultsv1.Result) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := client.Submit(ctx, &resultsv1.SubmitRequest{Results: results}); err == nil {
			accepted += len(results)
		}
	}
	switch phase {
	case "huge":
		for i := range 4 {
			send(&resultsv1.Result{AttemptId: fmt.Sprint("huge-", i), Node: "forged", Image: strings.Repeat("x", 60<<20)})
		}
	case "big":
		for i := range 125 {
			var batch []*resultsv1.Result
			for j := range 4 {
				batch = append(batch, &resultsv1.Result{AttemptId: fmt.Sprint("big-", i, "-", j), Node: "forged", Image: strings.Repeat("y", 100<<10)})
			}
			send(batch...)
		}
	case "ordinary":
		for i := range 1000 {
			var batch []*resultsv1.Result
			for j := range 100 {
				n := i*100 + j
				batch = append(batch, &resultsv1.Result{AttemptId: fmt.Sprintf("%08d-0000-4000-8000-000000000000", n),
					Node: fmt.Sprint("node-", n%50), Image: fmt.Sprintf("registry.example/team/app-%d:1.%d", n%300, n),
					ImageRef: "sha256:" + strings.Repeat("ab", 32), StartedAt: 1700000000, DurationMs: uint64(n),
					Outcome: resultsv1.Outcome_OUTCOME_SUCCEEDED, SizeBytes: 31457280})
			}
			send(batch...)
		}
	}
	fmt.Printf("accepted=%d\n", accepted)
}
