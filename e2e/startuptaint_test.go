// New nodes take no workloads before their images are there: a fleet node registers with the instance's
// startup taint (`e2e/cluster.sh add-node NAME RUNTIME <taint>`; `make e2e-fleet`) and the agent of
// components/startup-taint removes it once the whole list is present.
package e2e_test

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

func nodeHasTaint(n *corev1.Node, want corev1.Taint) bool {
	return slices.ContainsFunc(n.Spec.Taints, func(t corev1.Taint) bool { return t.Key == want.Key && t.Effect == want.Effect })
}

func nodeCondition(n *corev1.Node, typ string) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if string(n.Status.Conditions[i].Type) == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// nodeTimeline records when the node first showed the instance's label at succeeded and when the
// startup taint was first seen gone, polling every 50 ms.
type nodeTimeline struct {
	mu                 sync.Mutex
	succeeded, untaint time.Time
}

func (tl *nodeTimeline) follow(ctx context.Context, cs kubernetes.Interface, node, labelKey string, taint corev1.Taint) {
	_ = wait.PollUntilContextCancel(ctx, 50*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		now := time.Now()
		tl.mu.Lock()
		defer tl.mu.Unlock()
		if tl.succeeded.IsZero() && n.Labels[labelKey] == "succeeded" {
			tl.succeeded = now
		}
		if tl.untaint.IsZero() && !nodeHasTaint(n, taint) {
			tl.untaint = now
		}
		return !tl.succeeded.IsZero() && !tl.untaint.IsZero(), nil
	})
}

