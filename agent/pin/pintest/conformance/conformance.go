// Package conformance holds the behaviour of containerd's images API that
// the pin package relies on, as one suite that runs against the fake
// (pintest, in the unit tests) and against the e2e harness's real
// containerds (2.x and 1.6). On CRI-O, which has no such API, only the case
// that the agent sees the API missing runs (Run says so in the test log).
package conformance

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	"github.com/containerd/containerd/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	criconformance "github.com/nodeprefetch/image-prefetcher/agent/cri/critest/conformance"
	"github.com/nodeprefetch/image-prefetcher/agent/pin"
)

// The runtimes a Target can be: the real ones as the CRI suite names them,
// and this suite's fake.
const (
	Containerd   = criconformance.Containerd
	Containerd16 = criconformance.Containerd16
	CRIO         = criconformance.CRIO
	Fake         = "pintest"
)

// Image is a pullable image: its tagged reference and its repository with
// the manifest digest.
type Image struct {
	Ref, DigestRef string
}

// Target is the runtime under test.
type Target struct {
	Runtime string
	// Conn is a connection to the runtime's socket (the agent's one
	// connection, cri.Client.Conn).
	Conn grpc.ClientConnInterface
	// Image is pulled and labelled by the suite; nothing else may use it
	// while the suite runs.
	Image Image
	// Pull makes ref present as a CRI PullImage does (on the fake: the
	// image records containerd's CRI would create).
	Pull func(ctx context.Context, ref string) error
}

// Run runs the suite against target. On CRI-O only Unsupported runs.
func Run(t *testing.T, target Target) {
	t.Helper()
	switch target.Runtime {
	case CRIO:
		t.Logf("%s serves no containerd images API: only the case that the agent sees it missing runs here; "+
			"the records, labels and pins cases are containerd's and the fake's", target.Runtime)
		t.Run("Unsupported", func(t *testing.T) { RunUnsupported(t, target.Conn) })
		return
	case Containerd, Containerd16, Fake:
	default:
		t.Fatalf("unknown runtime %q", target.Runtime)
	}
	t.Run("NamespaceRequired", func(t *testing.T) { testNamespaceRequired(t, target) })
	t.Run("MissingRecord", func(t *testing.T) { testMissingRecord(t, target) })
	recs := &records{client: imagesapi.NewImagesClient(target.Conn)}
	names := pullRecords(t, target, recs)
	t.Run("RecordsOfAPull", func(t *testing.T) { testRecordsOfAPull(t, target, recs, names) })
	t.Run("UpdateSingleLabels", func(t *testing.T) { testUpdateSingleLabels(t, recs, names[0]) })
	t.Run("ListByLabelPresence", func(t *testing.T) { testListByLabelPresence(t, recs, names) })
	t.Run("Reconcile", func(t *testing.T) { testReconcile(t, target, names[0]) })
}

// RunUnsupported: on a socket without containerd's images API (CRI-O, or a
// fake CRI alone) the pinner says so with pin.ErrUnsupported, so that the
// agent reports --pin-images as unsupported instead of failing each image.
func RunUnsupported(t *testing.T, conn grpc.ClientConnInterface) {
	p := &pin.Pinner{Client: pin.NewClient(conn, 0), Instance: "conformance"}
	_, err := p.Reconcile(ctxFor(t), nil, nil)
	t.Logf("Reconcile without the images API: %v", err)
	if !errors.Is(err, pin.ErrUnsupported) {
		t.Errorf("Reconcile = %v, want pin.ErrUnsupported", err)
	}
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// records calls the images API in pin.Namespace.
type records struct {
	client imagesapi.ImagesClient
}

func (r *records) ctx(t *testing.T) context.Context {
	return metadata.AppendToOutgoingContext(ctxFor(t), pin.NamespaceHeader, pin.Namespace)
}

func (r *records) get(t *testing.T, name string) *imagesapi.Image {
	t.Helper()
	resp, err := r.client.Get(r.ctx(t), &imagesapi.GetImageRequest{Name: name})
	if err != nil {
		t.Fatalf("get image record %s: %v", name, err)
	}
	return resp.GetImage()
}

// update sets (value not empty) or removes the labels of the record name
// named in mask, sending labels as the request's; the record's target goes
// along, as the pin package sends it (containerd 2.2.1 crashes without).
func (r *records) update(t *testing.T, name string, labels map[string]string, mask ...string) *imagesapi.Image {
	t.Helper()
	target := r.get(t, name).GetTarget()
	resp, err := r.client.Update(r.ctx(t), &imagesapi.UpdateImageRequest{
		Image:      &imagesapi.Image{Name: name, Target: target, Labels: labels},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: mask},
	})
	if err != nil {
		t.Fatalf("update image record %s (mask %v): %v", name, mask, err)
	}
	return resp.GetImage()
}

