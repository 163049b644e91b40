package diskbudget

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The kubelet's image GC computes use as 100 - available*100/capacity with
// integer division (pkg/kubelet/images/image_gc_manager.go): the budget must
// count the same way, or it stops pulls at a different point than the one
// it guards.
func TestUsedPercentCountsLikeTheKubelet(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		capacity, available uint64
		want                int
	}{
		{100, 100, 0},
		{100, 0, 100},
		{100, 20, 80},
		{1000, 201, 80}, // 20.1 % available: 100 - 20 = 80
		{1000, 199, 81}, // 19.9 % available: 100 - 19 = 81
		{0, 0, 0},       // no filesystem: nothing to guard
	} {
		if got := (Space{Capacity: c.capacity, Available: c.available}).UsedPercent(); got != c.want {
			t.Errorf("UsedPercent(capacity %d, available %d) = %d, want %d", c.capacity, c.available, got, c.want)
		}
	}
}

// fsInfo answers ImageFsInfo with the given mountpoints, or err.
type fsInfo struct {
	runtimeapi.ImageServiceClient
	mounts []string
	err    error
	calls  int
}

func (f *fsInfo) ImageFsInfo(context.Context, *runtimeapi.ImageFsInfoRequest, ...grpc.CallOption) (*runtimeapi.ImageFsInfoResponse, error) {
	f.calls++
	if f.err != nil {
		return nil, f.err
	}
	resp := &runtimeapi.ImageFsInfoResponse{}
	for _, m := range f.mounts {
		resp.ImageFilesystems = append(resp.ImageFilesystems, &runtimeapi.FilesystemUsage{
			FsId: &runtimeapi.FilesystemIdentifier{Mountpoint: m}})
	}
	return resp, nil
}

