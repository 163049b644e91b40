// --pin-images on the harness's real runtime: the agent binary pins through containerd's own images API, and
// the test reads the image records back through that API (and, on containerd 2.x, what CRI reports).
package e2e_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"k8s.io/apimachinery/pkg/util/wait"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// records reads image records through containerd's images API in the namespace CRI uses.
type records struct {
	t      *testing.T
	client imagesapi.ImagesClient
	ns     string
}

func containerdRecords(t *testing.T, env *clusterenv.Env) *records {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+env.CRISocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ns := env.ContainerdNamespace
	if ns == "" {
		ns = pin.Namespace
	}
	return &records{t: t, client: imagesapi.NewImagesClient(conn), ns: ns}
}

func (r *records) ctx() context.Context {
	return metadata.AppendToOutgoingContext(ctxFor(r.t, time.Minute), pin.NamespaceHeader, r.ns)
}

// labels returns the labels of the record name (it must exist).
func (r *records) labels(name string) map[string]string {
	r.t.Helper()
	resp, err := r.client.Get(r.ctx(), &imagesapi.GetImageRequest{Name: name})
	if err != nil {
		r.t.Fatalf("containerd image record %s: %v", name, err)
	}
	return resp.GetImage().GetLabels()
}

// ownedBy lists the records that carry instance's ownership label.
func (r *records) ownedBy(instance string) []string {
	r.t.Helper()
	resp, err := r.client.List(r.ctx(), &imagesapi.ListImagesRequest{Filters: []string{`labels."` + pin.OwnerLabel(instance) + `"`}})
	if err != nil {
		r.t.Fatalf("list the records owned by %s: %v", instance, err)
	}
	var out []string
	for _, img := range resp.GetImages() {
		out = append(out, img.GetName())
	}
	slices.Sort(out)
	return out
}

// setLabel sets (or, with an empty value, removes) one label of a record, as an operator or another tool would.
func (r *records) setLabel(name, key, value string) {
	r.t.Helper()
	resp, err := r.client.Get(r.ctx(), &imagesapi.GetImageRequest{Name: name})
	if err != nil {
		r.t.Fatal(err)
	}
	_, err = r.client.Update(r.ctx(), &imagesapi.UpdateImageRequest{
		Image:      &imagesapi.Image{Name: name, Target: resp.GetImage().GetTarget(), Labels: map[string]string{key: value}},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"labels." + key}},
	})
	if err != nil {
		r.t.Fatalf("set label %s=%q of %s: %v", key, value, name, err)
	}
}

func pinnedBy(l map[string]string, instance string) bool {
	return l[pin.PinLabel] == pin.PinValue && l[pin.OwnerLabel(instance)] != ""
}

// waitCRIPinned waits until CRI's ImageStatus reports pinned == want for ref: containerd's CRI learns about
// label changes from its image events, a moment after the write.
func waitCRIPinned(t *testing.T, images runtimeapi.ImageServiceClient, ref string, want bool) {
	t.Helper()
	var last *runtimeapi.Image
	err := wait.PollUntilContextTimeout(ctxFor(t, time.Minute), 100*time.Millisecond, 15*time.Second, true,
		func(ctx context.Context) (bool, error) {
			st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
			if err != nil {
				return false, err
			}
			last = st.GetImage()
			return last != nil && last.GetPinned() == want, nil
		})
	if err != nil {
		t.Errorf("CRI ImageStatus of %s: pinned %v, want %v (image %v): %v", ref, last.GetPinned(), want, last != nil, err)
	}
}

