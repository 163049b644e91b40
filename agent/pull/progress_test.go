package pull_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/progress/progresstest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// progressConfig: escalating timeouts far shorter than the pulls below, an
// hour-long cap unless a test sets one, and a short no-progress window.
func progressConfig() pull.Config {
	c := fastConfig()
	c.InitialAttemptTimeout, c.MaxAttemptTimeout = 50*time.Millisecond, time.Hour
	c.ProgressTimeout = 300 * time.Millisecond
	return c
}

// withProgress adds a Watcher on a scripted source to the engine.
func withProgress(e *pull.Engine) *progresstest.Source {
	src := progresstest.New()
	e.Progress = &progress.Watcher{Source: src, Interval: 5 * time.Millisecond}
	return src
}

// feed writes bytes to ref's transfer every few milliseconds until stop is
// closed.
func feed(src *progresstest.Source, ref string, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				src.Grow(ref, "layer-sha256:a", 64<<10)
			}
		}
	}()
	return &wg
}

// A pull whose bytes stop ends at the no-progress window, long before its
// hour-long cap, and the next attempt goes on with the same transfer.
func TestStalledTransferEndsTheAttempt(t *testing.T) {
	t.Parallel()
	srv, e, rec := setup(t, progressConfig())
	src := withProgress(e)
	srv.OnPull(busybox, critest.Stall(), critest.Succeed())
	src.Grow(busybox, "layer-sha256:a", 5<<20) // 5 MiB arrived, then nothing
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 2)
	as := rec.attemptsFor(busybox)
	if len(as) != 2 || !errors.Is(as[0].Err, pull.ErrStalled) || as[0].Reason != pull.ReasonTimeout {
		t.Fatalf("attempts %+v, want a stalled one (Timeout), then a success", as)
	}
	if as[0].Timeout != time.Hour || as[1].Timeout != time.Hour {
		t.Errorf("attempt timeouts %s, %s; want the cap (1h) for both", as[0].Timeout, as[1].Timeout)
	}
	if as[1].Bytes.Resumed != 5<<20 {
		t.Errorf("second attempt resumed from %d bytes, want the 5 MiB the first left", as[1].Bytes.Resumed)
	}
	if got := src.Opened(); len(got) != 1 {
		t.Errorf("transfers opened %v, want one for both attempts", got)
	}
	if released, end := src.Released(busybox); !released || end != pull.TransferPulled {
		t.Errorf("transfer released %v as %v, want released as pulled", released, end)
	}
}

// Bytes that flow keep an attempt going past the escalating timeout it
// would have had (50 ms here); without progress watching the same pull
// times out.
func TestFlowingTransferIsNotCut(t *testing.T) {
	t.Parallel()
	for _, watched := range []bool{true, false} {
		cfg := progressConfig()
		cfg.MaxAttempts = 1
		srv, e, rec := setup(t, cfg)
		srv.OnPull(busybox, critest.Succeed().After(time.Second))
		var src *progresstest.Source
		if watched {
			src = withProgress(e)
		} else {
			src = progresstest.New() // fed, but nobody watches
		}
		stop := make(chan struct{})
		wg := feed(src, busybox, stop)
		res := run(t, e, context.Background(), busybox)
		close(stop)
		wg.Wait()
		if watched {
			expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 1)
			if a := rec.attemptsFor(busybox); len(a) != 1 || a[0].Bytes.Fetched <= 0 {
				t.Errorf("attempts %+v, want one with fetched bytes", a)
			}
		} else {
			expect(t, res[0], pull.OutcomeFailed, pull.ReasonTimeout, 1)
		}
	}
}

// The cap still ends an attempt whose bytes flow.
func TestCapStillEndsAFlowingAttempt(t *testing.T) {
	t.Parallel()
	cfg := progressConfig()
	cfg.MaxAttemptTimeout = 300 * time.Millisecond
	cfg.ProgressTimeout = time.Hour
	cfg.MaxAttempts = 2
	srv, e, rec := setup(t, cfg)
	src := withProgress(e)
	srv.OnPull(busybox, critest.Stall())
	stop := make(chan struct{})
	wg := feed(src, busybox, stop)
	res := run(t, e, context.Background(), busybox)
	close(stop)
	wg.Wait()
	expect(t, res[0], pull.OutcomeFailed, pull.ReasonTimeout, 2)
	for _, a := range rec.attemptsFor(busybox) {
		if errors.Is(a.Err, pull.ErrStalled) || a.Timeout != 300*time.Millisecond {
			t.Errorf("attempt %+v: want ended by the 300ms cap, not as stalled", a)
		}
	}
	for _, c := range srv.PullCallsFor(busybox) {
		if c.Timeout > 300*time.Millisecond {
			t.Errorf("PullImage call with %s left, want at most the cap", c.Timeout)
		}
	}
	if released, end := src.Released(busybox); !released || end != pull.TransferFailed {
		t.Errorf("transfer released %v as %v, want kept for a resume (released as failed)", released, end)
	}
}

