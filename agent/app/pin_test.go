package app

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/pin/pintest"
)

// pinRuntime is a fake containerd: CRI from critest (reporting containerd's
// runtime name), containerd's images API from pintest with a record for
// every image CRI holds or will pull, as containerd's CRI keeps them.
func pinRuntime(t *testing.T, refs ...string) (*critest.Server, *pintest.Server) {
	t.Helper()
	imgs := pintest.New()
	c := critest.Start(t, imgs.Register)
	c.SetRuntimeName(cri.RuntimeContainerd)
	for _, r := range refs {
		imgs.Add(r, map[string]string{"io.cri-containerd.image": "managed"})
	}
	return c, imgs
}

func newPinPrefetcher(t *testing.T, c *critest.Server, list string, pinImages bool) (*prefetcher, *bytes.Buffer) {
	t.Helper()
	o := testOptions(c.Path(), list)
	o.PinImages, o.ReleasePins = pinImages, true
	p, _, logs := newTestPrefetcher(t, o)
	return p, logs
}

func isPinnedBy(imgs *pintest.Server, ref, instance string) bool {
	l, _ := imgs.Labels(ref)
	return l[pin.PinLabel] == pin.PinValue && l[pin.OwnerLabel(instance)] != ""
}

// metricValue returns the value of the metric series name{labels} (a gauge or
// a counter); labels are name=value pairs.
func metricValue(t *testing.T, p *prefetcher, name string, labels ...string) float64 {
	t.Helper()
	families, err := p.metrics.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			for i := 0; i < len(labels); i += 2 {
				if got[labels[i]] != labels[i+1] {
					continue series
				}
			}
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s%v", name, labels)
	return 0
}

