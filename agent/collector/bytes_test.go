package collector_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	"github.com/nodeprefetch/image-prefetcher/agent/collector/collectortest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	"github.com/nodeprefetch/image-prefetcher/agent/sender"
)

// The bytes an agent followed reach the collector's records: per attempt in
// /metrics, added up per image in /summary, failed attempts included.
func TestAttemptsCarryTheirBytes(t *testing.T) {
	t.Parallel()
	c := collector.New(collector.NewStore(100), nil)
	srv := collectortest.Start(t, c, "127.0.0.1:0")
	s, err := sender.New(sender.Config{Address: srv.GRPC, Node: "node-a", Instance: "inst"})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Unix(1700000000, 0)
	const mib = 1 << 20
	stalled := pull.Attempt{Image: "big:1", Number: 1, Start: start, Duration: 25 * time.Second,
		Err: errors.New("no byte arrived for 20s: pull made no progress"), Reason: pull.ReasonTimeout,
		Bytes: pull.Bytes{Fetched: 5 * mib, Total: 200 * mib}}
	resumed := pull.Attempt{Image: "big:1", Number: 2, Start: start.Add(26 * time.Second), Duration: 80 * time.Second,
		ImageRef: "sha256:b", Size: 200 * mib, Bytes: pull.Bytes{Fetched: 195 * mib, Resumed: 5 * mib, Total: 200 * mib}}
	s.AttemptFinished(stalled)
	s.AttemptFinished(resumed)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}

	var results []collector.JSONResult
	body := get(t, srv.HTTP+"/metrics?image=big:1", &results)
	if len(results) != 2 {
		t.Fatalf("GET /metrics = %s", body)
	}
	first, second := results[0], results[1]
	if first.Attempt == 2 {
		first, second = second, first
	}
	if first.FetchedBytes != 5*mib || first.ResumedBytes != 0 || first.TotalBytes != 200*mib {
		t.Errorf("stalled attempt = %+v", first)
	}
	if second.FetchedBytes != 195*mib || second.ResumedBytes != 5*mib || second.TotalBytes != 200*mib {
		t.Errorf("resumed attempt = %+v", second)
	}
	var sum collector.Summaries
	get(t, srv.HTTP+"/summary", &sum)
	if got := sum.Images["big:1"]; got.FetchedBytes != 200*mib || got.Bytes != 200*mib {
		t.Errorf("summary of big:1 = %+v, want 200 MiB fetched over both attempts", got)
	}
}