// Hedges go out while the pull resolves, not once blobs are being fetched
// (a hedge would only wait on their locks).
func TestHedgesOnlyWhileResolving(t *testing.T) {
	t.Parallel()
	for _, moving := range []bool{false, true} {
		cfg := progressConfig()
		cfg.ProgressTimeout = time.Hour
		cfg.MaxAttemptTimeout, cfg.MaxAttempts = 500*time.Millisecond, 1
		cfg.HedgeAfter, cfg.MaxHedges = 100*time.Millisecond, 2
		srv, e, rec := setup(t, cfg)
		src := withProgress(e)
		srv.OnPull(busybox, critest.Stall())
		stop := make(chan struct{})
		var wg *sync.WaitGroup
		if moving {
			wg = feed(src, busybox, stop)
		}
		run(t, e, context.Background(), busybox)
		close(stop)
		if wg != nil {
			wg.Wait()
		}
		a := rec.attemptsFor(busybox)
		if len(a) == 0 {
			t.Fatal("no attempt")
		}
		switch {
		case moving && a[0].Hedges != 0:
			t.Errorf("%d hedges while blobs were being fetched, want none", a[0].Hedges)
		case !moving && a[0].Hedges != 2:
			t.Errorf("%d hedges while resolving, want 2", a[0].Hedges)
		}
	}
}

// ProgressTimeout 0 turns progress watching off: the escalating timeouts
// apply and no transfer is opened.
func TestProgressTimeoutZeroIsOff(t *testing.T) {
	t.Parallel()
	cfg := progressConfig()
	cfg.ProgressTimeout = 0
	cfg.MaxAttemptTimeout = 200 * time.Millisecond
	srv, e, rec := setup(t, cfg)
	src := withProgress(e)
	srv.OnPull(busybox, critest.Stall(), critest.Succeed())
	run(t, e, context.Background(), busybox)
	if len(src.Opened()) != 0 {
		t.Errorf("transfers opened %v with progress off", src.Opened())
	}
	if a := rec.attemptsFor(busybox); len(a) != 2 || a[0].Timeout != 50*time.Millisecond {
		t.Errorf("attempts %+v, want the first under the 50ms initial timeout", a)
	}
}

// After an attempt the cap ended while its bytes flowed, the next one starts
// at once: nothing failed, and a delay would only idle the link.
func TestNoDelayAfterACappedFlowingAttempt(t *testing.T) {
	t.Parallel()
	cfg := progressConfig()
	cfg.MaxAttemptTimeout = 200 * time.Millisecond
	cfg.ProgressTimeout = time.Hour
	// A delay of an hour does not fit in the overall timeout: waiting for
	// it would end the image at once as failed.
	cfg.InitialDelay, cfg.MaxDelay = time.Hour, time.Hour
	cfg.OverallTimeout = 10 * time.Second
	cfg.MaxAttempts = 3
	srv, e, rec := setup(t, cfg)
	src := withProgress(e)
	srv.OnPull(busybox, critest.Stall(), critest.Stall(), critest.Succeed())
	stop := make(chan struct{})
	wg := feed(src, busybox, stop)
	res := run(t, e, context.Background(), busybox)
	close(stop)
	wg.Wait()
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 3)
	if a := rec.attemptsFor(busybox); len(a) != 3 || a[0].Bytes.Fetched <= 0 {
		t.Errorf("attempts %+v, want two capped ones with bytes, then a success", a)
	}
}

// A stalled attempt is a failure: the delay before the next one applies.
func TestDelayAfterAStalledAttempt(t *testing.T) {
	t.Parallel()
	cfg := progressConfig()
	cfg.InitialDelay, cfg.MaxDelay = time.Hour, time.Hour
	cfg.OverallTimeout = 2 * time.Second // ends the wait for the delay
	srv, e, rec := setup(t, cfg)
	src := withProgress(e)
	srv.OnPull(busybox, critest.Stall(), critest.Succeed())
	src.Grow(busybox, "layer-sha256:a", 1<<20)
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomeFailed, pull.ReasonTimeout, 1)
	if a := rec.attemptsFor(busybox); len(a) != 1 || !errors.Is(a[0].Err, pull.ErrStalled) {
		t.Errorf("attempts %+v, want one stalled and no second within the overall timeout", a)
	}
}

// A pull the runtime cancels by itself (CRI-O at its pull_progress_timeout)
// while the pass goes on is a timeout, and retried.
func TestRuntimeCancelledPullIsATimeout(t *testing.T) {
	t.Parallel()
	srv, e, rec := setup(t, fastConfig())
	srv.OnPull(busybox, critest.Fail(codes.Canceled, "unable to pull image: writing blob: storing blob to file: context canceled"), critest.Succeed())
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 2)
	if a := rec.attemptsFor(busybox); len(a) != 2 || a[0].Reason != pull.ReasonTimeout || !errors.Is(a[0].Err, pull.ErrRuntimeCanceled) {
		t.Errorf("attempts %+v, want the first a Timeout cancelled by the runtime", a)
	}
}

// The transfer of an image that failed for good (a missing tag: permanent) is
// released as done, so what its pulls kept goes; one that failed for a
// transient reason keeps it for the next pass to resume from.
func TestTransferOfAFailureForGoodIsDone(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		step critest.Step
		end  pull.TransferEnd
	}{
		{"not found", critest.NotFound(busybox), pull.TransferFailedForGood},
		{"unavailable", critest.Fail(codes.Unavailable, "registry down"), pull.TransferFailed},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := progressConfig()
			cfg.MaxAttempts = 1
			srv, e, _ := setup(t, cfg)
			src := withProgress(e)
			srv.OnPull(busybox, c.step)
			res := run(t, e, context.Background(), busybox)
			if res[0].Outcome != pull.OutcomeFailed {
				t.Fatalf("outcome %s, want failed", res[0].Outcome)
			}
			if released, end := src.Released(busybox); !released || end != c.end {
				t.Errorf("transfer released %v as %v, want released as %v", released, end, c.end)
			}
		})
	}
}
