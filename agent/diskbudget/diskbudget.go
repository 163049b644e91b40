// Package diskbudget keeps a prefetch from filling the node's image
// filesystem past the point where the kubelet starts deleting images.
//
// The kubelet's image GC runs when the image filesystem's use reaches
// imageGCHighThresholdPercent (85 by default) and deletes unused images until
// the use is down to imageGCLowThresholdPercent (80 by default). A prefetch
// that pushes the filesystem over the high mark makes the kubelet delete the
// node's other images, or images of the list itself. The budget is a use
// percent, computed as the kubelet computes it (100 - available*100/capacity,
// from statfs of the filesystem the runtime reports in CRI ImageFsInfo): a
// pull starts only while the use is below it. The default is the kubelet's
// default low mark, which leaves the band up to the high mark to the pulls
// already running.
package diskbudget

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// DefaultPercent is the kubelet's default imageGCLowThresholdPercent.
const DefaultPercent = 80

// FlagName is the flag that sets Config.Percent; messages name it.
const FlagName = "disk-budget-percent"

// Config is the budget's flag.
type Config struct {
	// Percent of the image filesystem's capacity at or above which no pull
	// starts; 0 turns the budget off.
	Percent int
}

// DefaultConfig is the budget on by default.
func DefaultConfig() Config { return Config{Percent: DefaultPercent} }

// AddFlags registers the budget's flag on fs.
func (c *Config) AddFlags(fs *pflag.FlagSet) {
	fs.IntVar(&c.Percent, FlagName, c.Percent,
		"Start no pull while the node's image filesystem is this percent full or more (as the kubelet counts it; read by statfs of the filesystem CRI ImageFsInfo names, below --host-root). "+
			"Set it at or below the kubelet's imageGCLowThresholdPercent (default 80) so that prefetching never makes the kubelet's image GC delete other images; 0 turns it off.")
}

// Validate checks the flag's range.
func (c *Config) Validate() error {
	if c.Percent < 0 || c.Percent > 100 {
		return fmt.Errorf("--%s=%d: must be between 0 (off) and 100", FlagName, c.Percent)
	}
	return nil
}

// Space is a filesystem's size as statfs gives it.
type Space struct {
	Capacity  uint64 // bytes
	Available uint64 // bytes an unprivileged writer may still use
}

// UsedPercent is the kubelet's measure of use: what is not available, in
// whole percent of the capacity, rounded up.
func (s Space) UsedPercent() int {
	if s.Capacity == 0 {
		return 0
	}
	return 100 - int(s.Available*100/s.Capacity)
}

// Used is the bytes not available.
func (s Space) Used() uint64 { return s.Capacity - min(s.Available, s.Capacity) }

// OverError says that a filesystem is at or over the budget. Its text names
// the filesystem, the budget, and the bytes to free before pulls start again.
type OverError struct {
	Path    string // the runtime's path of the image filesystem
	Percent int    // the budget
	Space   Space
}

func (e *OverError) Error() string {
	budget := e.Space.Capacity * uint64(e.Percent) / 100
	return fmt.Sprintf("image filesystem %s is %d%% full (%s used of %s), at or over the disk budget of %d%% (%s, --%s): "+
		"no pull starts until %s are freed, so that prefetching does not make the kubelet's image GC delete images",
		e.Path, e.Space.UsedPercent(), mib(e.Space.Used()), mib(e.Space.Capacity), e.Percent, mib(budget), FlagName,
		mib(e.ToFree()))
}

// ToFree is how many bytes must be freed before a pull starts again: the
// least available space whose use, counted as the kubelet counts it, is
// below the budget.
func (e *OverError) ToFree() uint64 {
	if e.Percent == 0 || e.Space.Capacity == 0 {
		return 0
	}
	// UsedPercent < Percent  <=>  Available*100/Capacity >= 101-Percent.
	want := (e.Space.Capacity*uint64(101-e.Percent) + 99) / 100
	return want - min(want, e.Space.Available)
}

