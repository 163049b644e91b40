package pull_test

import (
	"context"
	"strings"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// A pull that finds the node's disk full ends the image at once, with its own
// reason: another attempt within the pass would only fill the disk further
// (and urge the kubelet's GC on), and the image is not to blame. The other
// images are still pulled.
func TestDiskFullIsNotRetried(t *testing.T) {
	srv, e, rec := setup(t, fastConfig())
	srv.OnPull(busybox, critest.DiskFull(busybox))
	res := run(t, e, context.Background(), busybox, nginx)

	if r := res[0]; r.Outcome != pull.OutcomeFailed || r.Reason != pull.ReasonDiskFull || r.Attempts != 1 ||
		!strings.Contains(r.Err.Error(), "no space left on device") {
		t.Errorf("result %+v, want failed after 1 attempt with reason %s and the runtime's text", r, pull.ReasonDiskFull)
	}
	if n := srv.PullCalls(busybox); n != 1 {
		t.Errorf("%d PullImage calls on a full disk, want 1", n)
	}
	if a := rec.attemptsFor(busybox); len(a) != 1 || a[0].Reason != pull.ReasonDiskFull {
		t.Errorf("attempts %+v, want one with reason %s", a, pull.ReasonDiskFull)
	}
	if res[1].Outcome != pull.OutcomePulled {
		t.Errorf("%s: %s, want pulled although another image found the disk full", nginx, res[1].Outcome)
	}
}
