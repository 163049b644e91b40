package pin_test

import (
	"context"
	"errors"
	"maps"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/pin/pintest"
)

const (
	imgA    = "registry.example.com/team/a:1"
	imgB    = "registry.example.com/team/b@sha256:1111111111111111111111111111111111111111111111111111111111111111"
	imgC    = "registry.example.com/team/c:1"
	sandbox = "registry.k8s.io/pause:3.10"
)

// criLabels is what containerd's CRI puts on every record it creates.
var criLabels = map[string]string{"io.cri-containerd.image": "managed"}

func TestRecordName(t *testing.T) {
	t.Parallel()
	const digest = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	for in, want := range map[string]string{
		"busybox":                          "docker.io/library/busybox:latest",
		"docker.io/library/busybox:1.36":   "docker.io/library/busybox:1.36",
		"registry.example.com:5000/x:1":    "registry.example.com:5000/x:1",
		"registry.example.com/x@" + digest: "registry.example.com/x@" + digest,
		// CRI stores a reference with both a tag and a digest under its digest.
		"registry.example.com/x:1@" + digest: "registry.example.com/x@" + digest,
	} {
		got, err := pin.RecordName(in)
		if err != nil || got != want {
			t.Errorf("RecordName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := pin.RecordName("Not A Reference"); err == nil {
		t.Errorf("RecordName of a malformed reference: no error")
	}
}

func newPinner(t *testing.T, srv *pintest.Server, instance string) *pin.Pinner {
	t.Helper()
	return &pin.Pinner{Client: pin.NewClient(pintest.Dial(t, srv.Path()), 0), Instance: instance}
}

func reconcile(t *testing.T, p *pin.Pinner, pinNames, keep []string) pin.Report {
	t.Helper()
	rep, err := p.Reconcile(context.Background(), pinNames, keep)
	if err != nil {
		t.Fatalf("Reconcile(%v, %v) for %s: %v", pinNames, keep, p.Instance, err)
	}
	for _, f := range rep.Failures {
		t.Errorf("Reconcile for %s: %s %s failed: %v", p.Instance, f.Op, f.Image, f.Err)
	}
	return rep
}

// labelsOf returns the record's labels, failing the test when it is gone.
func labelsOf(t *testing.T, srv *pintest.Server, name string) map[string]string {
	t.Helper()
	l, ok := srv.Labels(name)
	if !ok {
		t.Fatalf("record %s is gone", name)
	}
	return l
}

func with(base map[string]string, kv ...string) map[string]string {
	out := maps.Clone(base)
	for i := 0; i < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

func wantLabels(t *testing.T, srv *pintest.Server, name string, want map[string]string) {
	t.Helper()
	if got := labelsOf(t, srv, name); !reflect.DeepEqual(got, want) {
		t.Errorf("labels of %s = %v, want %v", name, got, want)
	}
}

func wantChanges(t *testing.T, rep pin.Report, want ...pin.Change) {
	t.Helper()
	if !slices.Equal(rep.Changes, want) {
		t.Errorf("changes %v, want %v", rep.Changes, want)
	}
}

func TestPinsExactlyTheListedImagesAndSteadyStateWritesNothing(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	for _, n := range []string{imgA, imgB, imgC} {
		srv.Add(n, criLabels)
	}
	p := newPinner(t, srv, "team-a")
	rep := reconcile(t, p, []string{imgA, imgB}, nil)
	if rep.Pinned != 2 {
		t.Errorf("Pinned = %d, want 2", rep.Pinned)
	}
	wantChanges(t, rep, pin.Change{Image: imgA, Action: pin.Set}, pin.Change{Image: imgB, Action: pin.Set})
	ours := with(criLabels, pin.PinLabel, pin.PinValue, pin.SetLabel, "true", pin.OwnerLabel("team-a"), "true")
	wantLabels(t, srv, imgA, ours)
	wantLabels(t, srv, imgB, ours)
	wantLabels(t, srv, imgC, criLabels)

	writes := srv.Updates()
	rep = reconcile(t, p, []string{imgA, imgB}, nil)
	if rep.Pinned != 2 || len(rep.Changes) != 0 || srv.Updates() != writes {
		t.Errorf("second pass: pinned %d, changes %v, %d writes; want 2 pinned and no write", rep.Pinned, rep.Changes, srv.Updates()-writes)
	}
}

func TestImageLeavingTheListIsUnpinned(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	srv.Add(imgA, criLabels)
	srv.Add(imgB, with(criLabels, "other.example.com/keep", "x"))
	p := newPinner(t, srv, "team-a")
	reconcile(t, p, []string{imgA, imgB}, nil)

	rep := reconcile(t, p, []string{imgA}, nil)
	wantChanges(t, rep, pin.Change{Image: imgB, Action: pin.Unpinned})
	// Only our labels go; anyone else's stay.
	wantLabels(t, srv, imgB, with(criLabels, "other.example.com/keep", "x"))
	if l := labelsOf(t, srv, imgA); l[pin.PinLabel] != pin.PinValue {
		t.Errorf("the image still listed lost its pin: %v", l)
	}
}

func TestKeptWhileAnotherInstanceListsIt(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	srv.Add(imgA, criLabels)
	a, b := newPinner(t, srv, "team-a"), newPinner(t, srv, "team-b")
	wantChanges(t, reconcile(t, a, []string{imgA}, nil), pin.Change{Image: imgA, Action: pin.Set})
	wantChanges(t, reconcile(t, b, []string{imgA}, nil), pin.Change{Image: imgA, Action: pin.Claimed})

	wantChanges(t, reconcile(t, a, nil, nil), pin.Change{Image: imgA, Action: pin.Released})
	wantLabels(t, srv, imgA, with(criLabels, pin.PinLabel, pin.PinValue, pin.SetLabel, "true", pin.OwnerLabel("team-b"), "true"))

	// The last instance to let go removes the pin image-prefetcher set.
	wantChanges(t, reconcile(t, b, nil, nil), pin.Change{Image: imgA, Action: pin.Unpinned})
	wantLabels(t, srv, imgA, criLabels)
}

func TestAPinWeDidNotSetIsNeverRemoved(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	// containerd pins its sandbox image itself.
	sandboxLabels := with(criLabels, pin.PinLabel, pin.PinValue)
	srv.Add(sandbox, sandboxLabels)
	srv.Add(imgA, criLabels)
	p := newPinner(t, srv, "team-a")

	// Not listed: not even looked at.
	reconcile(t, p, []string{imgA}, nil)
	wantLabels(t, srv, sandbox, sandboxLabels)

	// Listed, then not: our ownership comes and goes, the pin stays.
	wantChanges(t, reconcile(t, p, []string{imgA, sandbox}, nil), pin.Change{Image: sandbox, Action: pin.Claimed})
	wantChanges(t, reconcile(t, p, nil, nil),
		pin.Change{Image: imgA, Action: pin.Unpinned}, pin.Change{Image: sandbox, Action: pin.Released})
	wantLabels(t, srv, sandbox, sandboxLabels)
	wantLabels(t, srv, imgA, criLabels)
}

func TestRemovedPinIsRepaired(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	srv.Add(imgA, criLabels)
	p := newPinner(t, srv, "team-a")
	reconcile(t, p, []string{imgA}, nil)
	srv.SetLabel(imgA, pin.PinLabel, "")

	rep := reconcile(t, p, []string{imgA}, nil)
	wantChanges(t, rep, pin.Change{Image: imgA, Action: pin.Repaired})
	if l := labelsOf(t, srv, imgA); l[pin.PinLabel] != pin.PinValue {
		t.Errorf("pin not repaired: %v", l)
	}
}

func TestKeptImagesAreNotReleased(t *testing.T) {
	t.Parallel()
	// An image still listed whose pull failed this pass (so it is not asked
	// to be pinned) keeps the pin it has.
	srv := pintest.Start(t)
	srv.Add(imgA, criLabels)
	p := newPinner(t, srv, "team-a")
	reconcile(t, p, []string{imgA}, nil)
	wantChanges(t, reconcile(t, p, nil, []string{imgA}))
	if l := labelsOf(t, srv, imgA); l[pin.PinLabel] != pin.PinValue || l[pin.OwnerLabel("team-a")] == "" {
		t.Errorf("a kept image lost its pin: %v", l)
	}
}

func TestFailuresAreReportedAndTheRestIsDone(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	srv.Add(imgA, criLabels)
	srv.Add(imgB, criLabels)
	srv.Add(imgC, criLabels)
	p := newPinner(t, srv, "team-a")
	reconcile(t, p, []string{imgC}, nil)
	srv.FailUpdates(imgA, codes.Unavailable)
	srv.FailUpdates(imgC, codes.Unavailable)

	const missing = "registry.example.com/team/gone:1"
	rep, err := p.Reconcile(context.Background(), []string{imgA, missing, imgB}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Pinned != 1 {
		t.Errorf("Pinned = %d, want 1 (only %s could be written)", rep.Pinned, imgB)
	}
	wantChanges(t, rep, pin.Change{Image: imgB, Action: pin.Set})
	got := map[string]pin.Op{}
	for _, f := range rep.Failures {
		got[f.Image] = f.Op
		if !strings.Contains(f.Err.Error(), f.Image) {
			t.Errorf("failure %v does not name the image", f.Err)
		}
	}
	want := map[string]pin.Op{imgA: pin.OpPin, missing: pin.OpPin, imgC: pin.OpRelease}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("failures %v, want %v", got, want)
	}
}

func TestRecordRemovedBeforeReleaseIsReleased(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	srv.Add(imgA, criLabels)
	p := newPinner(t, srv, "team-a")
	reconcile(t, p, []string{imgA}, nil)
	srv.Remove(imgA)
	wantChanges(t, reconcile(t, p, nil, nil))
}

func TestNoImagesAPIIsUnsupported(t *testing.T) {
	t.Parallel()
	// A gRPC server that serves no containerd images service, like CRI-O's
	// socket.
	dir, err := os.MkdirTemp("", "pin") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "crio.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	go s.Serve(l)
	t.Cleanup(s.Stop)
	c := pin.NewClient(pintest.Dial(t, path), 0)
	_, err = (&pin.Pinner{Client: c, Instance: "team-a"}).Reconcile(context.Background(), []string{imgA}, nil)
	if !errors.Is(err, pin.ErrUnsupported) {
		t.Errorf("Reconcile against a socket without the images API: %v, want ErrUnsupported", err)
	}
}

func TestOwned(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	for _, n := range []string{imgC, imgA, imgB} {
		srv.Add(n, criLabels)
	}
	a, b := newPinner(t, srv, "team-a"), newPinner(t, srv, "team-b")
	reconcile(t, a, []string{imgC, imgA}, nil)
	reconcile(t, b, []string{imgB}, nil)
	got, err := a.Owned(context.Background())
	if err != nil || !slices.Equal(got, []string{imgA, imgC}) {
		t.Errorf("Owned = %v, %v; want [%s %s]", got, err, imgA, imgC)
	}
}

// An operator who removes the pin-set mark from a pin this instance set makes
// the pin theirs: letting go of the image leaves it pinned.
func TestPinMadeTheOperatorsStays(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	srv.Add(imgA, criLabels)
	p := newPinner(t, srv, "team-a")
	reconcile(t, p, []string{imgA}, nil)
	srv.SetLabel(imgA, pin.SetLabel, "")
	rep := reconcile(t, p, nil, nil)
	wantChanges(t, rep, pin.Change{Image: imgA, Action: pin.Released})
	wantLabels(t, srv, imgA, with(criLabels, pin.PinLabel, pin.PinValue))
}
