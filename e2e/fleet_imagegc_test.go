// The kubelet's image garbage collection against prefetched images, on a fleet node of its own whose kubelet
// collects every unused, unpinned image (`e2e/cluster.sh add-node ... --image-gc`; `make e2e-fleet`).
//
// The kubelet collects images at its start and then every 5 minutes (ImageGCPeriod, fixed), and only images
// it first saw at least imageMinimumGCAge before (2 minutes by default, which 0s also means); it sees images
// at its start and at each collection. So the test puts the images in place, restarts the node's kubelet,
// and the collection 5 minutes later is the first that may remove them. make e2e-fleet runs this test as a
// go test of its own beside the other fleet tests, so that wait overlaps them. Run in one go test with
// them, it does the same: this file's name sorts first, so it does all that, then calls t.Parallel, and go
// test resumes it once the other (sequential) fleet tests are done.
package e2e_test

import (
	"context"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// imageGCPeriod is the kubelet's fixed image GC period (ImageGCPeriod in pkg/kubelet; not configurable).
const imageGCPeriod = 5 * time.Minute

// TestFleetImageGCKeepsPinnedPrefetchedImages: on a containerd 2.x node whose kubelet collects every unused,
// unpinned image, an instance with --pin-images prefetches one image and a run without pins another; the
// kubelet's image GC deletes the unpinned one and keeps the pinned one, and the pinned instance's next pass
// finds its list whole: no pull attempt, the label still `succeeded` for the same list, no write.
func TestFleetImageGCKeepsPinnedPrefetchedImages(t *testing.T) {
	f := requireFleet(t)
	// No instance tolerates this taint: the other fleet tests' agents stay off the node.
	node := f.addNode(t, "e2e-gc-"+suffix(t), clusterenv.RuntimeContainerd, "image-prefetcher-e2e/image-gc:NoSchedule", "--image-gc")
	joined := time.Now()
	cs := f.env.Clientset(t)
	images := node.CRI(t)
	pinnedRef := f.env.Image(t, f.env.Registry+"/e2e/random:12mib").Ref
	unpinnedRef := f.env.Image(t, f.env.Registry+"/e2e/random:16mib").Ref
	removeAll(t, images, []string{pinnedRef, unpinnedRef})

	in := newFaultInstance(t, f.env, "gc").on(node)
	list, _ := writeImageList(t, pinnedRef)
	pinFlags := append(in.flags(list), "--pin-images")
	if code, out := runAgent(t, 2*time.Minute, append([]string{"fetch"}, pinFlags...)...); code != 0 {
		t.Fatalf("fetch --pin-images: exit %d\n%s", code, out)
	}
	waitCRIPinned(t, images, pinnedRef, true)
	unpinnedList, _ := writeImageList(t, unpinnedRef)
	// no instance: a run as the instance without --pin-images would let go of its pins
	if code, out := runAgent(t, 2*time.Minute, "fetch", "--cri-socket", node.CRISocket, "--image-list-file", unpinnedList, "--label=false"); code != 0 {
		t.Fatalf("fetch of the unpinned image: exit %d\n%s", code, out)
	}
	requirePresent(t, images, []string{pinnedRef, unpinnedRef})
	ctx := ctxFor(t, 3*imageGCPeriod)
	before, ok := in.state(ctx)
	if !ok || before.label != "succeeded" {
		t.Fatalf("label of %s before GC: %+v, want succeeded", in.name, before)
	}
	prepared := time.Now()
	kubelet := "node-" + node.Name + "-kubelet"
	clusterenv.RunHarness(t, "stop-component", kubelet)
	clusterenv.RunHarness(t, "start-component", kubelet)
	restarted := time.Now()
	waitNodeNamedReady(t, cs, node.Name)

	t.Parallel()
	// The collection 5 minutes after the restart, or the one after it (allowing for a slow first run).
	deadline := restarted.Add(2*imageGCPeriod + time.Minute)
	err := wait.PollUntilContextTimeout(ctx, 2*time.Second, time.Until(deadline), true, func(ctx context.Context) (bool, error) {
		st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: unpinnedRef}})
		if err != nil {
			return false, nil
		}
		return st.GetImage() == nil, nil
	})
	if err != nil {
		t.Fatalf("the kubelet's image GC did not collect the unpinned prefetched image %s within %s of the kubelet's restart: %v",
			unpinnedRef, deadline.Sub(restarted).Round(time.Second), err)
	}
	t.Logf("image GC collected the unpinned %s %s after the kubelet's restart (%s after the node joined)", unpinnedRef,
		time.Since(restarted).Round(time.Second), time.Since(joined).Round(time.Second))
	requirePresent(t, images, []string{pinnedRef})
	waitCRIPinned(t, images, pinnedRef, true)

	code, out := runAgent(t, 2*time.Minute, append([]string{"fetch"}, pinFlags...)...)
	if code != 0 {
		t.Fatalf("fetch after GC: exit %d\n%s", code, out)
	}
	if n := attemptsFor(out, pinnedRef); n != 0 {
		t.Errorf("the pinned image was pulled again after GC (%d attempts)\n%s", n, out)
	}
	after, ok := in.state(ctx)
	if !ok || after.label != "succeeded" || after.list != before.list {
		t.Errorf("label after GC %+v, want succeeded for the same list (%+v)", after, before)
	}
	// The node object changes for the kubelet's own status; our keys must not have been written since the
	// images were in place.
	n, err := cs.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range n.ManagedFields {
		if strings.Contains(mf.Manager, "image-prefetcher") && mf.Time != nil && mf.Time.After(prepared) {
			t.Errorf("the agent wrote the node after the images were in place (manager %s at %s)", mf.Manager, mf.Time)
		}
	}
}
