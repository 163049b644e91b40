// The bundle reconciled by Flux's own code on the real single-node cluster of e2e/cluster.sh:
// Flux's generator and kustomize build, server-side apply under kustomize-controller's field
// manager, garbage collection and the kstatus health check (package flux), on the repository's
// overlay plus the e2e layer. Each test logs the measured reconcile times ("flux reconcile ...").
package flux_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/fluxcd/pkg/ssa"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/flux"
)

// The Kustomization is Ready only once the DaemonSet is, which is once the node holds the list:
// the health check covers the prefetch, and the node says succeeded when it passes.
func TestFluxReconcileReadyWhenNodeHoldsList(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	list := refs(t, env, "e2e/small:14", "e2e/small:15", "e2e/random:8mib")
	in := newInstance(t, env, "ready", 3*time.Minute, list).withReconciler()
	in.removeImages(ctx, list)

	rec := in.record(ctx)
	start := time.Now()
	res := in.requireReconciled(ctx, "new instance, images absent")
	ready := time.Now()
	states := rec.finish(t)[env.NodeName]
	t.Logf("label states during the reconciliation: %v", states)

	// The apply returned before the node held the list, and the health check waited for it.
	applied := start.Add(res.Build + res.Apply)
	var succeeded time.Time
	for _, s := range states {
		if s.hasLabel && s.label == "succeeded" && succeeded.IsZero() {
			succeeded = s.at
		}
	}
	switch {
	case succeeded.IsZero():
		t.Errorf("the Kustomization was ready (health check passed) before the node said succeeded: %v", states)
	case succeeded.Before(applied):
		t.Errorf("the node said succeeded at %s, before the apply ended at %s: the images were not removed first?", succeeded.Format(time.StampMilli), applied.Format(time.StampMilli))
	case succeeded.After(ready):
		t.Errorf("succeeded at %s, after the health check passed at %s", succeeded.Format(time.StampMilli), ready.Format(time.StampMilli))
	}
	if s := in.node(ctx); s.label != "succeeded" || s.list == "" {
		t.Errorf("node after the reconciliation: %s, want succeeded with a list annotation", s)
	}
	in.requirePresent(ctx, list)

	ds, err := in.cs.AppsV1().DaemonSets(in.opts.Namespace).Get(ctx, in.name(), metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get daemonset: %v", err)
	}
	if ds.Status.DesiredNumberScheduled != 1 || ds.Status.NumberReady != 1 || ds.Status.UpdatedNumberScheduled != 1 {
		t.Errorf("daemonset status after the health check: %+v, want one updated ready pod", ds.Status)
	}
	requireOwnedByFlux(t, in, &ds.ObjectMeta)

	// A second reconciliation of the same revision changes nothing and is ready at once.
	res = in.requireReconciled(ctx, "same revision again")
	for _, e := range res.Applied.Entries {
		if e.Action != ssa.UnchangedAction {
			t.Errorf("second reconciliation of the same source: %s %s, want unchanged", e.Subject, e.Action)
		}
	}
}

// requireOwnedByFlux checks that the object carries the Kustomization's owner labels and that
// kustomize-controller's field manager applied it (server-side apply).
func requireOwnedByFlux(t *testing.T, in *instance, m *metav1.ObjectMeta) {
	t.Helper()
	for k, v := range in.rec.OwnerLabels() {
		if m.Labels[k] != v {
			t.Errorf("%s: label %s=%q, want %q", m.Name, k, m.Labels[k], v)
		}
	}
	for _, f := range m.ManagedFields {
		if f.Manager == flux.ControllerName && f.Operation == metav1.ManagedFieldsOperationApply {
			return
		}
	}
	t.Errorf("%s: no server-side apply by %s among managed fields %+v", m.Name, flux.ControllerName, m.ManagedFields)
}