// pullRecords pulls the image and returns the names of its records for its
// tag and its digest reference (pin.RecordName).
func pullRecords(t *testing.T, target Target, recs *records) []string {
	t.Helper()
	var names []string
	for _, ref := range []string{target.Image.Ref, target.Image.DigestRef} {
		name, err := pin.RecordName(ref)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, name)
	}
	if err := target.Pull(ctxFor(t), target.Image.Ref); err != nil {
		t.Fatalf("pull %s: %v", target.Image.Ref, err)
	}
	return names
}

func testNamespaceRequired(t *testing.T, target Target) {
	_, err := imagesapi.NewImagesClient(target.Conn).Get(ctxFor(t), &imagesapi.GetImageRequest{Name: "anything"})
	t.Logf("%s: Get without a namespace: %v", target.Runtime, err)
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Get without a namespace = %v, want FailedPrecondition", err)
	}
}

// testMissingRecord: a record that is not there is NotFound for Get (the
// pinner's "no containerd image record") and for Update (a release of a
// record removed since it was listed counts as done).
func testMissingRecord(t *testing.T, target Target) {
	recs := &records{client: imagesapi.NewImagesClient(target.Conn)}
	const name = "127.0.0.1:5000/e2e/conformance-no-such-record:1"
	_, err := recs.client.Get(recs.ctx(t), &imagesapi.GetImageRequest{Name: name})
	t.Logf("%s: Get of a missing record: %v", target.Runtime, err)
	if status.Code(err) != codes.NotFound {
		t.Errorf("Get of a missing record = %v, want NotFound", err)
	}
	_, err = recs.client.Update(recs.ctx(t), &imagesapi.UpdateImageRequest{
		Image:      &imagesapi.Image{Name: name, Target: &types.Descriptor{MediaType: "application/vnd.oci.image.manifest.v1+json", Digest: "sha256:" + strings.Repeat("0", 64), Size: 1}, Labels: map[string]string{"a": "b"}},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"labels.a"}},
	})
	t.Logf("%s: Update of a missing record: %v", target.Runtime, err)
	if status.Code(err) != codes.NotFound {
		t.Errorf("Update of a missing record = %v, want NotFound", err)
	}
}

// testRecordsOfAPull: a CRI pull by tag leaves a record under the name
// pin.RecordName gives the tag and one under the digest reference, both for
// the same manifest: the pinner pins the records its list names.
func testRecordsOfAPull(t *testing.T, target Target, recs *records, names []string) {
	var digests []string
	for _, name := range names {
		img := recs.get(t, name)
		t.Logf("%s: record %s: target %s %s, labels %v", target.Runtime, name, img.GetTarget().GetMediaType(),
			img.GetTarget().GetDigest(), img.GetLabels())
		if img.GetTarget().GetDigest() == "" || img.GetTarget().GetMediaType() == "" {
			t.Errorf("record %s has no target: %v", name, img.GetTarget())
		}
		digests = append(digests, img.GetTarget().GetDigest())
	}
	if digests[0] != digests[1] {
		t.Errorf("the records %v point at %v, want one manifest", names, digests)
	}
}

// testUpdateSingleLabels: an update whose mask names single labels sets
// those from the request (an empty or missing value removes one) and leaves
// every other label of the record alone, including labels the request
// carries outside the mask.
func testUpdateSingleLabels(t *testing.T, recs *records, name string) {
	const a, b, c = "conformance.image-prefetcher.stackrox.io/a", "conformance.image-prefetcher.stackrox.io/b",
		"conformance.image-prefetcher.stackrox.io/c"
	before := recs.get(t, name).GetLabels()
	t.Cleanup(func() { recs.update(t, name, nil, "labels."+a, "labels."+b, "labels."+c) })

	got := recs.update(t, name, map[string]string{a: "1", b: "2", c: "outside the mask"}, "labels."+a, "labels."+b)
	want := maps.Clone(before)
	if want == nil {
		want = map[string]string{}
	}
	want[a], want[b] = "1", "2"
	if !maps.Equal(got.GetLabels(), want) {
		t.Errorf("after setting %s and %s: the answer's labels %v, want %v", a, b, got.GetLabels(), want)
	}
	if stored := recs.get(t, name).GetLabels(); !maps.Equal(stored, want) {
		t.Errorf("after setting %s and %s: labels %v, want %v", a, b, stored, want)
	}
	// a removed by an empty value, b by its absence from the request.
	recs.update(t, name, map[string]string{a: ""}, "labels."+a, "labels."+b)
	if stored := recs.get(t, name).GetLabels(); !maps.Equal(stored, before) {
		t.Errorf("after removing %s and %s: labels %v, want %v as before", a, b, stored, before)
	}
}