func TestPinImagesPinsWhatIsPresentAndReleasesWhatLeavesTheList(t *testing.T) {
	c, imgs := pinRuntime(t, present, pullable, missing)
	c.AddImage(present, critest.Image{Size: 10})
	c.OnPull(missing, critest.NotFound(missing))
	const unlisted = "registry.test/app/unlisted:1"
	imgs.Add(unlisted, nil)
	p, logs := newPinPrefetcher(t, c, writeList(t, present, pullable, missing), true)

	rep, err := p.pass(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.State != nodelabel.Failed {
		t.Errorf("state %s, want failed (pinning does not change what the label says)", rep.State)
	}
	for ref, want := range map[string]bool{present: true, pullable: true, missing: false, unlisted: false} {
		if got := isPinnedBy(imgs, ref, testInstance); got != want {
			t.Errorf("%s pinned = %v, want %v\n%s", ref, got, want, imgs)
		}
	}
	if got := metricValue(t, p, "image_prefetcher_pinned_images"); got != 2 {
		t.Errorf("pinned images gauge = %v, want 2", got)
	}
	if !strings.Contains(logs.String(), "msg=\"image pinned\" instance="+testInstance) {
		t.Errorf("no log line for a new pin:\n%s", logs)
	}

	// pullable leaves the list: unpinned; present stays pinned.
	p.opts.ImageList = writeList(t, present)
	if _, err := p.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if l, _ := imgs.Labels(pullable); len(l) != 1 {
		t.Errorf("%s left the list but still carries %v", pullable, l)
	}
	if !isPinnedBy(imgs, present, testInstance) {
		t.Errorf("%s lost its pin", present)
	}
	if got := metricValue(t, p, "image_prefetcher_pinned_images"); got != 1 {
		t.Errorf("pinned images gauge = %v, want 1", got)
	}

	// An empty list lets go of everything.
	p.opts.ImageList = writeList(t, "# nothing")
	if _, err := p.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if isPinnedBy(imgs, present, testInstance) {
		t.Errorf("%s still pinned with an empty list", present)
	}
}

func TestPinFailureDoesNotChangeTheLabel(t *testing.T) {
	c, imgs := pinRuntime(t, present)
	c.AddImage(present, critest.Image{Size: 10})
	imgs.FailUpdates(present, codes.Unavailable)
	p, logs := newPinPrefetcher(t, c, writeList(t, present), true)

	rep, err := p.pass(context.Background())
	if err != nil || rep.State != nodelabel.Succeeded || rep.LabelErr != nil {
		t.Fatalf("pass: state %s, err %v, label %v; want succeeded, written", rep.State, err, rep.LabelErr)
	}
	if got := metricValue(t, p, "image_prefetcher_pin_failures_total", "operation", "pin"); got != 1 {
		t.Errorf("pin failures = %v, want 1", got)
	}
	if !strings.Contains(logs.String(), "image pin failed") {
		t.Errorf("the pin failure is not logged:\n%s", logs)
	}

	// The next pass sets it.
	imgs.FailUpdates(present, codes.OK)
	if _, err := p.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !isPinnedBy(imgs, present, testInstance) {
		t.Errorf("%s not pinned once the runtime accepts the write", present)
	}
}

func TestPinImagesOffReleasesThisInstancesPins(t *testing.T) {
	c, imgs := pinRuntime(t, present, pullable)
	c.AddImage(present, critest.Image{Size: 10})
	c.AddImage(pullable, critest.Image{Size: 10})
	list := writeList(t, present, pullable)
	on, _ := newPinPrefetcher(t, c, list, true)
	if _, err := on.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Another instance pins one of them too.
	other := testOptions(c.Path(), list)
	other.Instance, other.PinImages = "other", true
	op, _, _ := newTestPrefetcher(t, other)
	if _, err := op.pass(context.Background()); err != nil {
		t.Fatal(err)
	}

	off, logs := newPinPrefetcher(t, c, list, false)
	if _, err := off.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{present, pullable} {
		l, _ := imgs.Labels(ref)
		if _, ok := l[pin.OwnerLabel(testInstance)]; ok {
			t.Errorf("%s still owned by %s with --pin-images=false: %v", ref, testInstance, l)
		}
		if !isPinnedBy(imgs, ref, "other") {
			t.Errorf("%s lost the pin the other instance wants: %v", ref, l)
		}
	}
	if !strings.Contains(logs.String(), "image released by this instance") {
		t.Errorf("no log line for the release:\n%s", logs)
	}
}

func TestPinImagesFailsThePassOnARuntimeWithoutContainerdsAPI(t *testing.T) {
	for _, tc := range []struct {
		name, runtime string
	}{
		{"CRI-O", cri.RuntimeCRIO},
		// A containerd-named runtime whose socket serves no images API
		// (critest serves CRI only): Unimplemented.
		{"no images service", cri.RuntimeContainerd},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := critest.Start(t)
			c.SetRuntimeName(tc.runtime)
			c.AddImage(present, critest.Image{Size: 10})
			list := writeList(t, present, pullable)
			p, _ := newPinPrefetcher(t, c, list, true)
			rep, err := p.pass(context.Background())
			if err == nil || rep.State != nodelabel.Failed {
				t.Fatalf("pass with --pin-images: state %s, err %v; want failed with an error", rep.State, err)
			}
			for _, want := range []string{"--pin-images", "pinned_images", "PinnedImageSet"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %s", err, want)
				}
			}
			if n := c.TotalPullCalls(); n != 0 {
				t.Errorf("%d pulls: the pass must fail at its start", n)
			}

			// Off, the same runtime is fine.
			p, logs := newPinPrefetcher(t, c, list, false)
			if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
				t.Errorf("pass without --pin-images: state %s, err %v", rep.State, err)
			}
			if strings.Contains(logs.String(), "level=ERROR") {
				t.Errorf("errors logged without --pin-images:\n%s", logs)
			}
		})
	}
}

func TestPinImagesNeedsAnInstance(t *testing.T) {
	var stderr bytes.Buffer
	code := Main([]string{"fetch", "--label=false", "--pin-images", "--image-list-file", writeList(t, present)}, &stderr, &stderr)
	if code != ExitUsage || !strings.Contains(stderr.String(), "--pin-images needs --instance") {
		t.Errorf("exit %d, output %q; want a usage error naming --instance", code, stderr.String())
	}
}