func TestAdmitStopsAtTheBudget(t *testing.T) {
	t.Parallel()
	space := map[string]Space{}
	c := &Checker{Percent: 80, HostRoot: "/host", Timeout: time.Second,
		Images: &fsInfo{mounts: []string{"/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs", "/var/lib/images"}},
		Statfs: func(p string) (Space, error) {
			s, ok := space[p]
			if !ok {
				return Space{}, os.ErrNotExist
			}
			return s, nil
		}}
	const snap = "/host/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs"
	space[snap] = Space{Capacity: 1000 << 20, Available: 500 << 20}
	space["/host/var/lib/images"] = Space{Capacity: 100, Available: 100}
	if err := c.Refresh(context.Background()); err != nil {
		t.Fatalf("Refresh: %v", err)
	}
	if err := c.Admit(); err != nil {
		t.Fatalf("Admit at 50%%: %v", err)
	}
	space[snap] = Space{Capacity: 1000 << 20, Available: 201 << 20} // 80 %
	err := c.Admit()
	var over *OverError
	if !errors.As(err, &over) {
		t.Fatalf("Admit at 80%% of a budget of 80%% = %v, want an *OverError", err)
	}
	for _, want := range []string{
		"/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs", "80% full", "799.0 MiB used of 1000.0 MiB",
		"disk budget of 80% (800.0 MiB, --disk-budget-percent)", "until 9.0 MiB are freed",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	space[snap] = Space{Capacity: 1000 << 20, Available: 100 << 20}
	if err := c.Admit(); err == nil || !strings.Contains(err.Error(), "until 110.0 MiB are freed") {
		t.Errorf("Admit at 90%% = %v, want the 110 MiB to free named (to 79%%)", err)
	}
	// Freeing what it names admits again.
	space[snap] = Space{Capacity: 1000 << 20, Available: 210 << 20}
	if err := c.Admit(); err != nil {
		t.Errorf("Admit after freeing what was named = %v", err)
	}
	// The second filesystem counts as well.
	space[snap] = Space{Capacity: 1000, Available: 1000}
	space["/host/var/lib/images"] = Space{Capacity: 100, Available: 5}
	if err := c.Admit(); err == nil || !strings.Contains(err.Error(), "/var/lib/images is 95% full") {
		t.Errorf("Admit with the second filesystem at 95%% = %v", err)
	}
}

func TestRefreshSaysWhyTheBudgetCannotBeRead(t *testing.T) {
	t.Parallel()
	statfs := func(string) (Space, error) { return Space{}, os.ErrNotExist }
	c := &Checker{Percent: 80, HostRoot: "/host", Timeout: time.Second,
		Images: &fsInfo{mounts: []string{"/var/lib/containerd"}}, Statfs: statfs}
	err := c.Refresh(context.Background())
	if !errors.Is(err, ErrNotVisible) || !strings.Contains(err.Error(), "/var/lib/containerd (as /host/var/lib/containerd)") {
		t.Errorf("Refresh with the filesystem not mounted = %v, want ErrNotVisible naming both paths", err)
	}
	if err := c.Admit(); err != nil {
		t.Errorf("Admit with an unreadable budget = %v, want nil (pulls go on)", err)
	}

	c.Images = &fsInfo{err: errors.New("unimplemented")}
	if err := c.Refresh(context.Background()); err == nil || !strings.Contains(err.Error(), "image filesystem info: unimplemented") {
		t.Errorf("Refresh with ImageFsInfo failing = %v", err)
	}
	c.Images = &fsInfo{}
	if err := c.Refresh(context.Background()); err == nil || !strings.Contains(err.Error(), "names no image filesystem") {
		t.Errorf("Refresh with no filesystem named = %v", err)
	}
}

func TestOffAsksNothing(t *testing.T) {
	t.Parallel()
	info := &fsInfo{mounts: []string{"/x"}}
	c := &Checker{Percent: 0, Images: info, Timeout: time.Second,
		Statfs: func(string) (Space, error) { return Space{Capacity: 1, Available: 0}, nil }}
	if err := c.Refresh(context.Background()); err != nil || info.calls != 0 {
		t.Errorf("Refresh off = %v after %d ImageFsInfo calls, want nil after none", err, info.calls)
	}
	if err := c.Admit(); err != nil {
		t.Errorf("Admit off = %v", err)
	}
}

// The real statfs reads the filesystem of a mount below the host root: here
// /dev/shm (a tmpfs of its own) seen with --host-root=/dev.
func TestStatfsReadsARealFilesystem(t *testing.T) {
	t.Parallel()
	c := &Checker{Percent: 100, HostRoot: "/dev", Timeout: time.Second, Images: &fsInfo{mounts: []string{"/shm"}}}
	if err := c.Refresh(context.Background()); err != nil {
		t.Fatalf("Refresh: %v", err)
	}
	s, err := c.statfs("/shm")
	if err != nil || s.Capacity == 0 || s.Available > s.Capacity {
		t.Errorf("statfs = %+v, %v; want a capacity with no more available than it", s, err)
	}
	c.Images = &fsInfo{mounts: []string{"/no-such-dir"}}
	if err := c.Refresh(context.Background()); !errors.Is(err, ErrNotVisible) {
		t.Errorf("Refresh with the directory missing = %v, want ErrNotVisible", err)
	}
}

// In a container, a directory below the host root that is not a mount (the
// runtime made it to hold a mount further down, or the image has it) is on
// the agent's own root filesystem: its space says nothing of the host's.
func TestAPathOnTheAgentsOwnRootIsNotTheImageFilesystem(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	var own, tmp unix.Stat_t
	if unix.Stat("/", &own) != nil || unix.Stat(root, &tmp) != nil || own.Dev != tmp.Dev {
		t.Fatalf("the test needs a temporary directory on the root filesystem (TMPDIR=%s is elsewhere)", root)
	}
	if err := os.MkdirAll(filepath.Join(root, "var/lib/containerd"), 0o755); err != nil {
		t.Fatal(err)
	}
	c := &Checker{Percent: 80, HostRoot: root, Timeout: time.Second, Images: &fsInfo{mounts: []string{"/var/lib/containerd"}}}
	err := c.Refresh(context.Background())
	if !errors.Is(err, ErrNotVisible) || !strings.Contains(err.Error(), "agent's own root filesystem") {
		t.Errorf("Refresh of a directory on / = %v, want ErrNotVisible saying it is the agent's own root", err)
	}
	// On the host (--host-root=/) the path is the real one.
	c.HostRoot, c.Images = "/", &fsInfo{mounts: []string{filepath.Join(root, "var/lib/containerd")}}
	if err := c.Refresh(context.Background()); err != nil {
		t.Errorf("Refresh with --host-root=/ = %v", err)
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	for _, p := range []int{0, 1, 80, 100} {
		if err := (&Config{Percent: p}).Validate(); err != nil {
			t.Errorf("Validate(%d) = %v", p, err)
		}
	}
	for _, p := range []int{-1, 101} {
		if err := (&Config{Percent: p}).Validate(); err == nil || !strings.Contains(err.Error(), "--disk-budget-percent") {
			t.Errorf("Validate(%d) = %v, want an error naming the flag", p, err)
		}
	}
}