// testListByLabelPresence: the filter labels."<key>" (the form the pinner
// sends) lists the records that have the label whatever its value, and only
// those; two filters are alternatives.
func testListByLabelPresence(t *testing.T, recs *records, names []string) {
	const k1, k2 = "conformance.image-prefetcher.stackrox.io/owner-x", "conformance.image-prefetcher.stackrox.io/owner-y"
	t.Cleanup(func() {
		for _, n := range names {
			recs.update(t, n, nil, "labels."+k1, "labels."+k2)
		}
	})
	recs.update(t, names[0], map[string]string{k1: "true"}, "labels."+k1)
	recs.update(t, names[1], map[string]string{k2: "some other value"}, "labels."+k2)
	list := func(filters ...string) []string {
		resp, err := recs.client.List(recs.ctx(t), &imagesapi.ListImagesRequest{Filters: filters})
		if err != nil {
			t.Fatalf("list with filters %q: %v", filters, err)
		}
		var out []string
		for _, img := range resp.GetImages() {
			out = append(out, img.GetName())
		}
		slices.Sort(out)
		return out
	}
	f1, f2 := `labels."`+k1+`"`, `labels."`+k2+`"`
	if got := list(f1); !slices.Equal(got, []string{names[0]}) {
		t.Errorf("list %s = %v, want [%s]", f1, got, names[0])
	}
	if got := list(f2); !slices.Equal(got, []string{names[1]}) {
		t.Errorf("list %s = %v, want [%s]", f2, got, names[1])
	}
	if got, want := list(f1, f2), slices.Sorted(slices.Values(names)); !slices.Equal(got, want) {
		t.Errorf("list %s, %s = %v, want %v", f1, f2, got, want)
	}
	if got := list(`labels."conformance.image-prefetcher.stackrox.io/nobody"`); len(got) != 0 {
		t.Errorf("list by a label no record has = %v, want none", got)
	}
}

// testReconcile: the pinner's own cycle on the record: set, nothing to do
// the second time, claimed by a second instance, released by the first (the
// pin stays), unpinned by the last; a pin someone else set is claimed and
// left in place when let go.
func testReconcile(t *testing.T, target Target, name string) {
	ctx := ctxFor(t)
	recs := &records{client: imagesapi.NewImagesClient(target.Conn)}
	client := pin.NewClient(target.Conn, 0)
	a := &pin.Pinner{Client: client, Instance: "conformance-a"}
	b := &pin.Pinner{Client: client, Instance: "conformance-b"}
	t.Cleanup(func() {
		a.Reconcile(ctxFor(t), nil, nil) //nolint:errcheck // best effort; the checks below failed already
		b.Reconcile(ctxFor(t), nil, nil) //nolint:errcheck // as above
		recs.update(t, name, nil, "labels."+pin.PinLabel, "labels."+pin.SetLabel)
	})
	if l := recs.get(t, name).GetLabels(); l[pin.PinLabel] != "" {
		t.Fatalf("record %s is pinned before the test (%v); the suite needs an image of its own", name, l)
	}
	step := func(what string, p *pin.Pinner, list []string, want pin.Action) {
		t.Helper()
		rep, err := p.Reconcile(ctx, list, nil)
		if err != nil || len(rep.Failures) != 0 {
			t.Fatalf("%s: %v, failures %v", what, err, rep.Failures)
		}
		var got pin.Action
		if len(rep.Changes) == 1 {
			got = rep.Changes[0].Action
		}
		if len(rep.Changes) > 1 || got != want {
			t.Errorf("%s: changes %v, want one %q", what, rep.Changes, want)
		}
	}
	pinned := func() bool { return recs.get(t, name).GetLabels()[pin.PinLabel] == pin.PinValue }

	step("a pins", a, []string{name}, pin.Set)
	if l := recs.get(t, name).GetLabels(); l[pin.PinLabel] != pin.PinValue || l[pin.SetLabel] == "" || l[pin.OwnerLabel(a.Instance)] == "" {
		t.Errorf("labels after a pinned: %v, want the pin, its set mark and a's ownership", l)
	}
	if owned, err := a.Owned(ctx); err != nil || !slices.Equal(owned, []string{name}) {
		t.Errorf("a owns %v (%v), want [%s]", owned, err, name)
	}
	step("a again", a, []string{name}, "")
	step("b claims", b, []string{name}, pin.Claimed)
	step("a lets go", a, nil, pin.Released)
	if !pinned() {
		t.Errorf("pin gone while b still owns %s: %v", name, recs.get(t, name).GetLabels())
	}
	step("b lets go", b, nil, pin.Unpinned)
	if l := recs.get(t, name).GetLabels(); l[pin.PinLabel] != "" || l[pin.SetLabel] != "" || l[pin.OwnerLabel(b.Instance)] != "" {
		t.Errorf("labels after the last owner let go: %v, want no pin, mark or ownership", l)
	}

	// A pin image-prefetcher did not set (an operator's).
	recs.update(t, name, map[string]string{pin.PinLabel: pin.PinValue}, "labels."+pin.PinLabel)
	step("a claims an operator's pin", a, []string{name}, pin.Claimed)
	step("a lets go of it", a, nil, pin.Released)
	if !pinned() {
		t.Errorf("the operator's pin was removed: %v", recs.get(t, name).GetLabels())
	}
}
