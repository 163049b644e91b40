package app

// Leaving a node (issue 22): a stopping agent whose node is no longer its
// DaemonSet's withdraws label, annotation, condition, startup taint and pins;
// one that cannot tell, or whose node is still in scope, changes nothing.

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
)

const testNamespace = "prefetch-images"

func daemonSet(spec corev1.PodSpec) *appsv1.DaemonSet {
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: testInstance, Namespace: testNamespace},
		Spec:       appsv1.DaemonSetSpec{Template: corev1.PodTemplateSpec{Spec: spec}},
	}
}

func selecting(key, value string) *corev1.Affinity {
	return &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
		RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
			MatchExpressions: []corev1.NodeSelectorRequirement{{Key: key, Operator: corev1.NodeSelectorOpIn, Values: []string{value}}},
		}}},
	}}
}

func TestOutOfScope(t *testing.T) {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: testNode, Labels: map[string]string{"pool": "gpu"}}}
	tainted := func(ts ...corev1.Taint) *corev1.Node {
		n := node.DeepCopy()
		n.Spec.Taints = ts
		return n
	}
	deleting := daemonSet(corev1.PodSpec{})
	deleting.DeletionTimestamp = &metav1.Time{}
	for _, c := range []struct {
		name string
		ds   *appsv1.DaemonSet
		node *corev1.Node
		want string // a part of the reason; empty: in scope
	}{
		{"no placement", daemonSet(corev1.PodSpec{}), node, ""},
		{"nodeSelector matches", daemonSet(corev1.PodSpec{NodeSelector: map[string]string{"pool": "gpu"}}), node, ""},
		{"nodeSelector no longer matches", daemonSet(corev1.PodSpec{NodeSelector: map[string]string{"pool": "cpu"}}), node,
			"no longer selects node"},
		{"affinity matches", daemonSet(corev1.PodSpec{Affinity: selecting("pool", "gpu")}), node, ""},
		{"affinity no longer matches", daemonSet(corev1.PodSpec{Affinity: selecting("pool", "cpu")}), node,
			"no longer selects node"},
		{"other node name", daemonSet(corev1.PodSpec{NodeName: "node-2"}), node, "runs only on node node-2"},
		{"being deleted", deleting, node, "being deleted"},
		{"NoExecute taint not tolerated", daemonSet(corev1.PodSpec{}),
			tainted(corev1.Taint{Key: "example.com/drain", Effect: corev1.TaintEffectNoExecute}), "example.com/drain:NoExecute"},
		{"NoExecute taint tolerated", daemonSet(corev1.PodSpec{Tolerations: []corev1.Toleration{{Operator: corev1.TolerationOpExists}}}),
			tainted(corev1.Taint{Key: "example.com/drain", Effect: corev1.TaintEffectNoExecute}), ""},
		// A running daemon stays on a NoSchedule taint, and on the taints of
		// a node that is not ready, which the DaemonSet controller tolerates.
		{"NoSchedule taint", daemonSet(corev1.PodSpec{}),
			tainted(corev1.Taint{Key: "example.com/cordon", Effect: corev1.TaintEffectNoSchedule}), ""},
		{"node not ready", daemonSet(corev1.PodSpec{}),
			tainted(corev1.Taint{Key: corev1.TaintNodeNotReady, Effect: corev1.TaintEffectNoExecute},
				corev1.Taint{Key: corev1.TaintNodeUnreachable, Effect: corev1.TaintEffectNoExecute}), ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := outOfScope(c.ds, c.node)
			if err != nil {
				t.Fatal(err)
			}
			if (c.want == "") != (got == "") || !strings.Contains(got, c.want) {
				t.Errorf("outOfScope = %q, want %q", got, c.want)
			}
		})
	}
}

