package app

// The startup taint and the Node condition driven by passes (issue 11): the
// taint goes only once the whole list is present and never comes back; the
// condition says what the label says, False while a new list is pulled, and
// is written only on change.

import (
	"bytes"
	"context"
	"strings"
	"testing"

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

var (
	ourTaint   = corev1.Taint{Key: nodelabel.StartupTaintKey(testInstance), Effect: corev1.TaintEffectNoSchedule}
	otherTaint = corev1.Taint{Key: "example.com/other", Value: "x", Effect: corev1.TaintEffectNoSchedule}
	// the same key with another effect is not ours either
	ourKeyNoExecute = corev1.Taint{Key: nodelabel.StartupTaintKey(testInstance), Effect: corev1.TaintEffectNoExecute}
)

func gatedNodeClient(taints ...corev1.Taint) *fake.Clientset {
	return fake.NewClientset(&corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: testNode, Labels: map[string]string{"kubernetes.io/hostname": testNode}},
		Spec:       corev1.NodeSpec{Taints: taints},
	})
}

func gateOptions(socket, list string) *Options {
	o := testOptions(socket, list)
	o.StartupTaint, o.NodeCondition = true, true
	return o
}

func storedNode(t *testing.T, client *fake.Clientset) *corev1.Node {
	t.Helper()
	obj, err := client.Tracker().Get(schema.GroupVersionResource{Version: "v1", Resource: "nodes"}, "", testNode)
	if err != nil {
		t.Fatal(err)
	}
	return obj.(*corev1.Node)
}

func ourCondition(t *testing.T, client *fake.Clientset) *corev1.NodeCondition {
	t.Helper()
	for _, c := range storedNode(t, client).Status.Conditions {
		if c.Type == nodelabel.ConditionType(testInstance) {
			return &c
		}
	}
	return nil
}

func taintKeys(n *corev1.Node) []string {
	var out []string
	for _, t := range n.Spec.Taints {
		out = append(out, t.Key+":"+string(t.Effect))
	}
	return out
}

func hasTaint(n *corev1.Node, want corev1.Taint) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == want.Key && t.Effect == want.Effect {
			return true
		}
	}
	return false
}

// A failing list keeps the node gated with an event naming the image; the
// list made whole removes exactly our taint; a later failure never adds it
// back; the condition follows the label all along.
func TestStartupTaintGoesOnlyWithTheWholeListAndNeverReturns(t *testing.T) {
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 10})
	cri.OnPull(missing, critest.NotFound(missing))
	client := gatedNodeClient(otherTaint, ourTaint, ourKeyNoExecute)
	p, logs := newFaultPrefetcher(t, gateOptions(cri.Path(), writeList(t, present, missing)), true, client)

	rep, _ := p.pass(context.Background())
	if rep.State != nodelabel.Failed || rep.NodeErr != nil {
		t.Fatalf("failing pass: state %q, node error %v\n%s", rep.State, rep.NodeErr, logs)
	}
	if n := storedNode(t, client); !hasTaint(n, ourTaint) {
		t.Errorf("the startup taint went with an image missing: %v", taintKeys(n))
	}
	gated := false
	for _, e := range nodeEvents(t, client) {
		if e.Reason == nodelabel.EventReasonNodeGated && strings.Contains(e.Message, missing) {
			gated = true
		}
	}
	if !gated {
		t.Errorf("no %s event naming %s: %v", nodelabel.EventReasonNodeGated, missing, nodeEvents(t, client))
	}
	if c := ourCondition(t, client); c == nil || c.Status != corev1.ConditionFalse ||
		c.Reason != nodelabel.ConditionReasonMissing || !strings.Contains(c.Message, missing) {
		t.Errorf("condition after a failing pass: %+v, want False/%s naming %s", c, nodelabel.ConditionReasonMissing, missing)
	}
	if err := p.readiness.Check(); err == nil {
		t.Error("ready with the list incomplete")
	}

	// The registry gets the tag: the list is whole, the taint goes.
	cri.OnPull(missing)
	rep, _ = p.pass(context.Background())
	if rep.State != nodelabel.Succeeded || rep.NodeErr != nil {
		t.Fatalf("whole pass: state %q, node error %v\n%s", rep.State, rep.NodeErr, logs)
	}
	n := storedNode(t, client)
	if hasTaint(n, ourTaint) || !hasTaint(n, otherTaint) || !hasTaint(n, ourKeyNoExecute) {
		t.Errorf("taints after the whole list: %v, want only %s:%s removed", taintKeys(n), ourTaint.Key, ourTaint.Effect)
	}
	if n.Labels[nodelabel.Key(testInstance)] != "succeeded" {
		t.Errorf("label %q with the taint removed", n.Labels[nodelabel.Key(testInstance)])
	}
	if c := ourCondition(t, client); c == nil || c.Status != corev1.ConditionTrue || c.Reason != nodelabel.ConditionReasonPresent {
		t.Errorf("condition with the whole list: %+v, want True/%s", c, nodelabel.ConditionReasonPresent)
	}
	if !strings.Contains(logs.String(), "startup taint removed") {
		t.Errorf("the removal is not logged:\n%s", logs)
	}

	// Steady state: no write, no read of the node for the taint.
	before := len(client.Actions())
	if rep, _ := p.pass(context.Background()); rep.State != nodelabel.Succeeded {
		t.Fatalf("steady pass: %q", rep.State)
	}
	for _, a := range client.Actions()[before:] {
		if a.GetVerb() != "get" && a.GetVerb() != "list" {
			t.Errorf("steady pass made a %s of %s", a.GetVerb(), a.GetResource().Resource)
		}
	}

	// An image goes and cannot come back: failed, condition False, the
	// taint stays gone (a serving node is not gated again).
	cri.DeleteImage(missing)
	cri.OnPull(missing, critest.NotFound(missing))
	if rep, _ := p.pass(context.Background()); rep.State != nodelabel.Failed {
		t.Fatalf("pass with a hole that cannot be filled: %q", rep.State)
	}
	if n := storedNode(t, client); hasTaint(n, ourTaint) {
		t.Errorf("the startup taint came back on a serving node: %v", taintKeys(n))
	}
	if c := ourCondition(t, client); c == nil || c.Status != corev1.ConditionFalse {
		t.Errorf("condition with an image missing again: %+v, want False", c)
	}
}

