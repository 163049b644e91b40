package pull_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// A pull that finds the node's disk full ends the image at once, with its own
// reason: another attempt within the pass would only fill the disk further
// (and urge the kubelet's GC on), and the image is not to blame. The other
// images are still pulled.
func TestDiskFullIsNotRetried(t *testing.T) {
	t.Parallel()
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

// Admit is asked before every attempt: once it refuses (the disk budget), no
// PullImage is sent, and the image fails at once with ReasonDiskBudget and
// Admit's own error; images admitted before are pulled. A retry of an image
// admitted once is asked again.
func TestAdmitRefusalStartsNoPull(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.MaxParallel = 1 // list order, one at a time: the refusal falls between the images
	srv, e, _ := setup(t, cfg)
	full := errors.New("image filesystem at the budget")
	asked := 0
	e.Admit = func() error {
		asked++
		if srv.HasImage(busybox) {
			return full
		}
		return nil
	}
	srv.OnPull(nginx, critest.Unavailable())
	res := run(t, e, context.Background(), busybox, nginx)

	if res[0].Outcome != pull.OutcomePulled {
		t.Errorf("%s: %+v, want pulled (admitted)", busybox, res[0])
	}
	if r := res[1]; r.Outcome != pull.OutcomeFailed || r.Reason != pull.ReasonDiskBudget || !errors.Is(r.Err, full) {
		t.Errorf("%s: %+v, want failed with %s and Admit's error", nginx, r, pull.ReasonDiskBudget)
	}
	if n := srv.PullCalls(nginx); n != 0 {
		t.Errorf("%d PullImage calls for %s after Admit refused, want 0", n, nginx)
	}
	if asked != 2 {
		t.Errorf("Admit asked %d times, want once per image here (2)", asked)
	}
	if !pull.ReasonDiskBudget.Permanent() {
		t.Error("DiskBudget is retried within the pass")
	}
}

// A retry is a new pull, so it is asked again: an image admitted for its
// first attempt that the disk filled meanwhile stops there.
func TestAdmitIsAskedBeforeEachAttempt(t *testing.T) {
	t.Parallel()
	srv, e, _ := setup(t, fastConfig())
	srv.OnPull(busybox, critest.Unavailable(), critest.Unavailable())
	e.Admit = func() error {
		if srv.PullCalls(busybox) > 0 {
			return errors.New("over budget")
		}
		return nil
	}
	res := run(t, e, context.Background(), busybox)
	if r := res[0]; r.Reason != pull.ReasonDiskBudget || r.Attempts != 1 || srv.PullCalls(busybox) != 1 {
		t.Errorf("result %+v after %d PullImage calls, want %s after the one attempt admitted", r, srv.PullCalls(busybox), pull.ReasonDiskBudget)
	}
}

// A runtime that cannot keep OCI artifacts (containerd 1.x) fails the image
// at once, saying which runtime feature is missing beside its own text.
func TestArtifactUnsupportedSaysWhatIsMissing(t *testing.T) {
	t.Parallel()
	srv, e, _ := setup(t, fastConfig())
	srv.OnPull(busybox, critest.Fail(codes.Unknown, `failed to pull and unpack image "`+busybox+
		`": failed to unpack image on snapshotter overlayfs: mismatched image rootfs and manifest layers`))
	res := run(t, e, context.Background(), busybox)
	r := res[0]
	if r.Reason != pull.ReasonArtifactUnsupported || r.Attempts != 1 || srv.PullCalls(busybox) != 1 {
		t.Errorf("result %+v after %d PullImage calls, want %s after one", r, srv.PullCalls(busybox), pull.ReasonArtifactUnsupported)
	}
	for _, want := range []string{"containerd 2.1 or later", "mismatched image rootfs"} {
		if r.Err == nil || !strings.Contains(r.Err.Error(), want) {
			t.Errorf("error %v does not say %q", r.Err, want)
		}
	}
}