// A list change committed to the source rolls the DaemonSet; the node never says succeeded for
// the old list once the new one started, the health check passes only with the new list on the
// node, and the old list's ConfigMap is pruned.
func TestFluxListChangeRollsOut(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	oldList := refs(t, env, "e2e/small:14", "e2e/small:16")
	newList := refs(t, env, "e2e/small:14", "e2e/small:17", "e2e/random:12mib")
	in := newInstance(t, env, "change", 3*time.Minute, oldList).withReconciler()
	in.removeImages(ctx, newList[1:])

	first := in.requireReconciled(ctx, "old list")
	before := in.waitLabel(ctx, "succeeded")
	oldPods := agentPods(ctx, t, in)

	in.opts.Images = newList
	rec := in.record(ctx)
	res := in.requireReconciled(ctx, "list changed in the source")
	ready := time.Now()
	states := rec.finish(t)[env.NodeName]
	t.Logf("old list %.12s; label states after the change: %v", before.list, states)

	newStarted := false
	var newSucceeded time.Time
	for i, s := range states[1:] {
		if s.list != before.list && !newStarted {
			newStarted = true
			if s.hasLabel {
				t.Errorf("the new list's digest appeared with label %q: want the label removed in the same update", s.label)
			}
		}
		if newStarted && s.list == before.list && s.hasLabel && s.label == "succeeded" {
			t.Errorf("state %d: succeeded for the old list after the new list started: %v", i+1, states)
		}
		if s.list != before.list && s.label == "succeeded" && newSucceeded.IsZero() {
			newSucceeded = s.at
		}
	}
	if newSucceeded.IsZero() || newSucceeded.After(ready) {
		t.Errorf("the health check passed at %s without the node saying succeeded for the new list: %v", ready.Format(time.StampMilli), states)
	}
	if s := in.node(ctx); s.label != "succeeded" || s.list == before.list {
		t.Errorf("node after the change: %s, want succeeded for a new list", s)
	}
	in.requirePresent(ctx, newList)

	// The DaemonSet rolled: one new pod of a new revision.
	newPods := agentPods(ctx, t, in)
	if len(newPods) != 1 || len(oldPods) != 1 || newPods[0].UID == oldPods[0].UID ||
		newPods[0].Labels["controller-revision-hash"] == oldPods[0].Labels["controller-revision-hash"] {
		t.Errorf("agent pods before %v, after %v: want one pod of a new revision", podNames(oldPods), podNames(newPods))
	}

	// The list ConfigMap got a new hashed name; the old one left the set and was pruned.
	oldCM := configMapName(t, first.Applied)
	newCM := configMapName(t, res.Applied)
	if oldCM == newCM {
		t.Fatalf("the list ConfigMap kept its name %s: the hash suffix did not change", oldCM)
	}
	prunedCM := false
	for _, e := range res.Pruned.Entries {
		if e.ObjMetadata.GroupKind.Kind == "ConfigMap" && e.ObjMetadata.Name == oldCM && e.Action == ssa.DeletedAction {
			prunedCM = true
		} else {
			t.Errorf("pruned %s (%s): only the old list ConfigMap should leave the set", e.Subject, e.Action)
		}
	}
	if !prunedCM {
		t.Errorf("old list ConfigMap %s not pruned: %v", oldCM, res.Pruned.ToMap())
	}
	if _, err := in.cs.CoreV1().ConfigMaps(in.opts.Namespace).Get(ctx, oldCM, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("old list ConfigMap %s: %v, want NotFound", oldCM, err)
	}
}

func configMapName(t *testing.T, cs *ssa.ChangeSet) string {
	t.Helper()
	for _, e := range cs.Entries {
		if e.ObjMetadata.GroupKind.Kind == "ConfigMap" {
			return e.ObjMetadata.Name
		}
	}
	t.Fatalf("no ConfigMap among %v", cs.ToMap())
	return ""
}

func agentPods(ctx context.Context, t *testing.T, in *instance) []corev1.Pod {
	t.Helper()
	l, err := in.cs.CoreV1().Pods(in.opts.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + in.name()})
	if err != nil {
		t.Fatalf("list agent pods: %v", err)
	}
	return l.Items
}

func podNames(pods []corev1.Pod) []string {
	var n []string
	for _, p := range pods {
		n = append(n, p.Name)
	}
	return n
}