// TestFleetStartupTaintGatesANewNode: a containerd 2.x node joins with the instance's startup taint (its
// kubelet registers it so) and the pool's opt-in label (components/node-placement). A Deployment bound to
// that node without a toleration stays Pending while the list has a missing tag (taint kept, the Node event
// names the image, the condition says False); with the list fixed, the agent pulls, removes exactly its
// taint, and the Deployment's pod starts without pulling. With the admission policy on, the agent's pod-bound
// token may remove only its own taint and write only its own condition. It runs in parallel with the
// image-GC test's wait, after the other fleet tests.
func TestFleetStartupTaintGatesANewNode(t *testing.T) {
	t.Parallel()
	f := requireFleet(t)
	ctx := ctxFor(t, 12*time.Minute)
	cs := f.env.Clientset(t)
	sfx := suffix(t)
	name := "e2e-gate-" + sfx
	gate := corev1.Taint{Key: labelPrefix + name, Effect: corev1.TaintEffectNoSchedule}
	joined := f.addNode(t, "e2e-gated-"+sfx, clusterenv.RuntimeContainerd, gate.Key+":"+string(gate.Effect))
	yes := "true"
	if err := labelNodeValue(ctx, t, f, joined.Name, placementLabel, &yes); err != nil {
		t.Fatal(err)
	}
	node, err := cs.CoreV1().Nodes().Get(ctx, joined.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !nodeHasTaint(node, gate) {
		t.Fatalf("node %s does not carry the startup taint %s:%s it registered with (taints %v)", node.Name, gate.Key, gate.Effect, node.Spec.Taints)
	}
	images := joined.CRI(t)
	list := refs(t, f.env, "e2e/family:a", "e2e/random:4mib", "e2e/random:8mib")
	missing := f.env.Registry + "/e2e/random:no-such-tag"
	removeImages(ctx, t, images, list)

	in := f.instance(t, name, append(slices.Clone(list), missing), "startup-taint", "node-placement")
	in.node = joined.Name
	condType := in.labelKey()
	in.apply()
	createSleeper(ctx, t, in, "app", list[0], corev1.PullIfNotPresent, map[string]string{corev1.LabelHostname: joined.Name})

	// 1. A missing tag: the node stays gated and says why.
	in.waitLabel(ctx, "failed")
	var gated string
	err = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		for _, e := range in.events(ctx) {
			if e.Reason == "PrefetchNodeGated" && strings.Contains(e.Message, missing) {
				gated = e.Message
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("no PrefetchNodeGated event naming %s: %v\n%s", missing, err, in.diagnose())
	}
	t.Logf("node event: %s", gated)
	node, err = cs.CoreV1().Nodes().Get(ctx, joined.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !nodeHasTaint(node, gate) {
		t.Fatalf("the startup taint went while %s is missing\n%s", missing, f.diagnose(t, in))
	}
	if c := nodeCondition(node, condType); c == nil || c.Status != corev1.ConditionFalse || c.Reason != "ImagesMissing" || !strings.Contains(c.Message, missing) {
		t.Errorf("condition %s with an image missing: %+v, want False/ImagesMissing naming %s", condType, c, missing)
	}
	pending := requireUnschedulable(ctx, t, in, "app", "untolerated taint")
	t.Logf("the app's pod is held off the gated node: %s", pending)

	// 2. The list without the missing tag: the agent pulls, then the taint goes, and the app starts.
	in.opts.Images = list
	var tl nodeTimeline
	followCtx, stopFollowing := context.WithCancel(ctx)
	followed := make(chan struct{})
	go func() { defer close(followed); tl.follow(followCtx, cs, joined.Name, in.labelKey(), gate) }()
	in.apply()
	in.requireRollout(5 * time.Minute)
	err = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		n, err := cs.CoreV1().Nodes().Get(ctx, joined.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		node = n
		return !nodeHasTaint(n, gate), nil
	})
	if err != nil {
		t.Fatalf("the startup taint is still there with the whole list present: %v\n%s", err, f.diagnose(t, in))
	}
	stopFollowing()
	<-followed
	requireStartedWithoutPull(ctx, t, in, "app", list[0], corev1.PullIfNotPresent)
	node, err = cs.CoreV1().Nodes().Get(ctx, joined.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if node.Labels[in.labelKey()] != "succeeded" {
		t.Errorf("label %q with the taint removed", node.Labels[in.labelKey()])
	}
	if c := nodeCondition(node, condType); c == nil || c.Status != corev1.ConditionTrue || c.Reason != "ImagesPresent" {
		t.Errorf("condition %s with the list present: %+v, want True/ImagesPresent", condType, c)
	}
	if tl.succeeded.IsZero() || tl.untaint.IsZero() {
		t.Errorf("the node was not seen labelled succeeded (%v) and untainted (%v)", tl.succeeded, tl.untaint)
	} else {
		t.Logf("seen from the API server (polled every 50 ms): the taint gone %s after the label said succeeded",
			tl.untaint.Sub(tl.succeeded).Round(time.Millisecond))
	}
	// The agent measures from the end of its pulls (the last image present) to the taint's removal.
	agentLog, err := f.agentLog(ctx, in, joined.Name)
	if err != nil {
		t.Errorf("agent log on %s: %v", joined.Name, err)
	}
	if m := regexp.MustCompile(`startup taint removed.*sinceListPresent=(\S+)`).FindStringSubmatch(agentLog); m != nil {
		t.Logf("agent: startup taint removed %s after the last image was present", m[1])
	} else {
		t.Errorf("the agent's log does not say it removed the taint\n%s", f.diagnose(t, in))
	}

	// 3. The admission policy, with the agent's own pod-bound token.
	agent := agentToken(ctx, t, in)
	other := corev1.Taint{Key: "e2e.image-prefetcher.stackrox.io/other", Effect: corev1.TaintEffectNoSchedule}
	setTaints := func(c kubernetes.Interface, taints []corev1.Taint) error {
		body := mustJSON(t, map[string]any{"spec": map[string]any{"taints": taints}})
		_, err := c.CoreV1().Nodes().Patch(ctx, joined.Name, types.MergePatchType, body, metav1.PatchOptions{})
		return err
	}
	taintsNow := func() []corev1.Taint {
		n, err := cs.CoreV1().Nodes().Get(ctx, joined.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return n.Spec.Taints
	}
	without := func(taints []corev1.Taint, drop corev1.Taint) []corev1.Taint {
		return slices.DeleteFunc(slices.Clone(taints), func(t corev1.Taint) bool { return t.Key == drop.Key && t.Effect == drop.Effect })
	}
	t.Cleanup(func() {
		if err := setTaints(cs, without(without(taintsNow(), other), gate)); err != nil {
			t.Logf("cleanup: taints: %v", err)
		}
	})
	// The admin puts both taints on; the running agent, whose gate is done, leaves them alone.
	if err := setTaints(cs, append(taintsNow(), other, gate)); err != nil {
		t.Fatalf("admin adds taints: %v", err)
	}
	denied := func(what string, err error, msg string) {
		t.Helper()
		switch {
		case err == nil:
			t.Errorf("%s: allowed, want denied by the policy", what)
		case !strings.Contains(err.Error(), msg):
			t.Errorf("%s: %v; want the policy's message %q", what, err, msg)
		default:
			t.Logf("%s: denied: %v", what, err)
		}
	}
	denied("remove another taint", setTaints(agent, without(taintsNow(), other)), "may only remove its own instance's startup taint")
	denied("add a taint", setTaints(agent, append(taintsNow(), corev1.Taint{Key: in.labelKey() + "-x", Effect: corev1.TaintEffectNoSchedule})),
		"may only remove its own instance's startup taint")
	denied("make the node unschedulable", func() error {
		_, err := agent.CoreV1().Nodes().Patch(ctx, joined.Name, types.MergePatchType, []byte(`{"spec":{"unschedulable":true}}`), metav1.PatchOptions{})
		return err
	}(), "may not change the node's spec")
	writeCondition := func(typ string) error {
		body := mustJSON(t, map[string]any{"status": map[string]any{"conditions": []map[string]any{{
			"type": typ, "status": "True", "reason": "E2E", "message": "written by the e2e test with the agent's token",
			"lastHeartbeatTime": time.Now().UTC().Format(time.RFC3339), "lastTransitionTime": time.Now().UTC().Format(time.RFC3339),
		}}}})
		_, err := agent.CoreV1().Nodes().Patch(ctx, joined.Name, types.StrategicMergePatchType, body, metav1.PatchOptions{}, "status")
		return err
	}
	denied("write another condition", writeCondition("e2e.image-prefetcher.stackrox.io/other"), "may write only its own instance's Node condition")
	if err := writeCondition(condType); err != nil {
		t.Errorf("own condition with its own token: %v", err)
	}
	if err := setTaints(agent, without(taintsNow(), gate)); err != nil {
		t.Errorf("remove its own startup taint with its own token: %v", err)
	}
	if ts := taintsNow(); nodeHasTaint(&corev1.Node{Spec: corev1.NodeSpec{Taints: ts}}, gate) || !nodeHasTaint(&corev1.Node{Spec: corev1.NodeSpec{Taints: ts}}, other) {
		t.Errorf("taints after the agent's token removed its own: %v", ts)
	}
}

// requireUnschedulable waits until the scheduler says the pod of the Deployment name fits no node, for
// a reason whose message holds want (any reason: ""), and returns the message; a pod scheduled meanwhile
// fails the test.
func requireUnschedulable(ctx context.Context, t *testing.T, in *instance, name, want string) string {
	t.Helper()
	var msg string
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		l, err := in.cs.CoreV1().Pods(in.opts.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + name})
		if err != nil {
			return false, err
		}
		for _, p := range l.Items {
			if p.Spec.NodeName != "" {
				return false, fmt.Errorf("pod %s was scheduled to %s while it should be held", p.Name, p.Spec.NodeName)
			}
			for _, c := range p.Status.Conditions {
				if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
					msg = c.Message
					return strings.Contains(c.Message, want), nil
				}
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("pod of %s not held off (want a reason with %q): %v (last scheduler message %q)\n%s", name, want, err, msg, in.diagnose())
	}
	return msg
}

// agentToken is a client with the token of the instance's ServiceAccount bound to its agent pod (so it
// carries the node name, as the agent's own projected token does).
func agentToken(ctx context.Context, t *testing.T, in *instance) kubernetes.Interface {
	t.Helper()
	pods := in.pods(ctx)
	if len(pods) != 1 {
		t.Fatalf("%d agent pods, want 1", len(pods))
	}
	out, err := kubectl(t, in.env, nil, "-n", in.opts.Namespace, "create", "token", in.name(),
		"--bound-object-kind", "Pod", "--bound-object-name", pods[0].Name, "--duration", "10m")
	if err != nil {
		t.Fatalf("kubectl create token (pod-bound): %v\n%s", err, out)
	}
	return tokenClient(t, in.env, strings.TrimSpace(out))
}
