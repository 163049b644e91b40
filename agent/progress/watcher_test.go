package progress_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/progress/progresstest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

const (
	img = "registry.example/big:1"
	mib = 1 << 20
	// generous bound for things that must happen soon
	soon = 10 * time.Second
)

func watcher(src progress.Source) *progress.Watcher {
	return &progress.Watcher{Source: src, Interval: 5 * time.Millisecond}
}

func TestWatcherEndsAnAttemptWhoseBytesStopped(t *testing.T) {
	src := progresstest.New()
	w := watcher(src)
	tr := w.Follow(context.Background(), img)
	if tr == nil {
		t.Fatal("Follow returned nil")
	}
	defer tr.Close(pull.TransferFailed)
	a := tr.Watch(1, 100*time.Millisecond)
	src.Grow(img, "layer-sha256:a", 5*mib)
	select {
	case <-a.Stalled():
	case <-time.After(soon):
		t.Fatal("no stall reported")
	}
	if b := a.Stop(); b.Fetched != 5*mib || b.Resumed != 0 {
		t.Errorf("bytes %+v, want 5 MiB fetched", b)
	}
}

func TestWatcherKeepsAFlowingAttempt(t *testing.T) {
	src := progresstest.New()
	w := watcher(src)
	tr := w.Follow(context.Background(), img)
	defer tr.Close(pull.TransferPulled)
	// A window far longer than any scheduling hiccup: the bytes below flow
	// for twice as long.
	a := tr.Watch(1, 500*time.Millisecond)
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		src.Grow(img, "layer-sha256:a", 1000)
	}
	select {
	case <-a.Stalled():
		t.Fatal("a flowing attempt was reported stalled")
	default:
	}
	a.Stop()
}

func TestWatcherBytesOfAResumedAttempt(t *testing.T) {
	src := progresstest.New()
	// An earlier pass left a manifest, a config and 30 MiB of a layer.
	src.Update(img, func(st *progress.State) {
		st.Blobs, st.Fetched, st.Total = 2, 8<<10, 100*mib
		st.Ingests["layer-sha256:a"] = 30 * mib
	})
	w := watcher(src)
	tr := w.Follow(context.Background(), img)
	a := tr.Watch(1, time.Hour)
	src.Grow(img, "layer-sha256:a", 10*mib)
	src.Commit(img, "layer-sha256:a")
	b := a.Stop()
	tr.Close(pull.TransferPulled)
	want := int64(30*mib + 8<<10)
	if b.Resumed != want || b.Fetched != 10*mib || b.Total != 100*mib {
		t.Errorf("bytes %+v, want resumed %d, fetched %d, total %d", b, want, 10*mib, 100*mib)
	}
	if released, end := src.Released(img); !released || end != pull.TransferPulled {
		t.Errorf("released %v as %v, want the transfer released as pulled", released, end)
	}
}

func TestWatcherKeepsWhatAFailedImageFetched(t *testing.T) {
	src := progresstest.New()
	w := watcher(src)
	tr := w.Follow(context.Background(), img)
	tr.Close(pull.TransferFailed)
	if released, end := src.Released(img); !released || end != pull.TransferFailed {
		t.Errorf("released %v as %v, want released as failed (kept for a resume)", released, end)
	}
}

func TestWatcherGivesUpOnARuntimeWithoutTheAPI(t *testing.T) {
	src := progresstest.New()
	src.OpenErr = fmt.Errorf("list leases: %w", progress.ErrUnsupported)
	w := watcher(src)
	for range 3 {
		if tr := w.Follow(context.Background(), img); tr != nil {
			t.Fatal("Follow returned a transfer")
		}
	}
	if n := len(src.Opened()); n != 1 {
		t.Errorf("%d Open calls, want 1: an unsupported runtime is not asked again", n)
	}
}

func TestWatcherTriesAgainAfterOtherErrors(t *testing.T) {
	src := progresstest.New()
	src.OpenErr = errors.New("create lease: connection reset")
	w := watcher(src)
	w.Follow(context.Background(), img)
	w.Follow(context.Background(), img)
	if n := len(src.Opened()); n != 2 {
		t.Errorf("%d Open calls, want 2", n)
	}
}

func TestWatcherPollsOnlyWhileFollowing(t *testing.T) {
	src := progresstest.New()
	w := watcher(src)
	tr := w.Follow(context.Background(), img)
	a := tr.Watch(1, time.Hour)
	waitFor(t, "polls", func() bool { return src.Polls() > 3 })
	a.Stop()
	tr.Close(pull.TransferPulled)
	time.Sleep(50 * time.Millisecond) // the poller notices at its next tick
	n := src.Polls()
	time.Sleep(100 * time.Millisecond)
	if m := src.Polls(); m != n {
		t.Errorf("%d polls after the last transfer closed", m-n)
	}
}

// recorder is a fake progress.Recorder.
type recorder struct {
	mu       sync.Mutex
	inFlight int64
	added    int64
}

func (r *recorder) SetPullBytesInFlight(n int64) { r.mu.Lock(); r.inFlight = n; r.mu.Unlock() }
func (r *recorder) AddFetchedBytes(n int64)      { r.mu.Lock(); r.added += n; r.mu.Unlock() }
func (r *recorder) get() (int64, int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.inFlight, r.added
}

