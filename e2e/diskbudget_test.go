package e2e_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// kubeletImageGCHighThresholdPercent is the kubelet's default: at this use of
// the image filesystem its image GC starts deleting images.
const kubeletImageGCHighThresholdPercent = 85

// imageFsUse is the use of the filesystem at path as the kubelet counts it
// (100 - available*100/capacity), and the bytes in use.
func imageFsUse(t *testing.T, path string) (percent int, used uint64) {
	t.Helper()
	percent, used, err := fsUse(path)
	if err != nil {
		t.Fatal(err)
	}
	return percent, used
}

func fsUse(path string) (percent int, used uint64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	bsize := uint64(st.Bsize)
	capacity, avail := st.Blocks*bsize, st.Bavail*bsize
	return 100 - int(avail*100/capacity), capacity - avail, nil
}

// peakUse samples the use of the filesystem at path every 20 ms while do runs and returns the highest (the
// kubelet's image GC reacts to the use at any moment, and a failed pull's partial bytes go again after it).
func peakUse(t *testing.T, path string, do func()) (percent int, used uint64) {
	t.Helper()
	stop, done := make(chan struct{}), make(chan struct{})
	percent, used = imageFsUse(t, path)
	go func() {
		defer close(done)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if p, u, err := fsUse(path); err == nil && p > percent {
				percent, used = p, u
			}
		}
	}()
	do()
	close(stop)
	<-done
	if p, u := imageFsUse(t, path); p > percent {
		percent, used = p, u
	}
	return percent, used
}

// TestDiskBudgetStopsPullsBeforeTheKubeletsThreshold runs in `make
// e2e-disk-budget`: containerd 2.x whose image store is a small ext4
// filesystem of its own (IMAGE_PREFETCHER_E2E_IMAGE_FS_SIZE), and a list
// (the random test images, 60 MiB, about twice that on disk once unpacked)
// that does not fit in it. With a disk budget the agent stops starting pulls
// once the filesystem reaches it, the images not pulled fail with DiskBudget
// and the message names the filesystem, the budget and the bytes to free; the
// filesystem stays below the kubelet's image GC threshold. The same list
// without the budget fills it past that threshold: what the budget prevents.
func TestDiskBudgetStopsPullsBeforeTheKubeletsThreshold(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	if env.ImageFsSize == "" {
		t.Fatal("the image store is not a small filesystem of its own: run `make e2e-disk-budget` " +
			"(IMAGE_PREFETCHER_E2E_IMAGE_FS_SIZE at e2e/cluster.sh up)")
	}
	_, images := env.CRI(t)
	var refs []string
	for _, size := range []int{4, 8, 12, 16, 20} {
		refs = append(refs, env.Image(t, fmt.Sprintf("e2e/random:%dmib", size)).Ref)
	}
	removeAll(t, images, refs)
	t.Cleanup(func() { removeAll(t, images, refs) })

	start, startBytes := imageFsUse(t, env.ImageFs)
	budget := start + 25
	if budget >= kubeletImageGCHighThresholdPercent-10 {
		t.Fatalf("the image filesystem is %d%% full before the test: too full to show anything", start)
	}
	// --host-root=/: the agent runs on the host, so the image filesystem containerd names is
	// where it is; one pull at a time, so each pull starts after the previous one's bytes landed.
	var run fetchRun
	withBudget, withBudgetBytes := peakUse(t, env.ImageFs, func() {
		run = fetch(t, env, refs, "--label=false", "--host-root=/", "--max-parallel-pulls=1",
			fmt.Sprintf("--disk-budget-percent=%d", budget))
	})
	have, _ := present(ctxFor(t, time.Minute), t, images, refs)
	pulled := len(have)
	t.Logf("image filesystem %s (%s): %d%% (%d MiB) before, at most %d%% (%d MiB) during the pass with --disk-budget-percent=%d; %d of %d images pulled",
		env.ImageFs, env.ImageFsSize, start, startBytes>>20, withBudget, withBudgetBytes>>20, budget, pulled, len(refs))
	if run.code != 1 {
		t.Errorf("fetch exited %d, want 1 (images not pulled):\n%s", run.code, run.output)
	}
	if pulled == 0 || pulled == len(refs) {
		t.Errorf("%d of %d images pulled: want the first ones, up to the budget", pulled, len(refs))
	}
	for _, want := range []string{
		"reason=DiskBudget",
		fmt.Sprintf("at or over the disk budget of %d%%", budget),
		"image filesystem " + env.ImageFs,
		"are freed",
	} {
		if !strings.Contains(run.output, want) {
			t.Errorf("the agent's output does not say %q:\n%s", want, run.output)
		}
	}
	if strings.Contains(run.output, "disk budget not in force") {
		t.Errorf("the budget was not in force:\n%s", run.output)
	}
	if withBudget >= kubeletImageGCHighThresholdPercent {
		t.Errorf("with the budget the image filesystem reached %d%%, the kubelet's image GC threshold is %d%%",
			withBudget, kubeletImageGCHighThresholdPercent)
	}

	// The same list without the budget.
	var off fetchRun
	without, withoutBytes := peakUse(t, env.ImageFs, func() {
		off = fetch(t, env, refs, "--label=false", "--host-root=/", "--max-parallel-pulls=1", "--disk-budget-percent=0")
	})
	t.Logf("without the budget: exit %d, image filesystem at most %d%% (%d MiB) during the pass", off.code, without, withoutBytes>>20)
	if without < kubeletImageGCHighThresholdPercent {
		t.Errorf("without the budget the list filled the image filesystem to %d%% only: the test shows nothing "+
			"(want past the kubelet's %d%%; make the filesystem smaller)", without, kubeletImageGCHighThresholdPercent)
	}
	if strings.Contains(off.output, "reason=DiskBudget") {
		t.Errorf("--disk-budget-percent=0 still stopped pulls:\n%s", off.output)
	}
}