// leaveFixture is a node after a pass that failed on missing: label failed,
// list annotation, condition False, startup taint kept, present and pullable
// pinned by this instance.
func leaveFixture(t *testing.T, objs ...runtime.Object) (*prefetcher, *fake.Clientset, *bytes.Buffer, func(string) bool) {
	t.Helper()
	c, imgs := pinRuntime(t, present, pullable)
	c.AddImage(present, critest.Image{Size: 10})
	c.OnPull(missing, critest.NotFound(missing))
	client := gatedNodeClient(ourTaint, otherTaint)
	for _, o := range objs {
		if err := client.Tracker().Add(o); err != nil {
			t.Fatal(err)
		}
	}
	o := gateOptions(c.Path(), writeList(t, present, pullable, missing))
	o.PinImages, o.Namespace = true, testNamespace
	var logs bytes.Buffer
	o.Run = &RunOptions{RecheckInterval: time.Hour}
	p, err := newPrefetcher(o, &logs, client)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.close)
	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Failed {
		t.Fatalf("pass: %v, %s; want failed", err, rep.State)
	}
	n := storedNode(t, client)
	if n.Labels[nodelabel.Key(testInstance)] != "failed" || ourCondition(t, client) == nil || !hasTaint(n, ourTaint) ||
		!isPinnedBy(imgs, present, testInstance) {
		t.Fatalf("before leaving: labels %v, taints %v, condition %v, %s", n.Labels, taintKeys(n), ourCondition(t, client), imgs)
	}
	pinned := func(ref string) bool { return isPinnedBy(imgs, ref, testInstance) }
	return p, client, &logs, pinned
}

func TestLeave(t *testing.T) {
	labelKey, annotationKey := nodelabel.Key(testInstance), nodelabel.AnnotationKey(testInstance)
	for _, c := range []struct {
		name  string
		objs  []runtime.Object
		fault func(*fake.Clientset)
		// left: label, annotation, condition and our taint gone; pins: still pinned
		left, pins bool
		log        string
	}{
		{name: "daemonset gone", left: true, log: "DaemonSet prefetch-images/my-images is gone"},
		{name: "placement no longer selects the node",
			objs: []runtime.Object{daemonSet(corev1.PodSpec{NodeSelector: map[string]string{"pool": "gpu"}})},
			left: true, log: "no longer selects node node-1"},
		{name: "still in scope", objs: []runtime.Object{daemonSet(corev1.PodSpec{})}, pins: true},
		{name: "daemonset unreadable", pins: true, log: "cannot tell whether the node is still the instance's",
			fault: func(c *fake.Clientset) {
				c.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) {
					return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "apps", Resource: "daemonsets"}, testInstance, errors.New("no"))
				})
			}},
		// The label cannot be withdrawn: the pins stay, since the images
		// would otherwise be collectable while the label promises them.
		{name: "label write refused", pins: true, log: "pins kept: the label could not be withdrawn",
			fault: func(c *fake.Clientset) {
				c.PrependReactor("patch", "nodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
					if a.GetSubresource() == "" {
						return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, testNode, errors.New("no"))
					}
					return false, nil, nil
				})
			}},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, client, logs, pinned := leaveFixture(t, c.objs...)
			if c.fault != nil {
				c.fault(client)
			}
			p.leave(context.Background())
			n := storedNode(t, client)
			_, hasLabel := n.Labels[labelKey]
			_, hasAnnotation := n.Annotations[annotationKey]
			if c.left {
				if hasLabel || hasAnnotation || ourCondition(t, client) != nil || hasTaint(n, ourTaint) {
					t.Errorf("after leaving: labels %v, annotations %v, taints %v, condition %v", n.Labels, n.Annotations,
						taintKeys(n), ourCondition(t, client))
				}
			} else if c.fault == nil && (!hasLabel || !hasAnnotation || ourCondition(t, client) == nil || !hasTaint(n, ourTaint)) {
				t.Errorf("in scope, yet changed: labels %v, annotations %v, taints %v, condition %v", n.Labels, n.Annotations,
					taintKeys(n), ourCondition(t, client))
			}
			if !hasTaint(n, otherTaint) || n.Labels["kubernetes.io/hostname"] != testNode {
				t.Errorf("another taint or label lost: labels %v, taints %v", n.Labels, taintKeys(n))
			}
			if got := pinned(present) && pinned(pullable); got != c.pins {
				t.Errorf("pinned after leave = %v, want %v", got, c.pins)
			}
			if !strings.Contains(logs.String(), c.log) {
				t.Errorf("log lacks %q:\n%s", c.log, logs)
			}
		})
	}
}
