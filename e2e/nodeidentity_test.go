package e2e_test

import (
	"slices"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	utilversion "k8s.io/apimachinery/pkg/util/version"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// components/node-identity on the real API server (Kubernetes 1.36+, constrained impersonation):
// the agent labels its node and sets its condition as the node, with a ServiceAccount that holds
// no node or event RBAC of its own. The running pod's token then tries the writes of
// TestScenarioAdmissionPolicy, directly and as its node: the Node authorizer and NodeRestriction
// decide what the node may do, as for its kubelet.
func TestScenarioNodeIdentity(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	if v, err := utilversion.ParseGeneric(env.KubeVersion); err != nil || v.LessThan(utilversion.MajorMinor(1, 36)) {
		t.Fatalf("node identity needs Kubernetes 1.36+ (constrained impersonation); the cluster is %q (%v): run e2e/cluster.sh up with the default K8S_VERSION", env.KubeVersion, err)
	}
	ctx := ctxFor(t, 4*time.Minute)
	in := newInstance(t, env, "nodeid", refs(t, env, "e2e/small:17"), "node-identity")
	in.apply()
	in.requireRollout(3 * time.Minute)
	node := in.waitLabel(ctx, "succeeded")
	cs := in.cs
	var cond *corev1.NodeCondition
	for i := range node.Status.Conditions {
		if string(node.Status.Conditions[i].Type) == in.labelKey() {
			cond = &node.Status.Conditions[i]
		}
	}
	if cond == nil || cond.Status != corev1.ConditionTrue {
		t.Errorf("the instance's condition %+v, want True (written as the node)", cond)
	}

	other := dummyNode(ctx, t, cs)

	pods := in.pods(ctx)
	if len(pods) != 1 {
		t.Fatalf("%d agent pods, want 1", len(pods))
	}
	token := podToken(t, env, pods[0])
	direct := tokenClient(t, env, token)
	impersonating := func(user string) kubernetes.Interface {
		cfg := tokenConfig(t, env, token)
		cfg.Impersonate = rest.ImpersonationConfig{UserName: user}
		c, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	asNode := impersonating("system:node:" + env.NodeName)

	patchNode := func(c kubernetes.Interface, name string, body map[string]any, sub ...string) error {
		_, err := c.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, mustJSON(t, body), metav1.PatchOptions{}, sub...)
		return err
	}
	labels := func(l map[string]any) map[string]any { return map[string]any{"metadata": map[string]any{"labels": l}} }
	withTaint := func(key string, effect corev1.TaintEffect) map[string]any {
		taints := append(slices.Clone(node.Spec.Taints), corev1.Taint{Key: key, Effect: effect})
		return map[string]any{"spec": map[string]any{"taints": taints}}
	}
	event := func(c kubernetes.Interface, nodeName string) error {
		ev := &corev1.Event{
			ObjectMeta:     metav1.ObjectMeta{GenerateName: "e2e-nodeid-", Namespace: metav1.NamespaceDefault},
			InvolvedObject: corev1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: nodeName, UID: types.UID(nodeName)},
			Reason:         "PrefetchSucceeded", Message: "e2e node identity test", Type: corev1.EventTypeNormal,
			Source:         corev1.EventSource{Component: "image-prefetcher/" + in.name(), Host: nodeName},
			FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(), Count: 1,
		}
		_, err := c.CoreV1().Events(metav1.NamespaceDefault).Create(ctx, ev, metav1.CreateOptions{})
		return err
	}
	own := in.labelKey()
	attempts := []attempt{
		{"its own label, as the ServiceAccount", false, "cannot patch resource \"nodes\"",
			func() error { return patchNode(direct, env.NodeName, labels(map[string]any{own: "failed"})) }},
		{"an event, as the ServiceAccount", false, "cannot create resource \"events\"",
			func() error { return event(direct, env.NodeName) }},
		{"act as another node", false, "cannot impersonate",
			func() error {
				return patchNode(impersonating("system:node:"+other.Name), other.Name, labels(map[string]any{own: "succeeded"}))
			}},
		{"act as a cluster admin", false, "cannot impersonate",
			func() error {
				return patchNode(impersonating("admin"), other.Name, labels(map[string]any{own: "succeeded"}))
			}},
		{"as its node: own label on another node", false, "not allowed to modify node",
			func() error { return patchNode(asNode, other.Name, labels(map[string]any{own: "succeeded"})) }},
		{"as its node: node-restriction.kubernetes.io/evil", false, "is not allowed to modify labels",
			func() error {
				return patchNode(asNode, env.NodeName, labels(map[string]any{"node-restriction.kubernetes.io/evil": "true"}))
			}},
		{"as its node: node-role.kubernetes.io/control-plane", false, "is not allowed to modify labels",
			func() error {
				return patchNode(asNode, env.NodeName, labels(map[string]any{"node-role.kubernetes.io/control-plane": ""}))
			}},
		{"as its node: a NoExecute taint", false, "is not allowed to modify taints",
			func() error {
				return patchNode(asNode, env.NodeName, withTaint("e2e.example.com/evict", corev1.TaintEffectNoExecute))
			}},
		{"as its node: delete itself", false, "cannot impersonate",
			func() error { return asNode.CoreV1().Nodes().Delete(ctx, env.NodeName, metav1.DeleteOptions{}) }},
		{"as its node: read a Secret", false, "cannot impersonate",
			func() error {
				_, err := asNode.CoreV1().Secrets(in.opts.Namespace).List(ctx, metav1.ListOptions{})
				return err
			}},
		{"as its node: a SelfSubjectReview (not a request the agent makes)", false, "cannot impersonate-on:associated-node:create",
			func() error {
				_, err := asNode.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
				return err
			}},
		{"as its node: another instance's Lease", false, "cannot impersonate",
			func() error {
				_, err := asNode.CoordinationV1().Leases(in.opts.Namespace).Create(ctx, &coordinationv1.Lease{
					ObjectMeta: metav1.ObjectMeta{Name: "someone-else-pull-slot-0"},
					Spec:       coordinationv1.LeaseSpec{HolderIdentity: ptr.To(env.NodeName)},
				}, metav1.CreateOptions{})
				return err
			}},
		// What the node's own credentials may do, and so the agent's token as its node.
		{"as its node: its own label", true, "", func() error { return patchNode(asNode, env.NodeName, labels(map[string]any{own: "succeeded"})) }},
		{"as its node: an event about itself", true, "", func() error { return event(asNode, env.NodeName) }},
		{"as its node: another label of its own node (as its kubelet may)", true, "",
			func() error {
				return patchNode(asNode, env.NodeName, labels(map[string]any{"e2e.example.com/nodeid": "x"}))
			}},
	}
	tryAll(t, "attempt with the agent pod's token (node-identity)", attempts)
	_ = patchNode(cs, env.NodeName, labels(map[string]any{"e2e.example.com/nodeid": nil}))
}
