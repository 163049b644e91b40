package e2e_test

import (
	"context"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// Two overlays with one instance name in two namespaces would share the cluster-wide label key.
// The first keeps it; the second's agent leaves the node alone (its pod unready, its log saying
// why) while the first exists, and takes the key over once the first is uninstalled.
func TestSameInstanceNameInTwoNamespaces(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 6*time.Minute)
	name := "e2e-same-" + suffix(t)
	first := newNamedInstance(t, env, name, refs(t, env, "e2e/small:15"))
	second := newNamedInstance(t, env, name, refs(t, env, "e2e/small:16"))
	second.opts.Namespace = name + "-b"
	first.apply()
	first.requireRollout(3 * time.Minute)
	node := first.waitLabel(ctx, "succeeded")
	firstList := node.Annotations[first.annotationKey()]

	second.apply()
	var logs string
	err := wait.PollUntilContextTimeout(ctx, time.Second, 2*time.Minute, true, func(context.Context) (bool, error) {
		logs = second.logs()
		return strings.Contains(logs, "also runs in namespace") && strings.Contains(logs, first.opts.Namespace), nil
	})
	if err != nil {
		t.Fatalf("the second instance's agent never said the name is taken: %v\n%s", err, logs)
	}
	if out, err := second.rollout(15 * time.Second); err == nil {
		t.Errorf("the second instance's rollout completed while the first holds the name:\n%s", out)
	}
	n, err := first.cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Labels[first.labelKey()] != "succeeded" || n.Annotations[first.annotationKey()] != firstList {
		t.Errorf("the node's keys changed under the first instance: label %q list %q, want succeeded %q",
			n.Labels[first.labelKey()], n.Annotations[first.annotationKey()], firstList)
	}

	// The first goes (its DaemonSet and namespace; its keys stay, as after an uninstall that
	// forgot them): the second takes the key over.
	if out, err := kubectl(t, env, nil, "delete", "namespace", first.opts.Namespace, "--wait", "--timeout=2m"); err != nil {
		t.Fatalf("delete the first instance's namespace: %v\n%s", err, out)
	}
	second.requireRollout(3 * time.Minute)
	n = second.waitLabel(ctx, "succeeded")
	if got := n.Annotations[second.annotationKey()]; got == firstList || got == "" {
		t.Errorf("list annotation %q after the takeover, want the second instance's list", got)
	}
}