// A missing tag fails the health check at the Kustomization's timeout; its message names the
// DaemonSet, whose node events name the image; the node says failed.
func TestFluxMissingTagFailsHealthCheck(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	missing := env.Registry + "/e2e/random:no-such-tag"
	list := append(refs(t, env, "e2e/small:18"), missing)
	const timeout = 30 * time.Second
	in := newInstance(t, env, "missing", timeout, list).withReconciler()

	res, err := in.reconcile(ctx, "missing tag", true)
	if err == nil {
		t.Fatalf("the Kustomization became ready with %s in the list\n%s", missing, in.diagnose())
	}
	msg := err.Error()
	t.Logf("health check error: %s", msg)
	ds := "DaemonSet/" + in.opts.Namespace + "/" + in.name()
	for _, want := range []string{"health check failed", "timeout waiting for", ds, "InProgress"} {
		if !strings.Contains(msg, want) {
			t.Errorf("health check error does not contain %q: %s", want, msg)
		}
	}
	if res.Health < timeout {
		t.Errorf("health check ended after %s, before the timeout %s", res.Health, timeout)
	}

	// From the DaemonSet to the image: its pod runs but is not Ready, and the agent's Node event
	// names the image with the reason.
	pods := agentPods(ctx, t, in)
	if len(pods) != 1 || pods[0].Status.Phase != corev1.PodRunning {
		t.Fatalf("agent pods %v: want one Running pod\n%s", podNames(pods), in.diagnose())
	}
	for _, c := range pods[0].Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			t.Errorf("agent pod %s is Ready with a missing image", pods[0].Name)
		}
	}
	var event string
	err = wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		for _, e := range in.nodeEvents(ctx, env.NodeName) {
			if e.Type == corev1.EventTypeWarning && e.Reason == "PrefetchFailed" && strings.Contains(e.Message, missing) {
				event = e.Message
			}
		}
		return event != "", nil
	})
	if err != nil {
		t.Fatalf("no PrefetchFailed Node event of %s names %s: %v\n%s", in.name(), missing, err, in.diagnose())
	}
	if !strings.Contains(event, "NotFound") {
		t.Errorf("PrefetchFailed event %q does not give the reason NotFound", event)
	}
	t.Logf("node event of the failing DaemonSet: %s", event)
	if s := in.node(ctx); !s.hasLabel || s.label != "failed" {
		t.Errorf("node: %s, want failed", s)
	}
}

// Removing the instance from the source prunes every object it had; the images stay, and the label
// and annotation stay unless the stopping agent could still withdraw them (docs/bundle.md#uninstall).
func TestFluxPruneRemovesInstance(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	list := refs(t, env, "e2e/small:19")
	in := newInstance(t, env, "prune", 3*time.Minute, list).withReconciler()

	first := in.requireReconciled(ctx, "instance added")
	in.waitLabel(ctx, "succeeded")

	pruneStart := time.Now()
	res, err := in.reconcile(ctx, "instance removed from the source", false)
	if err != nil {
		t.Fatalf("%v\n%s", err, in.diagnose())
	}
	if len(res.Applied.Entries) != 0 {
		t.Errorf("applied %v from a source without the instance", res.Applied.ToMap())
	}
	if got, want := len(res.Pruned.Entries), len(first.Applied.Entries); got != want {
		t.Errorf("pruned %d objects, the instance had %d: %v", got, want, res.Pruned.ToMap())
	}
	kinds := map[string]bool{}
	for _, e := range first.Applied.Entries {
		kinds[e.ObjMetadata.GroupKind.Kind] = true
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"} {
		if !kinds[k] {
			t.Errorf("the instance applied no %s: %v", k, first.Applied.ToMap())
		}
	}

	// Every object of the instance goes away (namespaced ones with their namespace).
	c := in.rec.Client()
	err = wait.PollUntilContextCancel(ctx, 500*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		for _, e := range first.Applied.Entries {
			u := flux.EntryObject(e)
			err := c.Get(ctx, client.ObjectKeyFromObject(u), u)
			if !apierrors.IsNotFound(err) {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("objects of the pruned instance still there: %v", err)
	}
	t.Logf("every object of %s gone %s after the reconciliation without it started", in.name(), time.Since(pruneStart).Round(100*time.Millisecond))

	// What stays on the node.
	// The stopping agent withdraws them when its RBAC outlived its DaemonSet (one prune deletes
	// both, so either may happen); nothing else may be there.
	if s := in.node(ctx); (s.label != "succeeded" || s.list == "") && (s.hasLabel || s.list != "") {
		t.Errorf("node after the prune: %s, want the label and annotation left as they were, or both withdrawn", s)
	}
	in.requirePresent(ctx, list)
}