// ErrNotVisible: the image filesystem the runtime names is not mounted in
// the agent's view of the host, so its space cannot be read.
var ErrNotVisible = errors.New("image filesystem not visible below --host-root")

// Checker reads the image filesystems' space and admits pulls under the
// budget. Refresh learns the filesystems (once per pass); Admit is cheap (one
// statfs each) and runs before every pull attempt.
type Checker struct {
	Percent  int
	HostRoot string
	Images   runtimeapi.ImageServiceClient
	Timeout  time.Duration
	// Statfs reads a path's filesystem; nil means unix.Statfs.
	Statfs func(path string) (Space, error)

	paths []string // the runtime's paths of its image filesystems
}

// Refresh asks the runtime where its image filesystems are and checks that
// each is visible below HostRoot. Until a Refresh succeeds Admit admits
// everything: a budget that cannot be read must not stop the node's pulls.
func (c *Checker) Refresh(ctx context.Context) error {
	c.paths = nil
	if c.Percent == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()
	resp, err := c.Images.ImageFsInfo(ctx, &runtimeapi.ImageFsInfoRequest{})
	if err != nil {
		return fmt.Errorf("image filesystem info: %w", err)
	}
	var paths []string
	for _, f := range resp.GetImageFilesystems() {
		if p := f.GetFsId().GetMountpoint(); p != "" && !slices.Contains(paths, p) {
			paths = append(paths, p)
		}
	}
	if len(paths) == 0 {
		return errors.New("image filesystem info: the runtime names no image filesystem")
	}
	for _, p := range paths {
		if _, err := c.statfs(p); err != nil {
			return err
		}
	}
	c.paths = paths
	return nil
}

// Admit returns an *OverError when an image filesystem is at or over the
// budget, else nil. A filesystem whose space cannot be read any more admits:
// the next Refresh says why.
func (c *Checker) Admit() error {
	for _, p := range c.paths {
		s, err := c.statfs(p)
		if err != nil {
			continue
		}
		if s.UsedPercent() >= c.Percent {
			return &OverError{Path: p, Percent: c.Percent, Space: s}
		}
	}
	return nil
}

// Paths are the image filesystems the last Refresh found, as the runtime
// names them.
func (c *Checker) Paths() []string { return slices.Clone(c.paths) }

// statfs reads the filesystem of the runtime's path as seen below HostRoot.
// A path that is not a mount of its own there (the DaemonSet mounts nothing
// at it, only a directory the runtime made to hold another mount) would be
// the agent's own root filesystem: that counts as not visible, never as the
// image filesystem. Running on the host (HostRoot /) every path is the real one.
func (c *Checker) statfs(path string) (Space, error) {
	seen := filepath.Join(c.HostRoot, path)
	read := c.Statfs
	if read == nil {
		read = statfs
	}
	s, err := read(seen)
	if err == nil && filepath.Clean(c.HostRoot) != "/" && c.Statfs == nil {
		err = notOwnRoot(seen)
	}
	if err != nil {
		return Space{}, fmt.Errorf("%w: %s (as %s): %w", ErrNotVisible, path, seen, err)
	}
	return s, nil
}

// notOwnRoot fails when path lies on the same filesystem as / (in a
// container: the agent's image, not the host's).
func notOwnRoot(path string) error {
	var own, at unix.Stat_t
	if err := unix.Stat("/", &own); err != nil {
		return &fs.PathError{Op: "stat", Path: "/", Err: err}
	}
	if err := unix.Stat(path, &at); err != nil {
		return &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if own.Dev == at.Dev {
		return errors.New("not a mount of the host's: it is on the agent's own root filesystem")
	}
	return nil
}

func statfs(path string) (Space, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return Space{}, &fs.PathError{Op: "statfs", Path: path, Err: err}
	}
	bsize := uint64(st.Bsize) //nolint:gosec // a block size is never negative
	return Space{Capacity: st.Blocks * bsize, Available: st.Bavail * bsize}, nil
}

// mib prints n in MiB, for messages.
func mib(n uint64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