// TestAgentPinImages: `fetch --pin-images` labels exactly the listed images, lets go of an image that leaves the
// list, keeps an image pinned while a second instance lists it, repairs a pin that was removed, never touches the
// pin containerd 2.x sets on its sandbox image, and with the option off removes everything the instance pinned.
// On containerd 2.x CRI reports the pins (pinned: true), which is what the kubelet's image GC reads; containerd
// 1.6.20 predates that (1.6.25), so only the labels are checked there. On CRI-O the option fails the pass at its
// start with a message that points at CRI-O's and OpenShift's own pinning.
func TestAgentPinImages(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	_, images := env.CRI(t)
	list := refs(t, env, "e2e/small:11", "e2e/small:12", "e2e/small:13")
	// pinned by an operator: a pin the agent did not set, which containerd does not re-apply.
	operatorPinned := env.Image(t, "e2e/small:10").Ref
	const a, b = "e2e-pin-a", "e2e-pin-b"
	// --release-pins: each fetch here stands for the instance's run, which releases what leaves its list.
	pinFlags := func(instance string, on bool) []string {
		return []string{"--label=false", "--instance", instance, fmt.Sprintf("--pin-images=%t", on), "--release-pins"}
	}

	if !env.IsContainerd() {
		run := fetch(t, env, list[:1], pinFlags(a, true)...)
		if run.code != 1 {
			t.Errorf("fetch --pin-images on %s exited %d, want 1:\n%s", env.Runtime, run.code, run.output)
		}
		for _, want := range []string{"--pin-images needs containerd's images API", "pinned_images", "PinnedImageSet"} {
			if !strings.Contains(run.output, want) {
				t.Errorf("the output does not say %q:\n%s", want, run.output)
			}
		}
		if strings.Contains(run.output, "pull attempt") {
			t.Errorf("the pass pulled although it could not pin:\n%s", run.output)
		}
		return
	}

	rec := containerdRecords(t, env)
	criReportsPins := env.Runtime == clusterenv.RuntimeContainerd
	release := func(instance string) {
		t.Helper()
		if run := fetch(t, env, nil, pinFlags(instance, false)...); run.code != 0 {
			t.Fatalf("fetch --pin-images=false for %s exited %d:\n%s", instance, run.code, run.output)
		}
	}
	// Pins live on the node's records: start from none of ours (an earlier run may have stopped midway) and
	// leave none behind.
	for _, in := range []string{a, b} {
		release(in)
		t.Cleanup(func() { release(in) })
	}
	pinned := func(instance string, want []string) {
		t.Helper()
		want = slices.Sorted(slices.Values(want))
		if got := rec.ownedBy(instance); !slices.Equal(got, want) {
			t.Errorf("records owned by %s: %v, want %v", instance, got, want)
		}
		for _, ref := range want {
			if l := rec.labels(ref); !pinnedBy(l, instance) {
				t.Errorf("%s is not pinned by %s: %v", ref, instance, l)
			}
		}
	}
	mustFetch := func(instance string, on bool, refs ...string) fetchRun {
		t.Helper()
		run := fetch(t, env, refs, pinFlags(instance, on)...)
		if run.code != 0 {
			t.Fatalf("fetch for %s exited %d:\n%s", instance, run.code, run.output)
		}
		return run
	}

	// The sandbox image: containerd 2.x pins it itself (pinned_images.sandbox) when CRI pulls it.
	sandbox := env.SandboxImage()
	if _, err := images.PullImage(ctxFor(t, time.Minute), &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: sandbox}}); err != nil {
		t.Fatalf("pull the sandbox image %s: %v", sandbox, err)
	}
	sandboxLabels := maps.Clone(rec.labels(sandbox))
	if criReportsPins && sandboxLabels[pin.PinLabel] != pin.PinValue {
		t.Fatalf("containerd 2.x did not pin its sandbox image %s itself: %v", sandbox, sandboxLabels)
	}
	// Every test image present, so that "exactly the listed ones" means something.
	mustFetch(a, false, append([]string{operatorPinned}, list...)...)
	rec.setLabel(operatorPinned, pin.PinLabel, pin.PinValue)
	t.Cleanup(func() { rec.setLabel(operatorPinned, pin.PinLabel, "") })
	operatorLabels := maps.Clone(rec.labels(operatorPinned))

	// 1. Instance a pins its list, and only that.
	run := mustFetch(a, true, list[0], list[1])
	pinned(a, []string{list[0], list[1]})
	if l := rec.labels(list[2]); l[pin.PinLabel] != "" || l[pin.OwnerLabel(a)] != "" {
		t.Errorf("%s is not listed but carries %v", list[2], l)
	}
	if !strings.Contains(run.output, `msg="image pinned"`) {
		t.Errorf("no log line for the pins:\n%s", run.output)
	}
	if criReportsPins {
		waitCRIPinned(t, images, list[0], true)
		waitCRIPinned(t, images, list[1], true)
		waitCRIPinned(t, images, list[2], false)
	}

	// 2. A second instance lists list[1] too, and list[2].
	mustFetch(b, true, list[1], list[2])
	pinned(b, []string{list[1], list[2]})

	// 3. list[1] leaves a's list: a lets go of it, and the pin stays for b.
	mustFetch(a, true, list[0])
	pinned(a, []string{list[0]})
	pinned(b, []string{list[1], list[2]})
	if criReportsPins {
		waitCRIPinned(t, images, list[1], true)
	}

	// 4. A pin removed by someone else is repaired by the next pass.
	rec.setLabel(list[0], pin.PinLabel, "")
	if criReportsPins {
		waitCRIPinned(t, images, list[0], false)
	}
	run = mustFetch(a, true, list[0])
	pinned(a, []string{list[0]})
	if !strings.Contains(run.output, "action=repaired") {
		t.Errorf("the repair is not logged:\n%s", run.output)
	}
	if criReportsPins {
		waitCRIPinned(t, images, list[0], true)
	}

	// 5. The sandbox image and an operator's pin in a's list and out again: pins a did not set stay as they
	// were. (containerd 2.x also re-applies its sandbox image's pin by itself on every change of the record,
	// so the operator's pin is what would show a removal.)
	mustFetch(a, true, list[0], sandbox, operatorPinned)
	pinned(a, []string{list[0], sandbox, operatorPinned})
	run = mustFetch(a, true, list[0])
	for ref, was := range map[string]map[string]string{sandbox: sandboxLabels, operatorPinned: operatorLabels} {
		if got := rec.labels(ref); !maps.Equal(got, was) {
			t.Errorf("the labels of %s changed: %v, were %v", ref, got, was)
		}
	}
	// containerd 1.6.20 does not pin its sandbox image: there a set that pin and lets go of it again, and only
	// the operator's pin is a release that leaves the pin in place.
	wantReleased := 2
	if !criReportsPins {
		wantReleased = 1
		if !strings.Contains(run.output, "image="+sandbox+" action=unpinned") {
			t.Errorf("the sandbox image a pinned on containerd 1.6 was not unpinned:\n%s", run.output)
		}
	}
	if n := strings.Count(run.output, "action=released"); n != wantReleased {
		t.Errorf("%d releases that leave the pin in place, want %d:\n%s", n, wantReleased, run.output)
	}

	// 6a. A fetch of a beside its run (no --release-pins), with pinning off: it releases nothing.
	if run := fetch(t, env, []string{list[0]}, "--label=false", "--instance", a, "--pin-images=false"); run.code != 0 {
		t.Fatalf("fetch without --release-pins exited %d:\n%s", run.code, run.output)
	} else if l := rec.labels(list[0]); !pinnedBy(l, a) || strings.Contains(run.output, "action=") {
		t.Errorf("a fetch without --release-pins changed a's pins: %s %v\n%s", list[0], l, run.output)
	}

	// 6. Off: everything a pinned is let go of; what only a wanted is unpinned; b's pins stay.
	run = mustFetch(a, false, list[0])
	pinned(a, nil)
	if l := rec.labels(list[0]); l[pin.PinLabel] != "" || l[pin.SetLabel] != "" {
		t.Errorf("%s is still pinned after a's --pin-images=false: %v", list[0], l)
	}
	if !strings.Contains(run.output, "action=unpinned") {
		t.Errorf("the release is not logged:\n%s", run.output)
	}
	pinned(b, []string{list[1], list[2]})
	if criReportsPins {
		waitCRIPinned(t, images, list[0], false)
		waitCRIPinned(t, images, list[1], true)
	}

	// 7. b's empty list releases b's pins; the sandbox image keeps containerd's.
	mustFetch(b, true)
	pinned(b, nil)
	for _, ref := range list {
		if l := rec.labels(ref); l[pin.PinLabel] != "" {
			t.Errorf("%s still pinned after both instances let go: %v", ref, l)
		}
	}
	if criReportsPins {
		waitCRIPinned(t, images, list[2], false)
	}
	if got := rec.labels(sandbox); !maps.Equal(got, sandboxLabels) {
		t.Errorf("the sandbox image's labels changed: %v, were %v", got, sandboxLabels)
	}
	if criReportsPins {
		waitCRIPinned(t, images, sandbox, true)
	}
}
