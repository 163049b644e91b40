package pull_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// hedgeConfig never waits for an attempt timeout (an hour): whatever ends an
// attempt quickly is hedging.
func hedgeConfig() pull.Config {
	c := fastConfig()
	c.InitialAttemptTimeout, c.MaxAttemptTimeout = time.Hour, time.Hour
	c.HedgeAfter, c.MaxHedges = 20*time.Millisecond, 2
	return c
}

// waitCanceled waits until the runtime saw call i of ref end cancelled: the
// losing call is not left running.
func waitCanceled(t *testing.T, srv *critest.Server, ref string, i int) {
	t.Helper()
	deadline := time.Now().Add(quick)
	for {
		calls := srv.PullCallsFor(ref)
		if i < len(calls) && calls[i].Code == codes.Canceled {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("call %d of %s was not cancelled: %+v", i, ref, calls)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestHedgeWinsOverStalledCall(t *testing.T) {
	t.Parallel()
	srv, e, rec := setup(t, hedgeConfig())
	srv.OnPull(busybox, critest.Stall(), critest.Succeed())
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 1)
	as := rec.attemptsFor(busybox)
	if len(as) != 1 || as[0].Hedges != 1 || as[0].Err != nil {
		t.Fatalf("attempts %+v, want one successful attempt with one hedge", as)
	}
	if n := srv.PullCalls(busybox); n != 2 {
		t.Errorf("%d PullImage calls, want 2", n)
	}
	waitCanceled(t, srv, busybox, 0)
}

func TestSecondHedge(t *testing.T) {
	t.Parallel()
	srv, e, rec := setup(t, hedgeConfig())
	srv.OnPull(busybox, critest.Stall(), critest.Stall(), critest.Succeed())
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 1)
	if as := rec.attemptsFor(busybox); len(as) != 1 || as[0].Hedges != 2 {
		t.Fatalf("attempts %+v, want one with two hedges", as)
	}
	waitCanceled(t, srv, busybox, 0)
	waitCanceled(t, srv, busybox, 1)
}

// At most MaxHedges extra calls per attempt, and they share the attempt's
// timeout: every attempt ends at its timeout with 1+MaxHedges calls.
func TestHedgesAreBoundedPerAttempt(t *testing.T) {
	t.Parallel()
	cfg := hedgeConfig()
	cfg.InitialAttemptTimeout, cfg.MaxAttemptTimeout = 150*time.Millisecond, 150*time.Millisecond
	cfg.MaxAttempts = 2
	srv, e, rec := setup(t, cfg)
	srv.OnPull(busybox, critest.Stall())
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomeFailed, pull.ReasonTimeout, 2)
	for _, a := range rec.attemptsFor(busybox) {
		if a.Hedges != 2 || a.Reason != pull.ReasonTimeout {
			t.Errorf("attempt %+v, want 2 hedges and a timeout", a)
		}
	}
	if n := srv.PullCalls(busybox); n != 6 {
		t.Errorf("%d PullImage calls, want 2 attempts x 3", n)
	}
}

// A permanent answer from any call ends the attempt at once: a hung call
// would not change it.
func TestPermanentErrorFromHedgeEndsAttempt(t *testing.T) {
	t.Parallel()
	srv, e, _ := setup(t, hedgeConfig())
	srv.OnPull(busybox, critest.Stall(), critest.NotFound(busybox))
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomeFailed, pull.ReasonNotFound, 1)
	waitCanceled(t, srv, busybox, 0)
}

// A transient failure of the hedge does not end the attempt while the
// first call still runs: the first one's late success counts.
func TestTransientHedgeFailureWaitsForTheFirstCall(t *testing.T) {
	t.Parallel()
	cfg := hedgeConfig()
	cfg.MaxHedges = 1
	srv, e, rec := setup(t, cfg)
	srv.OnPull(busybox, critest.Succeed().After(300*time.Millisecond), critest.Unavailable())
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 1)
	if as := rec.attemptsFor(busybox); len(as) != 1 || as[0].Hedges != 1 {
		t.Fatalf("attempts %+v", as)
	}
}

// When every call of an attempt failed transiently the attempt ends with the
// last error, and the next attempt follows as without hedging.
func TestAllCallsFailTransiently(t *testing.T) {
	t.Parallel()
	cfg := hedgeConfig()
	cfg.MaxHedges = 1
	srv, e, rec := setup(t, cfg)
	srv.OnPull(busybox, critest.Unavailable().After(100*time.Millisecond), critest.Unavailable(), critest.Succeed())
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 2)
	as := rec.attemptsFor(busybox)
	if len(as) != 2 || as[0].Reason != pull.ReasonUnavailable || as[0].Hedges != 1 || as[1].Err != nil {
		t.Fatalf("attempts %+v", as)
	}
}

func TestNoHedgeForAQuickAnswer(t *testing.T) {
	t.Parallel()
	cfg := hedgeConfig()
	cfg.HedgeAfter = time.Hour
	srv, e, rec := setup(t, cfg)
	res := run(t, e, context.Background(), busybox, nginx)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 1)
	expect(t, res[1], pull.OutcomePulled, pull.ReasonNone, 1)
	if n := srv.TotalPullCalls(); n != 2 {
		t.Errorf("%d PullImage calls for 2 images", n)
	}
	for _, a := range rec.attemptsFor(busybox) {
		if a.Hedges != 0 {
			t.Errorf("attempt %+v was hedged", a)
		}
	}
}

// HedgeAfter 0 turns hedging off: a stalled call runs into the attempt
// timeout, one call per attempt.
func TestHedgingDisabled(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.MaxHedges = 2
	srv, e, _ := setup(t, cfg)
	srv.OnPull(busybox, critest.Stall(), critest.Succeed())
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 2)
	if n := srv.PullCalls(busybox); n != 2 {
		t.Errorf("%d PullImage calls, want 2", n)
	}
}

func TestHedgeConfigValidation(t *testing.T) {
	t.Parallel()
	cfg := pull.DefaultConfig()
	if cfg.HedgeAfter <= 0 || cfg.MaxHedges <= 0 || cfg.HedgeAfter >= cfg.InitialAttemptTimeout {
		t.Errorf("defaults %s x %d: a stalled first attempt must be hedged before its timeout %s", cfg.HedgeAfter, cfg.MaxHedges, cfg.InitialAttemptTimeout)
	}
	cfg.HedgeAfter, cfg.MaxHedges = -time.Second, -1
	err := cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "--hedge-after") || !strings.Contains(err.Error(), "--max-hedges") {
		t.Errorf("Validate = %v, want both hedge flags named", err)
	}
}
