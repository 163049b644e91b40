package sender

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

// fakeCollector is a scriptable submitter: it fails while down, can hold
// calls until released, and records what it acknowledged.
type fakeCollector struct {
	mu       sync.Mutex
	down     bool
	hold     chan struct{} // non-nil: calls wait for it to close
	calls    int
	received []string // acknowledged attempt ids, in order
	reject   map[string]bool
	seen     map[string]bool
}

func (f *fakeCollector) Submit(ctx context.Context, in *resultsv1.SubmitRequest, _ ...grpc.CallOption) (*resultsv1.SubmitResponse, error) {
	f.mu.Lock()
	f.calls++
	hold, down := f.hold, f.down
	f.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if down {
		return nil, status.Error(codes.Unavailable, "collector down")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.seen == nil {
		f.seen = map[string]bool{}
	}
	resp := &resultsv1.SubmitResponse{}
	for _, r := range in.GetResults() {
		if f.reject[r.GetAttemptId()] {
			continue
		}
		if !f.seen[r.GetAttemptId()] {
			f.seen[r.GetAttemptId()] = true
			f.received = append(f.received, r.GetAttemptId())
		}
		resp.AcknowledgedIds = append(resp.AcknowledgedIds, r.GetAttemptId())
	}
	return resp, nil
}

func (f *fakeCollector) set(fn func(f *fakeCollector)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeCollector) got() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.received...)
}

func testConfig() Config {
	c := Config{Address: "test", Node: "node-1", Instance: "inst", BufferSize: 10, BatchSize: 3,
		InitialBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, RPCTimeout: time.Second}
	c.setDefaults()
	return c
}

func res(id string) *resultsv1.Result { return &resultsv1.Result{AttemptId: id, Image: "img/" + id} }

func ids(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%02d", prefix, i)
	}
	return out
}

func closeWithin(t *testing.T, s *Sender, d time.Duration) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return s.Close(ctx)
}