func TestWatcherRecordsBytesInFlight(t *testing.T) {
	src := progresstest.New()
	rec := &recorder{}
	w := watcher(src)
	w.Recorder = rec
	a := w.Follow(context.Background(), "a:1")
	b := w.Follow(context.Background(), "b:1")
	wa, wb := a.Watch(1, time.Hour), b.Watch(1, time.Hour)
	src.Grow("a:1", "layer-sha256:a", 3*mib)
	src.Grow("b:1", "layer-sha256:b", 2*mib)
	waitFor(t, "5 MiB in flight", func() bool { n, _ := rec.get(); return n == 5*mib })
	wa.Stop()
	a.Close(pull.TransferPulled)
	if n, added := rec.get(); n != 2*mib || added != 5*mib {
		t.Errorf("in flight %d, counted %d after a finished; want %d and %d", n, added, 2*mib, 5*mib)
	}
	wb.Stop()
	b.Close(pull.TransferFailed)
	if n, _ := rec.get(); n != 0 {
		t.Errorf("in flight %d with nothing pulling", n)
	}
}

// syncBuffer is a log destination read while the watcher writes to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func TestWatcherLogsProgressForPeople(t *testing.T) {
	src := progresstest.New()
	src.Update(img, func(st *progress.State) { st.Total = 100 * mib; st.Blobs = 2 })
	var buf syncBuffer
	w := watcher(src)
	w.Log = slog.New(slog.NewTextHandler(&buf, nil))
	w.LogInterval = 20 * time.Millisecond
	tr := w.Follow(context.Background(), img)
	defer tr.Close(pull.TransferPulled)
	a := tr.Watch(3, time.Hour)
	defer a.Stop()
	src.Grow(img, "layer-sha256:a", 50*mib)
	waitFor(t, "a progress line with 50 MiB", func() bool { return strings.Contains(buf.String(), "bytes=52428800") })
	var line string
	for _, l := range strings.Split(buf.String(), "\n") {
		if strings.Contains(l, "bytes=52428800") {
			line = l
			break
		}
	}
	for _, want := range []string{`msg="pull progress"`, "image=" + img, "attempt=3", "total=104857600", "percent=50.0", "rate="} {
		if !strings.Contains(line, want) {
			t.Errorf("progress line %q lacks %q", line, want)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(soon); !cond(); time.Sleep(2 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("no %s within %s", what, soon)
		}
	}
}

// A pull that ends before the first poll is never read: no poll while it
// runs, none when it stops, and it reports no fetched bytes.
func TestWatcherNeverReadsAPullThatEndsBeforeTheFirstPoll(t *testing.T) {
	src := progresstest.New()
	w := &progress.Watcher{Source: src, Interval: time.Hour}
	tr := w.Follow(context.Background(), img)
	a := tr.Watch(1, 100*time.Millisecond)
	src.Grow(img, "layer-sha256:a", mib)
	src.Commit(img, "layer-sha256:a")
	if b := a.Stop(); b != (pull.Bytes{}) {
		t.Errorf("bytes %+v of an attempt never followed, want none", b)
	}
	tr.Close(pull.TransferPulled)
	if n := src.Polls(); n != 0 {
		t.Errorf("%d polls of a pull that ended before the first one", n)
	}
	if released, end := src.Released(img); !released || end != pull.TransferPulled {
		t.Errorf("released %v as %v, want released as pulled", released, end)
	}
}

// An attempt still running at the first poll is followed, and a stall is
// caught within the window counted from the attempt's start.
func TestWatcherFollowsAPullStillRunningAtTheFirstPoll(t *testing.T) {
	src := progresstest.New()
	w := &progress.Watcher{Source: src, Interval: 50 * time.Millisecond}
	tr := w.Follow(context.Background(), img)
	defer tr.Close(pull.TransferFailed)
	start := time.Now()
	a := tr.Watch(1, 300*time.Millisecond)
	src.Grow(img, "layer-sha256:a", 5*mib) // then nothing
	select {
	case <-a.Stalled():
	case <-time.After(soon):
		t.Fatal("no stall reported")
	}
	if took := time.Since(start); took < 300*time.Millisecond {
		t.Errorf("stall reported after %s, before the 300ms window", took)
	}
	if src.Polls() == 0 {
		t.Error("a stall was reported without a poll")
	}
	if b := a.Stop(); b.Fetched != 5*mib {
		t.Errorf("bytes %+v of a followed attempt, want 5 MiB fetched", b)
	}
}

// After an attempt that was not followed, the next one reads where it starts
// from: what the first left counts as resumed, not as fetched again.
func TestWatcherRetryAfterAnUnfollowedAttemptResumes(t *testing.T) {
	src := progresstest.New()
	w := &progress.Watcher{Source: src, Interval: time.Hour}
	tr := w.Follow(context.Background(), img)
	defer tr.Close(pull.TransferPulled)
	a := tr.Watch(1, time.Hour)
	src.Grow(img, "layer-sha256:a", 3*mib) // a quick failure left 3 MiB
	a.Stop()
	if n := src.Polls(); n != 0 {
		t.Fatalf("%d polls during an attempt that was not followed", n)
	}
	b := tr.Watch(2, time.Hour)
	src.Grow(img, "layer-sha256:a", mib)
	if got := b.Stop(); got.Resumed != 3*mib || got.Fetched != mib {
		t.Errorf("bytes %+v of the retry, want resumed from 3 MiB and 1 MiB fetched", got)
	}
}
