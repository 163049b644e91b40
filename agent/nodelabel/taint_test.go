package nodelabel

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metav1validation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

var (
	ourTaint   = corev1.Taint{Key: StartupTaintKey(instance), Effect: corev1.TaintEffectNoSchedule}
	otherTaint = []corev1.Taint{
		{Key: "node.kubernetes.io/not-ready", Effect: corev1.TaintEffectNoExecute},
		// Same key, other effect: not ours.
		{Key: StartupTaintKey(instance), Effect: corev1.TaintEffectNoExecute},
		{Key: StartupTaintKey("other"), Effect: corev1.TaintEffectNoSchedule},
		{Key: "dedicated", Value: "gpu", Effect: corev1.TaintEffectNoSchedule},
	}
)

func taintedNode(taints ...corev1.Taint) *corev1.Node {
	n := newNode(map[string]string{"kubernetes.io/hostname": nodeName}, nil)
	n.ResourceVersion = "7"
	n.Spec = corev1.NodeSpec{PodCIDR: "10.0.0.0/24", ProviderID: "test://node-1", Unschedulable: true, Taints: taints}
	return n
}

func newStartupTaint(client *fake.Clientset) *StartupTaint {
	return &StartupTaint{Client: client, Node: nodeName, Key: StartupTaintKey(instance), Effect: DefaultStartupTaintEffect, Backoff: &fastBackoff}
}

// The taint goes only when the list is complete, and only ours: the other
// taints (also ours with another effect) and the rest of the spec are kept.
// Once gone, the node is never read for it again, and nothing adds it back.
func TestStartupTaintRemovedOnlyWhenCompleteAndOnlyOurs(t *testing.T) {
	t.Parallel()
	// Our taint with a value (Karpenter's startupTaints may carry one) is ours too.
	ours := ourTaint
	ours.Value = "pending"
	all := append([]corev1.Taint{ours}, otherTaint...)
	client := fake.NewClientset(taintedNode(all...))
	s := newStartupTaint(client)
	ctx := context.Background()

	for range 2 {
		state, err := s.Sync(ctx, false)
		if err != nil || state != TaintKept {
			t.Fatalf("incomplete list: %v %v, want TaintKept", state, err)
		}
	}
	if got := getNode(t, client).Spec.Taints; !reflect.DeepEqual(got, all) {
		t.Fatalf("taints changed while the list was incomplete: %v", got)
	}
	if n := countVerb(client, "patch"); n != 0 {
		t.Fatalf("%d patches while incomplete", n)
	}

	state, err := s.Sync(ctx, true)
	if err != nil || state != TaintRemoved {
		t.Fatalf("complete list: %v %v, want TaintRemoved", state, err)
	}
	node := getNode(t, client)
	if !reflect.DeepEqual(node.Spec.Taints, otherTaint) {
		t.Errorf("taints after removal %v, want %v", node.Spec.Taints, otherTaint)
	}
	want := taintedNode(otherTaint...).Spec
	if !reflect.DeepEqual(node.Spec, want) {
		t.Errorf("spec after removal %+v, want %+v", node.Spec, want)
	}
	if node.Labels["kubernetes.io/hostname"] != nodeName {
		t.Errorf("labels changed: %v", node.Labels)
	}
	// The one patch names spec.taints and the resourceVersion read, nothing else.
	var patch map[string]any
	for _, a := range client.Actions() {
		if pa, ok := a.(k8stesting.PatchAction); ok {
			if pa.GetPatchType() != "application/strategic-merge-patch+json" || pa.GetSubresource() != "" {
				t.Errorf("patch type %s subresource %q", pa.GetPatchType(), pa.GetSubresource())
			}
			if err := json.Unmarshal(pa.GetPatch(), &patch); err != nil {
				t.Fatal(err)
			}
		}
	}
	if got := fmt.Sprint(slices.Sorted(maps.Keys(patch))); got != "[metadata spec]" {
		t.Errorf("patch %v: want metadata and spec only", patch)
	}
	if md, _ := patch["metadata"].(map[string]any); fmt.Sprint(md) != "map[resourceVersion:7]" {
		t.Errorf("patch metadata %v: want the resourceVersion precondition only", md)
	}
	if sp, _ := patch["spec"].(map[string]any); len(sp) != 1 || sp["taints"] == nil {
		t.Errorf("patch spec %v: want taints only", sp)
	}

	// Never re-added, never read again: failing passes after the removal, and
	// a taint someone adds back by hand, change nothing.
	client.ClearActions()
	if _, err := client.CoreV1().Nodes().Update(ctx, taintedNode(all...), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	client.ClearActions()
	for _, complete := range []bool{false, true, false} {
		if state, err := s.Sync(ctx, complete); err != nil || state != TaintAbsent {
			t.Errorf("Sync(%v) after removal: %v %v, want TaintAbsent", complete, state, err)
		}
	}
	if len(client.Actions()) != 0 {
		t.Errorf("requests after the taint was gone: %v", client.Actions())
	}
}

// A node without the taint (never gated, or an agent restarted after the
// removal): one read, no write, then nothing.
func TestStartupTaintAbsentCostsOneRead(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(taintedNode(otherTaint...))
	s := newStartupTaint(client)
	for _, complete := range []bool{false, true, true} {
		if state, err := s.Sync(context.Background(), complete); err != nil || state != TaintAbsent {
			t.Fatalf("Sync(%v): %v %v", complete, state, err)
		}
	}
	if g, p := countVerb(client, "get"), countVerb(client, "patch"); g != 1 || p != 0 {
		t.Errorf("%d GETs %d patches, want 1 and 0", g, p)
	}
	if got := getNode(t, client).Spec.Taints; !reflect.DeepEqual(got, otherTaint) {
		t.Errorf("taints changed: %v", got)
	}
}

// A conflict (the node changed between read and patch: someone added a taint)
// is redone on a fresh read, so the taint added in between is kept.
func TestStartupTaintConflictRereads(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(taintedNode(ourTaint))
	added := corev1.Taint{Key: "added-meanwhile", Effect: corev1.TaintEffectNoSchedule}
	var conflicts atomic.Int32
	client.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		if conflicts.Add(1) > 1 {
			return false, nil, nil
		}
		// What the API server does when the resourceVersion moved on.
		n := taintedNode(ourTaint, added)
		n.ResourceVersion = "8"
		if err := client.Tracker().Update(schema.GroupVersionResource{Version: "v1", Resource: "nodes"}, n, ""); err != nil {
			t.Error(err)
		}
		return true, nil, apierrors.NewConflict(schema.GroupResource{Resource: "nodes"}, nodeName, fmt.Errorf("the object has been modified"))
	})
	state, err := newStartupTaint(client).Sync(context.Background(), true)
	if err != nil || state != TaintRemoved {
		t.Fatalf("Sync: %v %v", state, err)
	}
	if got := getNode(t, client).Spec.Taints; !reflect.DeepEqual(got, []corev1.Taint{added}) {
		t.Errorf("taints %v, want only the one added meanwhile", got)
	}
	if g := countVerb(client, "get"); g != 2 {
		t.Errorf("%d GETs, want 2 (read again after the conflict)", g)
	}
}