// (b) With --pin-images each image is pinned as soon as it is present (found
// present, or right after its pull), before the next image's pull starts:
// the pulls that follow fill the disk, and the kubelet's GC they may start
// must find the images already there pinned.
func TestEachImageIsPinnedBeforeTheNextPullStarts(t *testing.T) {
	const third = "registry.test/app/third:1"
	c, imgs := pinRuntime(t, present, pullable, third)
	c.AddImage(present, critest.Image{Size: 10})
	var mu sync.Mutex
	pinnedAt := map[string][]string{} // the images pinned when each pull started
	seen := func(ref string) func() {
		return func() {
			var pinned []string
			for _, r := range []string{present, pullable, third} {
				if isPinnedBy(imgs, r, testInstance) {
					pinned = append(pinned, r)
				}
			}
			mu.Lock()
			pinnedAt[ref] = pinned
			mu.Unlock()
		}
	}
	c.OnPull(pullable, critest.Succeed().Doing(seen(pullable)))
	c.OnPull(third, critest.Succeed().Doing(seen(third)))
	o := testOptions(c.Path(), writeList(t, present, pullable, third))
	o.PinImages, o.Pull.MaxParallel = true, 1
	p, _, logs := newTestPrefetcher(t, o)

	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("pass: %s %v\n%s", rep.State, err, logs)
	}
	mu.Lock()
	defer mu.Unlock()
	if got := pinnedAt[pullable]; !slices.Equal(got, []string{present}) {
		t.Errorf("pinned when %s's pull started: %v, want %s (found present before it)", pullable, got, present)
	}
	if got := pinnedAt[third]; !slices.Equal(got, []string{present, pullable}) {
		t.Errorf("pinned when %s's pull started: %v, want %s and %s (pulled before it)", third, got, present, pullable)
	}
	for _, r := range []string{present, pullable, third} {
		if !isPinnedBy(imgs, r, testInstance) {
			t.Errorf("%s not pinned after the pass", r)
		}
	}
	// The next pass finds them pinned and present: no pin writes at all.
	before := imgs.Updates()
	if _, err := p.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := imgs.Updates() - before; n != 0 {
		t.Errorf("a steady pass wrote %d pin labels", n)
	}
}

// The runtime is reached over one connection: CRI, containerd's images API
// (pins) and its leases and content APIs (progress) share it, across passes.
// cri.Dial's probe connect before it is the only other one.
func TestOneRuntimeConnection(t *testing.T) {
	c, imgs := pinRuntime(t, present, pullable)
	c.AddImage(present, critest.Image{Size: 10})
	p, _ := newPinPrefetcher(t, c, writeList(t, present, pullable), true)
	for range 3 {
		if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
			t.Fatalf("pass: %s, %v", rep.State, err)
		}
	}
	if !isPinnedBy(imgs, pullable, testInstance) || p.progress.source == nil {
		t.Fatalf("pins and progress not in use: pinned %v, progress %v", isPinnedBy(imgs, pullable, testInstance), p.progress.source != nil)
	}
	if got := c.Accepted(); got != 2 {
		t.Errorf("connections to the runtime's socket: %d, want 2 (cri.Dial's probe and the one gRPC connection)", got)
	}
}

// A fetch of the instance beside its run (an init container, a Job) only adds
// pins: a shorter list or --pin-images=false releases nothing of what run
// pinned. With --release-pins it lets go as run does.
func TestFetchReleasesPinsOnlyWhenTold(t *testing.T) {
	c, imgs := pinRuntime(t, present, pullable)
	c.AddImage(present, critest.Image{Size: 10})
	c.AddImage(pullable, critest.Image{Size: 10})
	o := testOptions(c.Path(), writeList(t, present, pullable))
	o.PinImages, o.Run = true, &RunOptions{RecheckInterval: time.Hour}
	run, _, _ := newTestPrefetcher(t, o)
	if _, err := run.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	fetch := func(pinImages, release bool, list ...string) {
		t.Helper()
		o := testOptions(c.Path(), writeList(t, list...))
		o.PinImages, o.ReleasePins = pinImages, release
		p, _, _ := newTestPrefetcher(t, o)
		if _, err := p.pass(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	fetch(true, false, present)
	fetch(false, false, present)
	for _, ref := range []string{present, pullable} {
		if !isPinnedBy(imgs, ref, testInstance) {
			t.Errorf("%s released by a fetch without --release-pins\n%s", ref, imgs)
		}
	}
	fetch(false, true, "# nothing")
	for _, ref := range []string{present, pullable} {
		if isPinnedBy(imgs, ref, testInstance) {
			t.Errorf("%s still pinned after fetch --release-pins --pin-images=false\n%s", ref, imgs)
		}
	}
}
