// The kubelet's image garbage collection against prefetched images, on a node whose kubelet collects every
// unused, unpinned image (e2e/cluster.sh up with IMAGE_PREFETCHER_E2E_IMAGE_GC=1; `make e2e-node-lifecycle`).
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

// TestImageGCKeepsPinnedPrefetchedImages: an instance with --pin-images and one without each prefetch an
// image; the kubelet's image GC (run at the kubelet's start: the test restarts it) deletes the unpinned one and
// keeps the pinned one, and the pinned instance's next pass finds its list whole: no pull attempt, the label
// still `succeeded` for the same list, no write.
func TestImageGCKeepsPinnedPrefetchedImages(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	if env.Var("IMAGE_PREFETCHER_E2E_IMAGE_GC") != "1" {
		t.Fatalf("this test needs a kubelet with image GC on: e2e/cluster.sh up with IMAGE_PREFETCHER_E2E_IMAGE_GC=1 (make e2e-node-lifecycle)")
	}
	if env.Runtime != clusterenv.RuntimeContainerd {
		t.Fatalf("pins are reported to the kubelet by containerd 2.x (and >= 1.6.25/1.7.10); the harness runs %s %s", env.Runtime, env.RuntimeVersion)
	}
	cs := env.Clientset(t)
	_, images := env.CRI(t)
	pinnedRef := env.Image(t, env.Registry+"/e2e/random:12mib").Ref
	unpinnedRef := env.Image(t, env.Registry+"/e2e/random:16mib").Ref
	removeAll(t, images, []string{pinnedRef, unpinnedRef})

	in := newFaultInstance(t, env, "gc")
	list, _ := writeImageList(t, pinnedRef)
	pinFlags := append(in.flags(list), "--pin-images")
	if code, out := runAgent(t, 2*time.Minute, append([]string{"fetch"}, pinFlags...)...); code != 0 {
		t.Fatalf("fetch --pin-images: exit %d\n%s", code, out)
	}
	waitCRIPinned(t, images, pinnedRef, true)
	if run := fetch(t, env, []string{unpinnedRef}, "--label=false"); run.code != 0 {
		t.Fatalf("fetch of the unpinned image: exit %d\n%s", run.code, run.output)
	}
	ctx := ctxFor(t, 10*time.Minute)
	before, ok := in.state(ctx)
	if !ok || before.label != "succeeded" {
		t.Fatalf("label of %s before GC: %+v, want succeeded", in.name, before)
	}
	node, err := cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rv := node.ResourceVersion

	// The kubelet collects images at its start and then every 5 minutes; a first run may fail while its image
	// stats are not ready yet, so allow for one period more.
	start := time.Now()
	stopComponent(t, "kubelet").start()
	var gone bool
	err = wait.PollUntilContextTimeout(ctx, 2*time.Second, 7*time.Minute, true, func(ctx context.Context) (bool, error) {
		st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: unpinnedRef}})
		if err != nil {
			return false, nil
		}
		gone = st.GetImage() == nil
		return gone, nil
	})
	if err != nil {
		t.Fatalf("the kubelet's image GC did not collect the unpinned prefetched image %s within 7m of its restart: %v", unpinnedRef, err)
	}
	t.Logf("image GC collected the unpinned %s %s after the kubelet's restart", unpinnedRef, time.Since(start).Round(time.Second))
	waitNodeReady(t, env, cs)
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
	// The node object may change for the kubelet's own status; our keys must not have been written.
	if node, err = cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{}); err == nil {
		for _, mf := range node.ManagedFields {
			if strings.Contains(mf.Manager, "image-prefetcher") && mf.Time != nil && mf.Time.After(start) {
				t.Errorf("the agent wrote the node after GC (manager %s at %s; resourceVersion before %s)", mf.Manager, mf.Time, rv)
			}
		}
	}
}
