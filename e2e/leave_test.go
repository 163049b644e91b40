package e2e_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// placementLabel is the node label components/node-placement selects on.
const placementLabel = "prefetch.image-prefetcher.stackrox.io/enabled"

// TestScenarioNodeLeaves: an agent whose node leaves the instance withdraws what it keeps there. With
// node-placement, pin-images and the Node condition, the node opted in: label succeeded, list
// annotation, condition True, every image pinned through containerd. 1. The node's opt-in label
// removed: the DaemonSet controller stops the pod, and the stopping agent removes label, annotation and
// condition and releases its pins (the images stay). 2. Opted in again, then the DaemonSet deleted
// alone: the same.
func TestScenarioNodeLeaves(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	if env.Runtime != clusterenv.RuntimeContainerd {
		t.Fatalf("this scenario runs on containerd 2.x (pins through containerd's images API), not %s", env.Runtime)
	}
	ctx := ctxFor(t, 6*time.Minute)
	cs := env.Clientset(t)
	recs := containerdRecords(t, env)
	list := refs(t, env, "e2e/small:18", "e2e/small:19")
	in := newInstance(t, env, "leave", list, "node-placement", "pin-images", "startup-taint")
	optIn := func(value *string) {
		t.Helper()
		v := "null"
		if value != nil {
			v = fmt.Sprintf("%q", *value)
		}
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, placementLabel, v)
		if _, err := cs.CoreV1().Nodes().Patch(ctx, env.NodeName, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	yes := "true"
	optIn(&yes)
	t.Cleanup(func() { optIn(nil) })
	in.apply()

	settled := func(step string) {
		t.Helper()
		node := in.waitLabel(ctx, "succeeded")
		if node.Annotations[in.annotationKey()] == "" {
			t.Fatalf("%s: no list annotation", step)
		}
		// The condition follows the label (written right after it, never before): wait for it.
		err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			n, err := cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			node = n
			c := nodeCondition(n, in.labelKey())
			return c != nil && c.Status == corev1.ConditionTrue, nil
		})
		if err != nil {
			t.Fatalf("%s: condition %+v, want True: %v", step, nodeCondition(node, in.labelKey()), err)
		}
		if owned := recs.ownedBy(in.name()); len(owned) != len(list) {
			t.Fatalf("%s: records pinned by %s: %v, want the %d images of the list", step, in.name(), owned, len(list))
		}
	}
	left := func(step string) {
		t.Helper()
		// The pod is gone only after its agent stopped.
		err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
			return len(in.pods(ctx)) == 0, nil
		})
		if err != nil {
			t.Fatalf("%s: the agent's pod still runs: %v\n%s", step, err, in.diagnose())
		}
		node, err := cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if v, ok := node.Labels[in.labelKey()]; ok {
			t.Errorf("%s: label %s=%s still on the node", step, in.labelKey(), v)
		}
		if v, ok := node.Annotations[in.annotationKey()]; ok {
			t.Errorf("%s: annotation %s=%s still on the node", step, in.annotationKey(), v)
		}
		if c := nodeCondition(node, in.labelKey()); c != nil {
			t.Errorf("%s: condition still on the node: %+v", step, *c)
		}
		if owned := recs.ownedBy(in.name()); len(owned) != 0 {
			t.Errorf("%s: records still pinned by %s: %v", step, in.name(), owned)
		}
		for _, r := range list {
			name, err := pin.RecordName(r)
			if err != nil {
				t.Fatal(err)
			}
			if l := recs.labels(name); l[pin.PinLabel] != "" {
				t.Errorf("%s: %s still carries the pin: %v", step, name, l)
			}
		}
	}

	settled("opted in")
	optIn(nil)
	left("opt-in label removed")

	optIn(&yes)
	settled("opted in again")
	if out, err := kubectl(t, env, nil, "-n", in.opts.Namespace, "delete", "daemonset", in.name(), "--cascade=background"); err != nil {
		t.Fatalf("delete the DaemonSet: %v\n%s", err, out)
	}
	left("DaemonSet deleted")
}