// A permanent error ends the removal at once with a message that says what to
// grant; the taint is looked at again next time.
func TestStartupTaintForbidden(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(taintedNode(ourTaint))
	client.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, nodeName, fmt.Errorf("denied by policy"))
	})
	s := newStartupTaint(client)
	s.WriteTimeout = 5 * time.Second
	start := time.Now()
	_, err := s.Sync(context.Background(), true)
	if err == nil || !strings.Contains(err.Error(), "forbidden") || !strings.Contains(err.Error(), ourTaint.Key+":NoSchedule") {
		t.Fatalf("error %v: want forbidden naming the taint", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Errorf("a Forbidden removal took %s: not retried until the budget ends", time.Since(start))
	}
	client.ClearActions()
	if _, err := s.Sync(context.Background(), true); err == nil {
		t.Errorf("second Sync: no error")
	}
	if countVerb(client, "get") != 1 {
		t.Errorf("the node was not read again after a failed removal")
	}
}

func TestValidateTaint(t *testing.T) {
	t.Parallel()
	if err := ValidateTaint(StartupTaintKey(instance), DefaultStartupTaintEffect); err != nil {
		t.Errorf("default taint: %v", err)
	}
	for _, c := range []struct {
		key    string
		effect corev1.TaintEffect
	}{{"", "NoSchedule"}, {"bad key!", "NoSchedule"}, {"ok", "Sometimes"}, {"ok", ""}} {
		if err := ValidateTaint(c.key, c.effect); err == nil {
			t.Errorf("ValidateTaint(%q, %q): no error", c.key, c.effect)
		}
	}
}

// The startup taint's key is the instance's under one of three prefixes: the
// admission policy tells the agent's own taint from others by that.
func TestValidateStartupTaintKey(t *testing.T) {
	t.Parallel()
	for _, key := range []string{Key(instance), "readiness.k8s.io/" + instance, "startup-taint.cluster-autoscaler.kubernetes.io/" + instance} {
		if err := ValidateStartupTaintKey(instance, key); err != nil {
			t.Errorf("%s: %v", key, err)
		}
	}
	for _, key := range []string{"readiness.k8s.io/other", "example.com/" + instance, instance, "node.kubernetes.io/not-ready"} {
		if err := ValidateStartupTaintKey(instance, key); err == nil {
			t.Errorf("%s: accepted", key)
		}
	}
}

// The condition type is valid by the rules of metav1.Condition's type (a
// qualified name), for every valid instance name.
func TestConditionTypeIsValid(t *testing.T) {
	t.Parallel()
	for _, in := range []string{instance, "a", strings.Repeat("x", 63)} {
		cond := metav1.Condition{Type: string(ConditionType(in)), Status: metav1.ConditionTrue, Reason: ConditionReasonPresent,
			LastTransitionTime: metav1.Now()}
		if errs := metav1validation.ValidateConditions([]metav1.Condition{cond}, field.NewPath("conditions")); len(errs) > 0 {
			t.Errorf("instance %q: %v", in, errs.ToAggregate())
		}
	}
	for _, r := range []string{ConditionReasonPresent, ConditionReasonPulling, ConditionReasonMissing, ConditionReasonListUnreadable} {
		cond := metav1.Condition{Type: "t", Status: metav1.ConditionFalse, Reason: r, LastTransitionTime: metav1.Now()}
		if errs := metav1validation.ValidateConditions([]metav1.Condition{cond}, field.NewPath("conditions")); len(errs) > 0 {
			t.Errorf("reason %q: %v", r, errs.ToAggregate())
		}
	}
}
