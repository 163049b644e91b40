package pull_test

import (
	"context"
	"slices"
	"sync"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Settled sees each image's result before the image's slot goes to the next
// one: with one slot, before the next image's first call.
func TestSettledRunsBeforeTheSlotIsReused(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.MaxParallel = 1
	srv, e, _ := setup(t, cfg)
	srv.AddImage(busybox, critest.Image{})
	var mu sync.Mutex
	var order []string
	note := func(s string) {
		mu.Lock()
		order = append(order, s)
		mu.Unlock()
	}
	srv.OnPull(nginx, critest.Succeed().Doing(func() { note("pull " + nginx) }))
	e.Settled = func(_ context.Context, r pull.Result) { note("settled " + r.Image + " " + string(r.Outcome)) }
	run(t, e, context.Background(), busybox, nginx)

	want := []string{"settled " + busybox + " present", "pull " + nginx, "settled " + nginx + " pulled"}
	if !slices.Equal(order, want) {
		t.Errorf("order %q, want %q", order, want)
	}
}
