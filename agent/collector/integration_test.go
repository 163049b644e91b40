package collector_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	"github.com/nodeprefetch/image-prefetcher/agent/collector/collectortest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	"github.com/nodeprefetch/image-prefetcher/agent/sender"
)

func get(t *testing.T, url string, v any) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v\n%s", url, resp.StatusCode, err, b)
	}
	if v != nil {
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatalf("GET %s: %v\n%s", url, err, b)
		}
	}
	return string(b)
}

// TestEveryAttemptArrivesOnceAcrossARestart sends 1000 attempts (every
// fifth failed) from 20 concurrent senders; the collector is stopped after
// the first half arrived and started again while the second half is queued.
// The store outlives the restart, as the collector's memory outlives a
// network outage; dedupe by attempt id is what keeps a batch whose
// acknowledgement was lost from counting twice.
func TestEveryAttemptArrivesOnceAcrossARestart(t *testing.T) {
	t.Parallel()
	const senders, perSender = 20, 50
	store := collector.NewStore(0)
	c := collector.New(store, nil)
	srv := collectortest.Start(t, c, "127.0.0.1:0")
	addr := srv.GRPC

	ss := make([]*sender.Sender, senders)
	for i := range ss {
		s, err := sender.New(sender.Config{Address: addr, Node: fmt.Sprintf("node-%02d", i), Instance: "inst",
			BatchSize: 7, InitialBackoff: 5 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		ss[i] = s
	}
	attempt := func(j int) pull.Attempt {
		a := pull.Attempt{Image: fmt.Sprintf("registry.test/img-%02d:1", j), Number: 1, Start: time.Now(),
			Duration: time.Duration(j) * time.Millisecond, Size: uint64(1000 + j), ImageRef: "sha256:x"}
		if j%5 == 0 {
			a.Err, a.Reason, a.Size, a.ImageRef = errors.New("pull failed: 404"), pull.ReasonNotFound, 0, ""
		}
		return a
	}
	send := func(from, to int) {
		var wg sync.WaitGroup
		for _, s := range ss {
			wg.Go(func() {
				for j := from; j < to; j++ {
					s.AttemptFinished(attempt(j))
				}
			})
		}
		wg.Wait()
	}

	send(0, perSender/2)
	for store.Len() < senders*perSender/4 {
		time.Sleep(time.Millisecond)
	}
	srv.Stop(t)
	send(perSender/2, perSender)
	// The senders meet the closed port and back off before the collector is back.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		var failures uint64
		for _, s := range ss {
			failures += s.Stats().Failures
		}
		if failures > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no sender met the stopped collector")
		}
	}
	srv = collectortest.Start(t, c, addr)

	var wg sync.WaitGroup
	var failures sync.Map
	for i, s := range ss {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			if err := s.Close(ctx); err != nil {
				t.Errorf("close sender: %v", err)
			}
			if st := s.Stats(); st.Dropped != 0 || st.Delivered != perSender {
				t.Errorf("sender stats %+v, want %d delivered, none dropped", st, perSender)
			}
			failures.Store(i, s.Stats().Failures)
		})
	}
	wg.Wait()
	var sendFailures uint64
	failures.Range(func(_, v any) bool { sendFailures += v.(uint64); return true })
	if sendFailures == 0 {
		t.Error("no Submit call failed: the restart did not happen while results were queued")
	}

	var got []collector.JSONResult
	get(t, srv.HTTP+"/metrics", &got)
	seen := map[string]int{}
	ids := map[string]bool{}
	failed := 0
	for _, r := range got {
		seen[r.Node+" "+r.Image]++
		ids[r.AttemptID] = true
		if r.Outcome == collector.OutcomeFailed {
			failed++
			if r.Error == "" || r.Reason != "NotFound" || r.SizeBytes != 0 {
				t.Errorf("failed attempt without its error: %+v", r)
			}
		}
	}
	if len(got) != senders*perSender || len(seen) != senders*perSender || len(ids) != senders*perSender {
		t.Fatalf("collector holds %d results (%d distinct node/image pairs, %d ids), want %d each",
			len(got), len(seen), len(ids), senders*perSender)
	}
	for k, n := range seen {
		if n != 1 {
			t.Errorf("%s held %d times", k, n)
		}
	}
	if failed != senders*perSender/5 {
		t.Errorf("failed attempts = %d, want %d", failed, senders*perSender/5)
	}
}