// A new list turns the condition False before its pulls start, not after.
func TestConditionFalseWhileANewListIsPulled(t *testing.T) {
	cri := critest.Start(t)
	client := gatedNodeClient()
	o := gateOptions(cri.Path(), writeList(t, pullable))
	o.StartupTaint = false
	p, logs := newFaultPrefetcher(t, o, true, client)
	if rep, _ := p.pass(context.Background()); rep.State != nodelabel.Succeeded {
		t.Fatalf("first list: %q\n%s", rep.State, logs)
	}
	if c := ourCondition(t, client); c == nil || c.Status != corev1.ConditionTrue {
		t.Fatalf("condition after the first list: %+v", c)
	}

	const slow = "registry.test/app/slow:1"
	cri.OnPull(slow, critest.Stall())
	p.opts.ImageList = writeList(t, pullable, slow)
	cancel, done := passUntilPull(p, cri, slow)
	c := ourCondition(t, client)
	cancel()
	<-done
	if c == nil || c.Status != corev1.ConditionFalse || c.Reason != nodelabel.ConditionReasonPulling {
		t.Errorf("condition while the new list is pulled: %+v, want False/%s", c, nodelabel.ConditionReasonPulling)
	}
}

// The condition is patched through nodes/status, and a forbidden patch (RBAC
// without the component) makes fetch exit ExitNotRecorded, naming the cause.
func TestNodeWriteFailureIsNotRecordedExit(t *testing.T) {
	cri := critest.Start(t)
	client := gatedNodeClient(ourTaint)
	var statusPatches int
	client.PrependReactor("patch", "nodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() == "status" {
			statusPatches++
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "nodes/status"}, testNode, nil)
		}
		return false, nil, nil
	})
	p, logs := newFaultPrefetcher(t, gateOptions(cri.Path(), writeList(t, pullable)), false, client)
	rep, err := p.pass(context.Background())
	if code := p.fetchExit(rep, err); code != ExitNotRecorded {
		t.Errorf("fetch exited %d with the condition forbidden, want %d\n%s", code, ExitNotRecorded, logs)
	}
	if statusPatches == 0 {
		t.Error("the condition was not written through nodes/status")
	}
	if !strings.Contains(logs.String(), "forbidden") {
		t.Errorf("the log does not say why:\n%s", logs)
	}
	// The taint's removal does not depend on the condition.
	if n := storedNode(t, client); hasTaint(n, ourTaint) {
		t.Errorf("taint kept with the list whole: %v", taintKeys(n))
	}
}

func TestNodeGateFlags(t *testing.T) {
	for name, args := range map[string][]string{
		"taint without label":     {"fetch", "--label=false", "--startup-taint"},
		"condition without label": {"fetch", "--label=false", "--node-condition"},
		"bad effect":              {"fetch", "--instance", "x", "--node-name", "n", "--startup-taint", "--startup-taint-effect", "NoEntry"},
		"bad key":                 {"fetch", "--instance", "x", "--node-name", "n", "--startup-taint", "--startup-taint-key", "not a key"},
	} {
		t.Run(name, func(t *testing.T) {
			var out bytes.Buffer
			if code := Main(args, &out, &out); code != ExitUsage {
				t.Errorf("exit %d, want %d\n%s", code, ExitUsage, out.String())
			}
		})
	}
}
