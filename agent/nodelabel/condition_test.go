package nodelabel

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	testingclock "k8s.io/utils/clock/testing"
)

var kubeletReady = corev1.NodeCondition{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
	Message: "kubelet is posting ready status", LastHeartbeatTime: metav1.NewTime(time.Unix(1000, 0)),
	LastTransitionTime: metav1.NewTime(time.Unix(900, 0))}

func conditionNode() *corev1.Node {
	n := newNode(nil, nil)
	n.ResourceVersion = "3"
	n.Status.Conditions = []corev1.NodeCondition{kubeletReady}
	return n
}

func newCondition(client *fake.Clientset, clk *testingclock.FakePassiveClock) *Condition {
	return &Condition{Client: client, Node: nodeName, Instance: instance, Backoff: &fastBackoff, Clock: clk}
}

func ourCondition(t *testing.T, client *fake.Clientset) *corev1.NodeCondition {
	t.Helper()
	node := getNode(t, client)
	if c := findCondition(node.Status.Conditions, ConditionType(instance)); c != nil {
		return c
	}
	return nil
}

func statusPatches(client *fake.Clientset) []k8stesting.PatchAction {
	var out []k8stesting.PatchAction
	for _, a := range client.Actions() {
		if pa, ok := a.(k8stesting.PatchAction); ok && pa.GetResource().Resource == "nodes" {
			out = append(out, pa)
		}
	}
	return out
}

// Written only on change, through nodes/status, with lastTransitionTime moving
// only when the status does; the kubelet's conditions are left alone.
func TestConditionWrittenOnlyOnChange(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(conditionNode())
	clk := testingclock.NewFakePassiveClock(time.Unix(2000, 0))
	c := newCondition(client, clk)
	ctx := context.Background()

	steps := []struct {
		status         corev1.ConditionStatus
		reason, msg    string
		wantWrite      bool
		wantTransition int64
	}{
		{corev1.ConditionFalse, ConditionReasonPulling, "pulling 3 images", true, 2000},
		{corev1.ConditionFalse, ConditionReasonPulling, "pulling 3 images", false, 2000},
		{corev1.ConditionFalse, ConditionReasonMissing, "1 of 3 images missing: x (NotFound)", true, 2000},
		{corev1.ConditionFalse, ConditionReasonMissing, "1 of 3 images missing: x (NotFound)", false, 2000},
		{corev1.ConditionTrue, ConditionReasonPresent, "all 3 images present", true, 2040},
		{corev1.ConditionTrue, ConditionReasonPresent, "all 3 images present", false, 2040},
	}
	for i, s := range steps {
		clk.SetTime(time.Unix(2000+int64(i)*10, 0))
		before := len(statusPatches(client))
		wrote, err := c.Set(ctx, s.status, s.reason, s.msg)
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		patched := len(statusPatches(client)) - before
		if wrote != s.wantWrite || patched != map[bool]int{true: 1, false: 0}[s.wantWrite] {
			t.Errorf("step %d (%s %s): wrote %v with %d patches, want %v", i, s.status, s.reason, wrote, patched, s.wantWrite)
		}
		got := ourCondition(t, client)
		if got == nil || got.Status != s.status || got.Reason != s.reason || got.Message != s.msg {
			t.Fatalf("step %d: condition %+v, want %s %s %q", i, got, s.status, s.reason, s.msg)
		}
		if got.LastTransitionTime.Unix() != s.wantTransition {
			t.Errorf("step %d: lastTransitionTime %d, want %d", i, got.LastTransitionTime.Unix(), s.wantTransition)
		}
	}
	for _, pa := range statusPatches(client) {
		if pa.GetSubresource() != "status" || pa.GetPatchType() != strategicMergeType {
			t.Errorf("patch on subresource %q type %s, want status, strategic merge", pa.GetSubresource(), pa.GetPatchType())
		}
		var body map[string]any
		if err := json.Unmarshal(pa.GetPatch(), &body); err != nil {
			t.Fatal(err)
		}
		if md := fmt.Sprint(body["metadata"]); md != "map[resourceVersion:3]" {
			t.Errorf("patch metadata %s: want the resourceVersion precondition", md)
		}
		conds := body["status"].(map[string]any)["conditions"].([]any)
		if len(conds) != 1 || conds[0].(map[string]any)["type"] != string(ConditionType(instance)) {
			t.Errorf("patch conditions %v: want only ours", conds)
		}
	}
	node := getNode(t, client)
	if ready := findCondition(node.Status.Conditions, corev1.NodeReady); len(node.Status.Conditions) != 2 || ready == nil || *ready != kubeletReady {
		t.Errorf("conditions %+v: want the kubelet's Ready untouched next to ours", node.Status.Conditions)
	}
}