func TestHTTPEndpoints(t *testing.T) {
	t.Parallel()
	store := collector.NewStore(2)
	c := collector.New(store, nil)
	srv := collectortest.Start(t, c, "127.0.0.1:0")
	s, err := sender.New(sender.Config{Address: srv.GRPC, Node: "node-a", Instance: "inst"})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Unix(1700000000, 5)
	s.AttemptFinished(pull.Attempt{Image: "img:1", Number: 1, Start: start, Duration: 2 * time.Second, Size: 7, ImageRef: "sha256:1"})
	s.AttemptFinished(pull.Attempt{Image: "img:2", Number: 1, Start: start, Duration: time.Second, Err: errors.New("denied"), Reason: pull.ReasonUnauthorized})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}

	// The reference tool's fields, under its names and types.
	var raw []map[string]any
	body := get(t, srv.HTTP+"/metrics", &raw)
	if len(raw) != 2 {
		t.Fatalf("GET /metrics = %s", body)
	}
	ok, bad := raw[0], raw[1]
	for _, k := range []string{"attempt_id", "started_at", "image", "duration_ms", "node", "size_bytes"} {
		if _, has := ok[k]; !has {
			t.Errorf("result lacks %q: %v", k, ok)
		}
	}
	if _, has := ok["error"]; has {
		t.Errorf("successful result has an error field: %v", ok)
	}
	if ok["started_at"] != float64(1700000000) || ok["duration_ms"] != float64(2000) || ok["node"] != "node-a" ||
		ok["size_bytes"] != float64(7) || ok["image"] != "img:1" {
		t.Errorf("successful result = %v", ok)
	}
	if bad["error"] != "denied" || bad["reason"] != "Unauthorized" || bad["outcome"] != "failed" {
		t.Errorf("failed result = %v", bad)
	}
	var filtered []collector.JSONResult
	get(t, srv.HTTP+"/metrics?image=img:2&node=node-a&instance=inst", &filtered)
	if len(filtered) != 1 || filtered[0].Image != "img:2" {
		t.Errorf("filtered = %+v", filtered)
	}
	get(t, srv.HTTP+"/metrics?node=other", &filtered)
	if len(filtered) != 0 {
		t.Errorf("node=other = %+v", filtered)
	}
	var sum collector.Summaries
	get(t, srv.HTTP+"/summary", &sum)
	if n := sum.Nodes["node-a"]; n.Attempts != 2 || n.Failures != 1 || n.MaxDurationMs != 2000 || n.Bytes != 7 {
		t.Errorf("summary node-a = %+v", n)
	}
	if len(sum.Images) != 2 {
		t.Errorf("summary images = %+v", sum.Images)
	}

	// Over the cap of 2, the oldest goes and is counted.
	s2, err := sender.New(sender.Config{Address: srv.GRPC, Node: "node-b"})
	if err != nil {
		t.Fatal(err)
	}
	s2.AttemptFinished(pull.Attempt{Image: "img:3", Number: 1, Start: start})
	if err := s2.Close(ctx); err != nil {
		t.Fatal(err)
	}
	prom := get(t, srv.HTTP+"/prometheus", nil)
	for _, want := range []string{
		"image_prefetcher_collector_results_received_total 3",
		`image_prefetcher_collector_results_dropped_total{reason="evicted"} 1`,
		"image_prefetcher_collector_results_stored 2",
		"image_prefetcher_collector_results_duplicate_total 0",
	} {
		if !strings.Contains(prom, want+"\n") {
			t.Errorf("/prometheus lacks %q:\n%s", want, prom)
		}
	}
}
