package app

import (
	"context"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// A stalled first PullImage: on a runtime that fetches each PullImage on its
// own connection (containerd) the hedge gets the image; on one that joins
// concurrent pulls of an image (CRI-O) the agent sends no hedge, so the
// attempt ends at its timeout with one call only instead of piling calls up
// behind the stalled one.
func TestHedgesOnlyWhereARuntimeFetchesThemApart(t *testing.T) {
	for _, tc := range []struct {
		runtime   string
		wantCalls int
		want      pull.Outcome
	}{
		{"containerd", 2, pull.OutcomePulled},
		{cri.RuntimeCRIO, 1, pull.OutcomeFailed},
	} {
		t.Run(tc.runtime, func(t *testing.T) {
			srv := critest.Start(t)
			srv.SetRuntimeName(tc.runtime)
			const ref = "registry.example/stall:1"
			srv.OnPull(ref, critest.Step{Stall: true}, critest.Step{}) // later calls succeed
			o := testOptions(srv.Path(), writeList(t, ref))
			o.Label = false
			o.Pull.MaxAttempts = 1
			o.Pull.InitialAttemptTimeout, o.Pull.MaxAttemptTimeout = 500*time.Millisecond, 500*time.Millisecond
			o.Pull.HedgeAfter, o.Pull.MaxHedges = 20*time.Millisecond, 2
			p, _, _ := newTestPrefetcher(t, o)
			rep, err := p.pass(context.Background())
			if err != nil {
				t.Fatalf("pass: %v", err)
			}
			if len(rep.Results) != 1 || rep.Results[0].Outcome != tc.want {
				t.Fatalf("results %+v, want one %s", rep.Results, tc.want)
			}
			if got := srv.PullCalls(ref); got != tc.wantCalls {
				t.Errorf("%d PullImage calls, want %d", got, tc.wantCalls)
			}
		})
	}
}

// IfNotPresent costs one ImageStatus per present image per pass, also when
// the pass first asks which images are missing (labels, readiness): the
// engine reuses those answers.
func TestPresentImageCostsOneStatusCall(t *testing.T) {
	srv := critest.Start(t)
	refs := []string{"registry.example/a:1", "registry.example/b:1"}
	for _, r := range refs {
		srv.AddImage(r, critest.Image{})
	}
	o := testOptions(srv.Path(), writeList(t, refs...))
	p, _, _ := newTestPrefetcher(t, o)
	if _, err := p.pass(context.Background()); err != nil {
		t.Fatalf("pass: %v", err)
	}
	for _, r := range refs {
		if got := srv.StatusCalls(r); got != 1 {
			t.Errorf("%s: %d ImageStatus calls, want 1", r, got)
		}
	}
	if got := srv.TotalPullCalls(); got != 0 {
		t.Errorf("%d PullImage calls for present images", got)
	}
}