// The cache spares the read of a steady state; an old cache is checked
// against the node, and a condition changed by someone else is put back.
func TestConditionRepairsAfterCacheAge(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(conditionNode())
	clk := testingclock.NewFakePassiveClock(time.Unix(2000, 0))
	c := newCondition(client, clk)
	ctx := context.Background()
	if _, err := c.Set(ctx, corev1.ConditionTrue, ConditionReasonPresent, "all"); err != nil {
		t.Fatal(err)
	}
	client.ClearActions()
	if wrote, err := c.Set(ctx, corev1.ConditionTrue, ConditionReasonPresent, "all"); err != nil || wrote {
		t.Fatalf("steady state: wrote %v %v", wrote, err)
	}
	if len(client.Actions()) != 0 {
		t.Errorf("steady state within the cache age made requests: %v", client.Actions())
	}
	// Someone flips it.
	n := getNode(t, client)
	findCondition(n.Status.Conditions, ConditionType(instance)).Status = corev1.ConditionFalse
	if err := client.Tracker().Update(schema.GroupVersionResource{Version: "v1", Resource: "nodes"}, n, ""); err != nil {
		t.Fatal(err)
	}
	clk.SetTime(clk.Now().Add(2 * DefaultMaxCacheAge))
	if wrote, err := c.Set(ctx, corev1.ConditionTrue, ConditionReasonPresent, "all"); err != nil || !wrote {
		t.Fatalf("after an outside change: wrote %v %v, want a write", wrote, err)
	}
	if got := ourCondition(t, client); got.Status != corev1.ConditionTrue {
		t.Errorf("condition %+v not repaired", got)
	}
}

// Conflicts on the status patch are retried on a fresh read within the
// condition's own budget; a budget that ends fails the write with its error.
func TestConditionConflictsRetriedWithinItsBudget(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(conditionNode())
	var conflicts atomic.Int32
	conflict := apierrors.NewConflict(schema.GroupResource{Resource: "nodes"}, nodeName, fmt.Errorf("the object has been modified"))
	client.PrependReactor("patch", "nodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() == "status" && conflicts.Add(1) <= 3 {
			return true, nil, conflict
		}
		return false, nil, nil
	})
	clk := testingclock.NewFakePassiveClock(time.Unix(2000, 0))
	c := newCondition(client, clk)
	if wrote, err := c.Set(context.Background(), corev1.ConditionTrue, ConditionReasonPresent, "all"); err != nil || !wrote {
		t.Fatalf("Set after 3 conflicts: %v %v", wrote, err)
	}
	if g := countVerb(client, "get"); g != 4 {
		t.Errorf("%d reads, want 4 (one per attempt)", g)
	}

	// Always conflicting: the write gives up when its own budget ends, even
	// with a caller context that is already cancelled.
	client2 := fake.NewClientset(conditionNode())
	client2.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, conflict
	})
	c2 := newCondition(client2, clk)
	c2.WriteTimeout = 200 * time.Millisecond
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c2.Set(cancelled, corev1.ConditionTrue, ConditionReasonPresent, "all")
	if err == nil || !apierrors.IsConflict(err) {
		t.Fatalf("error %v: want the conflict after the budget", err)
	}
	if n := len(statusPatches(client2)); n < 2 {
		t.Errorf("%d status patches: conflicts were not retried within the budget", n)
	}
}

const strategicMergeType = "application/strategic-merge-patch+json"

// Claim says what the label says about one list; it reads the node only when
// the labeler's cache is old, and the write that follows uses that read.
func TestClaim(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(map[string]string{Key(instance): "succeeded"}, map[string]string{AnnotationKey(instance): digestA}))
	l := newLabeler(client)
	ctx := context.Background()
	claim := func(digest string) State {
		t.Helper()
		s, err := l.Claim(ctx, digest)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if got := claim(digestA); got != Succeeded {
		t.Errorf("same list: %q, want succeeded", got)
	}
	if got := claim(digestB); got != "" {
		t.Errorf("another list: %q, want none", got)
	}
	if err := l.Withdraw(ctx, digestA); err != nil {
		t.Fatal(err)
	}
	if got := claim(digestA); got != "" {
		t.Errorf("after Withdraw: %q, want none", got)
	}
	if _, err := l.Set(ctx, digestA, Failed); err != nil {
		t.Fatal(err)
	}
	if got := claim(digestA); got != Failed {
		t.Errorf("after Set(failed): %q", got)
	}
	if n := countVerb(client, "get"); n != 1 {
		t.Errorf("%d reads of the node, want 1 (the cache serves the rest)", n)
	}
}

// Remove deletes only this instance's condition, and writes nothing when it is
// already gone.
func TestConditionRemove(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(conditionNode())
	clk := testingclock.NewFakePassiveClock(time.Unix(2000, 0))
	c := newCondition(client, clk)
	if _, err := c.Set(context.Background(), corev1.ConditionTrue, ConditionReasonPresent, "all 3 images"); err != nil {
		t.Fatal(err)
	}
	wrote, err := c.Remove(context.Background())
	if err != nil || !wrote {
		t.Fatalf("Remove = %v, %v; want a write", wrote, err)
	}
	if got := ourCondition(t, client); got != nil {
		t.Errorf("condition after Remove: %+v", got)
	}
	conds := getNode(t, client).Status.Conditions
	if len(conds) != 1 || conds[0].Type != corev1.NodeReady {
		t.Errorf("other conditions after Remove: %+v, want the kubelet's Ready only", conds)
	}
	before := len(statusPatches(client))
	if wrote, err := c.Remove(context.Background()); err != nil || wrote {
		t.Errorf("second Remove = %v, %v; want no write", wrote, err)
	}
	if n := len(statusPatches(client)) - before; n != 0 {
		t.Errorf("second Remove patched %d times", n)
	}
}