func TestDeliversInOrderAfterCollectorComesBack(t *testing.T) {
	t.Parallel()
	fc := &fakeCollector{down: true}
	s := newSender(testConfig(), fc)
	want := ids("a", 8)
	for _, id := range want {
		s.Enqueue(res(id))
	}
	// Let it fail a few times, then bring the collector up.
	for {
		fc.mu.Lock()
		n := fc.calls
		fc.mu.Unlock()
		if n >= 3 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	fc.set(func(f *fakeCollector) { f.down = false })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if got := fc.got(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("received %v, want %v", got, want)
	}
	st := s.Stats()
	if st.Delivered != 8 || st.Dropped != 0 || st.Queued != 0 || st.Failures < 3 {
		t.Errorf("stats = %+v, want 8 delivered, none dropped or queued, 3+ failures", st)
	}
	if err := closeWithin(t, s, 5*time.Second); err != nil {
		t.Errorf("Close: %v", err)
	}
}

func TestFullBufferDropsOldestWithoutBlocking(t *testing.T) {
	t.Parallel()
	fc := &fakeCollector{hold: make(chan struct{})}
	cfg := testConfig()
	cfg.BufferSize, cfg.BatchSize = 5, 2
	s := newSender(cfg, fc)
	// The first batch is stuck in flight (2 of the 5 places); the queue keeps
	// the newest 3 of the rest. Enqueue returning at all shows it does not
	// wait for the stuck call.
	s.Enqueue(res("a00"))
	s.Enqueue(res("a01"))
	for {
		if s.Stats().Queued == 2 && func() bool { fc.mu.Lock(); defer fc.mu.Unlock(); return fc.calls == 1 }() {
			break
		}
		time.Sleep(time.Millisecond)
	}
	for _, id := range ids("b", 10) {
		s.Enqueue(res(id))
	}
	if st := s.Stats(); st.Dropped != 7 || st.Queued != 5 {
		t.Fatalf("stats = %+v, want 7 dropped, 5 queued", st)
	}
	close(fc.hold)
	if err := closeWithin(t, s, 10*time.Second); err != nil {
		t.Fatalf("Close: %v", err)
	}
	want := "a00,a01,b07,b08,b09"
	if got := strings.Join(fc.got(), ","); got != want {
		t.Errorf("received %s, want %s (the oldest dropped)", got, want)
	}
}

func TestCloseGivesUpAtItsDeadline(t *testing.T) {
	t.Parallel()
	fc := &fakeCollector{down: true}
	s := newSender(testConfig(), fc)
	for _, id := range ids("a", 4) {
		s.Enqueue(res(id))
	}
	err := closeWithin(t, s, 100*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "4 attempts not delivered") {
		t.Fatalf("Close = %v, want 4 attempts not delivered", err)
	}
	// After Close nothing is accepted, and nothing blocks.
	s.Enqueue(res("late"))
	if st := s.Stats(); st.Dropped != 1 {
		t.Errorf("dropped after close = %d, want 1", st.Dropped)
	}
}

func TestCloseCutsAStuckCallShort(t *testing.T) {
	t.Parallel()
	fc := &fakeCollector{hold: make(chan struct{})} // never released
	cfg := testConfig()
	cfg.RPCTimeout = time.Hour
	s := newSender(cfg, fc)
	s.Enqueue(res("a"))
	err := closeWithin(t, s, 100*time.Millisecond)
	if err == nil {
		t.Fatal("Close returned nil although the collector never answered")
	}
}

func TestRejectedResultsAreNotResentForever(t *testing.T) {
	t.Parallel()
	fc := &fakeCollector{reject: map[string]bool{"bad": true}}
	s := newSender(testConfig(), fc)
	s.Enqueue(res("ok1"))
	s.Enqueue(res("bad"))
	s.Enqueue(res("ok2"))
	if err := closeWithin(t, s, 10*time.Second); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if got := strings.Join(fc.got(), ","); got != "ok1,ok2" {
		t.Errorf("received %s", got)
	}
	if st := s.Stats(); st.Dropped != 1 || st.Delivered != 2 {
		t.Errorf("stats = %+v, want 1 dropped, 2 delivered", st)
	}
}

func TestAttemptsBecomeResults(t *testing.T) {
	t.Parallel()
	fc := &fakeCollector{}
	s := newSender(testConfig(), fc)
	start := time.Unix(1700000000, 123456789)
	ok := pull.Attempt{Image: "registry.test/a:1", Number: 1, Start: start, Duration: 1500 * time.Millisecond,
		Timeout: 30 * time.Second, ImageRef: "sha256:abc", Size: 42}
	bad := pull.Attempt{Image: "registry.test/b:1", Number: 2, Start: start, Duration: time.Second,
		Err: errors.New("not found"), Reason: pull.ReasonNotFound}
	a, b := s.result(ok), s.result(bad)
	if a.GetAttemptId() == "" || a.GetAttemptId() == b.GetAttemptId() {
		t.Errorf("attempt ids %q, %q: want unique", a.GetAttemptId(), b.GetAttemptId())
	}
	if a.GetNode() != "node-1" || a.GetInstance() != "inst" || a.GetImage() != ok.Image || a.GetImageRef() != "sha256:abc" ||
		a.GetStartedAt() != 1700000000 || a.GetStartedAtUnixNano() != start.UnixNano() || a.GetDurationMs() != 1500 ||
		a.GetSizeBytes() != 42 || a.GetAttempt() != 1 || a.GetOutcome() != resultsv1.Outcome_OUTCOME_SUCCEEDED ||
		a.GetError() != "" || a.GetReason() != "" || a.GetTimeoutMs() != 30000 {
		t.Errorf("success = %v", a)
	}
	if b.GetOutcome() != resultsv1.Outcome_OUTCOME_FAILED || b.GetReason() != "NotFound" || b.GetError() != "not found" || b.GetAttempt() != 2 {
		t.Errorf("failure = %v", b)
	}
	s.AttemptFinished(bad)
	if err := closeWithin(t, s, 10*time.Second); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if len(fc.got()) != 1 {
		t.Errorf("failed attempt not delivered: %v", fc.got())
	}
}

// Retries double from InitialBackoff up to MaxBackoff, with at most 20% jitter.
func TestBackoffSchedule(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.InitialBackoff, cfg.MaxBackoff = 100*time.Millisecond, time.Second
	b := cfg.backoff()
	for i, base := range []time.Duration{100, 200, 400, 800, 1000, 1000, 1000} {
		base *= time.Millisecond
		if d := b.Step(); d < base || d > base+base/5 {
			t.Errorf("retry %d after %s, want %s plus at most 20%%", i+1, d, base)
		}
	}
}

// While the collector is down the sender waits between sends instead of
// retrying in a tight loop.
func TestRetriesBackOff(t *testing.T) {
	t.Parallel()
	fc := &fakeCollector{down: true}
	cfg := testConfig()
	cfg.InitialBackoff, cfg.MaxBackoff = 10*time.Millisecond, 40*time.Millisecond
	s := newSender(cfg, fc)
	s.Enqueue(res("a"))
	time.Sleep(300 * time.Millisecond)
	fc.mu.Lock()
	calls := fc.calls
	fc.mu.Unlock()
	// 0, 10, 30, 70, 110, ... ms: about 8 sends in 300 ms.
	if calls < 3 || calls > 12 {
		t.Errorf("%d sends in 300 ms with a 10-40 ms backoff", calls)
	}
	if err := closeWithin(t, s, 10*time.Millisecond); err == nil {
		t.Errorf("Close with the collector down: no error about the undelivered attempt")
	}
}
