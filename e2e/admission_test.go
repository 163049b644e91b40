package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	authnv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// tokenConfig writes a kubeconfig that holds nothing but the API server, its CA and token (a
// kubeconfig with a client certificate would authenticate with the certificate instead, see
// ENVIRONMENT.md) and returns the client config loaded from it.
func tokenConfig(t *testing.T, env *clusterenv.Env, token string) *rest.Config {
	t.Helper()
	admin, err := clientcmd.LoadFromFile(env.Kubeconfig)
	if err != nil {
		t.Fatalf("load admin kubeconfig: %v", err)
	}
	ctx := admin.Contexts[admin.CurrentContext]
	if ctx == nil || admin.Clusters[ctx.Cluster] == nil {
		t.Fatalf("admin kubeconfig %s has no current cluster", env.Kubeconfig)
	}
	cluster := admin.Clusters[ctx.Cluster]
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{
		Server:                   cluster.Server,
		CertificateAuthority:     cluster.CertificateAuthority,
		CertificateAuthorityData: cluster.CertificateAuthorityData,
	}
	cfg.AuthInfos["agent"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["agent"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "agent"}
	cfg.CurrentContext = "agent"
	path := filepath.Join(t.TempDir(), "token.kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// tokenClient is a clientset of tokenConfig.
func tokenClient(t *testing.T, env *clusterenv.Env, token string) kubernetes.Interface {
	t.Helper()
	cs, err := kubernetes.NewForConfig(tokenConfig(t, env, token))
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// Scenario 6: the default overlay's admission policies, enforced by the real API server on the
// token of a running agent pod (read from its projected volume on the node, as someone who took
// over the node would), with the instance moved to another namespace after its overlay (Flux's
// targetNamespace): every forbidden write is denied with the policy's reason, every write the
// agent needs is allowed, and the agent itself labels its node under the policies.
func TestScenarioAdmissionPolicy(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	// startup-taint grants nodes/status (the condition), so the policy, not RBAC, must refuse
	// another condition.
	in := newInstance(t, env, "policy", refs(t, env, "e2e/small:17"), "max-concurrent-nodes", "startup-taint")
	in.opts.OverlayNamespace = in.opts.Namespace + "-overlay"
	in.apply()
	in.requireRollout(3 * time.Minute)
	in.waitLabel(ctx, "succeeded")
	cs := in.cs

	// The API server compiled each policy when it was created; its type check against the
	// schemas ends in the status. The names still say the overlay's namespace.
	base := "image-prefetcher." + in.opts.OverlayNamespace + "." + in.name()
	for _, name := range []string{base, base + ".events", base + ".pull-slots"} {
		var policy *admissionv1.ValidatingAdmissionPolicy
		err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
			p, err := cs.AdmissionregistrationV1().ValidatingAdmissionPolicies().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			policy = p
			return p.Status.ObservedGeneration == p.Generation && p.Status.TypeChecking != nil, nil
		})
		if err != nil {
			t.Fatalf("policy %s not type-checked: %v (%+v)", name, err, policy)
		}
		for _, w := range policy.Status.TypeChecking.ExpressionWarnings {
			// The type check maps the core events resource to the events.k8s.io Event kind too,
			// whose fields differ, whatever the policy's matchPolicy; requests are core Events
			// (the denials below show the expressions at work).
			if strings.HasSuffix(name, ".events") && strings.Contains(w.Warning, "events.k8s.io/v1, Kind=Event") {
				t.Logf("policy %s: the type check of the events.k8s.io kind, which the policy does not receive: %s", name, w.FieldRef)
				continue
			}
			t.Errorf("policy %s: type check warning at %s: %s", name, w.FieldRef, w.Warning)
		}
	}

	other := dummyNode(ctx, t, cs)

	pods := in.pods(ctx)
	if len(pods) != 1 {
		t.Fatalf("%d agent pods, want 1", len(pods))
	}
	agent := tokenClient(t, env, podToken(t, env, pods[0]))
	sa := in.name()
	out, err := kubectl(t, env, nil, "-n", in.opts.Namespace, "create", "token", sa, "--duration", "10m")
	if err != nil {
		t.Fatalf("kubectl create token (unbound): %v\n%s", err, out)
	}
	unbound := tokenClient(t, env, strings.TrimSpace(out))

	// The token really is the agent's, in the namespace the instance was moved to, with the node name.
	review, err := agent.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("SelfSubjectReview with the agent's token: %v", err)
	}
	ui := review.Status.UserInfo
	if want := "system:serviceaccount:" + in.opts.Namespace + ":" + sa; ui.Username != want {
		t.Fatalf("token authenticates as %q, want %q", ui.Username, want)
	}
	if got := ui.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != env.NodeName {
		t.Fatalf("pod token's node-name extra %v, want [%s]", got, env.NodeName)
	}

	patchNode := func(c kubernetes.Interface, node string, body map[string]any, sub ...string) error {
		// Strategic merge: a condition merges by type (a merge patch would replace the list).
		_, err := c.CoreV1().Nodes().Patch(ctx, node, types.StrategicMergePatchType, mustJSON(t, body), metav1.PatchOptions{}, sub...)
		return err
	}
	labels := func(l map[string]any) map[string]any { return map[string]any{"metadata": map[string]any{"labels": l}} }
	own := in.labelKey()
	node, err := cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	withTaint := func(key string, effect corev1.TaintEffect) map[string]any {
		taints := append(slices.Clone(node.Spec.Taints), corev1.Taint{Key: key, Effect: effect})
		return map[string]any{"spec": map[string]any{"taints": taints}}
	}
	event := func(ns, nodeName, reason string) error {
		ev := &corev1.Event{
			ObjectMeta:          metav1.ObjectMeta{GenerateName: "e2e-policy-", Namespace: ns},
			InvolvedObject:      corev1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: nodeName, UID: types.UID(nodeName)},
			Reason:              reason,
			Message:             "e2e admission policy test",
			Type:                corev1.EventTypeNormal,
			Source:              corev1.EventSource{Component: "image-prefetcher/" + in.name(), Host: nodeName},
			ReportingController: "image-prefetcher.stackrox.io/agent",
			ReportingInstance:   nodeName,
			FirstTimestamp:      metav1.Now(), LastTimestamp: metav1.Now(), Count: 1,
		}
		_, err := agent.CoreV1().Events(ns).Create(ctx, ev, metav1.CreateOptions{})
		return err
	}
	lease := func(name, holder string, secs int32) error {
		le := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: in.opts.Namespace},
			Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &secs},
		}
		_, err := agent.CoordinationV1().Leases(in.opts.Namespace).Create(ctx, le, metav1.CreateOptions{})
		return err
	}
	slot := in.name() + "-pull-slot-"
	// A slot held by another node, made by the admin, for the agent to try to free.
	// Slot numbers above the agent's own (it takes slots 0-9 of --max-concurrent-nodes=10 and
	// creates them when it pulls), so the agent never made them first.
	foreign := slot + "97"
	if _, err := cs.CoordinationV1().Leases(in.opts.Namespace).Create(ctx, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: foreign, Namespace: in.opts.Namespace},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &other.Name, LeaseDurationSeconds: ptr.To[int32](30)},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create a slot held by another node: %v", err)
	}

	// removeTaint puts a taint on the node as the admin, then has the agent's token remove it.
	removeTaint := func(key string) func() error {
		return func() error {
			n, err := cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
			if err != nil {
				return err
			}
			before := slices.Clone(n.Spec.Taints)
			if err := patchNode(cs, env.NodeName, map[string]any{"spec": map[string]any{"taints": append(slices.Clone(before),
				corev1.Taint{Key: key, Effect: corev1.TaintEffectPreferNoSchedule})}}); err != nil {
				t.Fatalf("admin taints the node with %s: %v", key, err)
			}
			// Whatever the agent may do, the taint goes at the end.
			defer func() { _ = patchNode(cs, env.NodeName, map[string]any{"spec": map[string]any{"taints": before}}) }()
			return patchNode(agent, env.NodeName, map[string]any{"spec": map[string]any{"taints": before}})
		}
	}
	attempts := []attempt{
		{"own label on another node", false, "may change only the node its pod runs on",
			func() error { return patchNode(agent, other.Name, labels(map[string]any{own: "succeeded"})) }},
		{"another instance's label on its own node", false, "may change only its own instance's label",
			func() error {
				return patchNode(agent, env.NodeName, labels(map[string]any{labelPrefix + "someone-else": "succeeded"}))
			}},
		{"node-restriction.kubernetes.io/evil on its own node", false, "may change only its own instance's label",
			func() error {
				return patchNode(agent, env.NodeName, labels(map[string]any{"node-restriction.kubernetes.io/evil": "true"}))
			}},
		{"node-role.kubernetes.io/control-plane on its own node", false, "may change only its own instance's label",
			func() error {
				return patchNode(agent, env.NodeName, labels(map[string]any{"node-role.kubernetes.io/control-plane": ""}))
			}},
		{"own label = maybe", false, "must be succeeded or failed",
			func() error { return patchNode(agent, env.NodeName, labels(map[string]any{own: "maybe"})) }},
		{"another annotation on its own node", false, "may change only its own instance's list annotation",
			func() error {
				return patchNode(agent, env.NodeName, map[string]any{"metadata": map[string]any{"annotations": map[string]any{"e2e.example.com/x": "y"}}})
			}},
		{"cordon its own node", false, "may not change the node's spec",
			func() error {
				return patchNode(agent, env.NodeName, map[string]any{"spec": map[string]any{"unschedulable": true}})
			}},
		{"NoExecute taint on its own node", false, "may only remove its own instance's startup taint",
			func() error {
				return patchNode(agent, env.NodeName, withTaint("e2e.example.com/evict", corev1.TaintEffectNoExecute))
			}},
		{"remove a taint of someone else", false, "may only remove its own instance's startup taint",
			removeTaint("e2e.example.com/keep")},
		{"remove another instance's startup taint", false, "may only remove its own instance's startup taint",
			removeTaint("readiness.k8s.io/someone-else")},
		{"its own startup taint added", false, "may only remove its own instance's startup taint",
			func() error { return patchNode(agent, env.NodeName, withTaint(own, corev1.TaintEffectNoSchedule)) }},
		{"a finalizer on its own node", false, "finalizers or owner references",
			func() error {
				return patchNode(agent, env.NodeName, map[string]any{"metadata": map[string]any{"finalizers": []string{"e2e.example.com/hold"}}})
			}},
		{"another Node condition", false, "may write only its own instance's Node condition",
			func() error {
				return patchNode(agent, env.NodeName, map[string]any{"status": map[string]any{"conditions": []any{
					map[string]any{"type": "e2e.example.com/Fake", "status": "True", "reason": "E2E", "lastTransitionTime": metav1.Now()}}}}, "status")
			}},
		{"own label with an unbound token", false, "may change only the node its pod runs on",
			func() error { return patchNode(unbound, env.NodeName, labels(map[string]any{own: "failed"})) }},
		{"event about another node", false, "may only record its own Prefetch* events",
			func() error { return event(metav1.NamespaceDefault, other.Name, "PrefetchSucceeded") }},
		{"event with another reason", false, "may only record its own Prefetch* events",
			func() error { return event(metav1.NamespaceDefault, env.NodeName, "NodeNotReady") }},
		// The API server's own validation refuses it before the policy is asked.
		{"event in the instance's namespace", false, "",
			func() error { return event(in.opts.Namespace, env.NodeName, "PrefetchSucceeded") }},
		{"another instance's Lease", false, "only its own instance's pull-slot Leases",
			func() error { return lease("someone-else-pull-slot-0", env.NodeName, 30) }},
		{"own slot held for another node", false, "only in the name of the node its pod runs on",
			func() error { return lease(slot+"95", other.Name, 30) }},
		{"own slot for an hour", false, "at most 300 seconds",
			func() error { return lease(slot+"96", env.NodeName, 3600) }},
		{"free another node's slot", false, "free only its own",
			func() error {
				le, err := agent.CoordinationV1().Leases(in.opts.Namespace).Get(ctx, foreign, metav1.GetOptions{})
				if err != nil {
					return err
				}
				le.Spec.HolderIdentity = nil
				_, err = agent.CoordinationV1().Leases(in.opts.Namespace).Update(ctx, le, metav1.UpdateOptions{})
				return err
			}},
		{"delete a slot", false, "forbidden",
			func() error {
				return agent.CoordinationV1().Leases(in.opts.Namespace).Delete(ctx, foreign, metav1.DeleteOptions{})
			}},
		// What the agent does.
		{"own label = failed", true, "", func() error { return patchNode(agent, env.NodeName, labels(map[string]any{own: "failed"})) }},
		{"own label = succeeded", true, "", func() error { return patchNode(agent, env.NodeName, labels(map[string]any{own: "succeeded"})) }},
		{"own list annotation", true, "", func() error {
			return patchNode(agent, env.NodeName, map[string]any{"metadata": map[string]any{"annotations": map[string]any{in.annotationKey(): node.Annotations[in.annotationKey()]}}})
		}},
		{"own Prefetch event about its own node", true, "", func() error { return event(metav1.NamespaceDefault, env.NodeName, "PrefetchSucceeded") }},
		{"own slot held for its own node", true, "", func() error { return lease(slot+"94", env.NodeName, 30) }},
		{"remove its own startup taint (our key)", true, "", removeTaint(own)},
		{"remove its own startup taint (readiness.k8s.io)", true, "", removeTaint("readiness.k8s.io/" + in.name())},
		{"remove its own startup taint (Cluster Autoscaler's)", true, "",
			removeTaint("startup-taint.cluster-autoscaler.kubernetes.io/" + in.name())},
	}
	tryAll(t, "attempt with the agent pod's token", attempts)
	// Other users are not affected.
	if err := patchNode(cs, other.Name, labels(map[string]any{own: "succeeded"})); err != nil {
		t.Errorf("admin patching the dummy node: %v", err)
	}
}

// dummyNode creates another Node to try writes on: never schedulable, no OS label, so no
// DaemonSet's pods land there; deleted when the test ends.
func dummyNode(ctx context.Context, t *testing.T, cs kubernetes.Interface) *corev1.Node {
	t.Helper()
	other := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "e2e-dummy-" + suffix(t), Labels: map[string]string{"e2e.image-prefetcher.stackrox.io/dummy": "true"}},
		Spec: corev1.NodeSpec{
			Unschedulable: true,
			Taints:        []corev1.Taint{{Key: "e2e.image-prefetcher.stackrox.io/dummy", Effect: corev1.TaintEffectNoSchedule}},
		},
	}
	if _, err := cs.CoreV1().Nodes().Create(ctx, other, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create dummy node: %v", err)
	}
	t.Cleanup(func() { _ = cs.CoreV1().Nodes().Delete(context.Background(), other.Name, metav1.DeleteOptions{}) })
	return other
}

// attempt is one write tried with an agent's token.
type attempt struct {
	what  string
	allow bool
	msg   string // part of the denial's message
	do    func() error
}

// tryAll makes each attempt, checks it was allowed or denied (with its message) as expected, and
// logs the table of them (attempt, expected, observed).
func tryAll(t *testing.T, title string, attempts []attempt) {
	t.Helper()
	var table strings.Builder
	fmt.Fprintf(&table, "| %s | expected | observed |\n|---|---|---|\n", title)
	for _, a := range attempts {
		err := a.do()
		observed, expected := "allowed", "denied"
		if err != nil {
			observed = "denied: " + err.Error()
		}
		if a.allow {
			expected = "allowed"
		}
		fmt.Fprintf(&table, "| %s | %s | %s |\n", a.what, expected, observed)
		switch {
		case a.allow && err != nil:
			t.Errorf("%s: %v, want allowed", a.what, err)
		case !a.allow && err == nil:
			t.Errorf("%s: allowed, want denied", a.what)
		case !a.allow && !strings.Contains(err.Error(), a.msg):
			t.Errorf("%s: %v; want the denial to say %q", a.what, err, a.msg)
		}
	}
	t.Logf("%s:\n%s", title, table.String())
}

// podToken reads the ServiceAccount token the kubelet projected into a running pod, from the
// kubelet's root directory on the node.
func podToken(t *testing.T, env *clusterenv.Env, pod corev1.Pod) string {
	t.Helper()
	root := filepath.Join(filepath.Dir(env.PodLogsDir), "root")
	files, err := filepath.Glob(filepath.Join(root, "pods", string(pod.UID), "volumes", "kubernetes.io~projected", "kube-api-access-*", "token"))
	if err != nil || len(files) != 1 {
		t.Fatalf("the token of pod %s under %s: %v %v", pod.Name, root, files, err)
	}
	b, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Scenario 9: every overlay and every overlay+component build is accepted by the real API
// server (`kubectl apply --dry-run=server`): schemas, names, the policy's CEL, RBAC objects.
func TestScenarioServerDryRunEveryBuild(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	cs := env.Clientset(t)
	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	builds, err := bundle.BuildAll(root, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}

	// OpenShift's own SCC schema (required fields, types); a stand-in for Prometheus Operator's PodMonitor.
	installOpenShiftCRDs(t, env, sccCRDFile)
	installMinimalCRDs(t, env, podMonitorCRD)

	// The overlays' namespace must exist for the namespaced objects of a dry run.
	if _, err := cs.CoreV1().Namespaces().Get(ctx, bundle.DefaultNamespace, metav1.GetOptions{}); err != nil {
		// --save-config: kubectl apply warns about objects made without it.
		if out, err := kubectl(t, env, nil, "create", "namespace", bundle.DefaultNamespace, "--save-config"); err != nil {
			t.Fatalf("create namespace %s: %v\n%s", bundle.DefaultNamespace, err, out)
		}
		t.Cleanup(func() {
			_ = cs.CoreV1().Namespaces().Delete(context.Background(), bundle.DefaultNamespace, metav1.DeleteOptions{})
		})
	}

	for _, b := range builds {
		// The REST mapper of a fresh kubectl sees the new CRDs; a failure is retried once in
		// case discovery was cached before they were served.
		out, err := kubectl(t, env, b.YAML, "apply", "--dry-run=server", "-f", "-")
		if err != nil && strings.Contains(out, "no matches for kind") {
			time.Sleep(2 * time.Second)
			out, err = kubectl(t, env, b.YAML, "apply", "--dry-run=server", "-f", "-")
		}
		if err != nil {
			t.Errorf("%s: kubectl apply --dry-run=server: %v\n%s", b.Name, err, out)
			continue
		}
		if strings.Contains(strings.ToLower(out), "warning") {
			t.Errorf("%s: the API server warned:\n%s", b.Name, out)
		}
		t.Logf("%s: %d objects accepted", b.Name, strings.Count(out, "(server dry run)"))
	}
}

// minimalCRD is a CRD for a kind a plain cluster lacks (OpenShift's SCC, Prometheus Operator's PodMonitor):
// it accepts any content, so that applying the bundle checks everything else for real.
type minimalCRD struct{ group, kind, plural, scope string }

var (
	sccCRD        = minimalCRD{"security.openshift.io", "SecurityContextConstraints", "securitycontextconstraints", "Cluster"}
	podMonitorCRD = minimalCRD{"monitoring.coreos.com", "PodMonitor", "podmonitors", "Namespaced"}
)

// installMinimalCRDs creates the CRDs that are not installed yet, and deletes them when the test ends.
func installMinimalCRDs(t *testing.T, env *clusterenv.Env, crds ...minimalCRD) {
	t.Helper()
	for _, crd := range crds {
		name := crd.plural + "." + crd.group
		if out, err := kubectl(t, env, nil, "get", "crd", name); err == nil {
			t.Logf("CRD %s already installed; using it", name)
			continue
		} else if !strings.Contains(out, "NotFound") {
			t.Fatalf("get crd %s: %v\n%s", name, err, out)
		}
		y := fmt.Sprintf(`apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: %s
  labels: {e2e.image-prefetcher.stackrox.io/minimal-crd: "true"}
spec:
  group: %s
  scope: %s
  names: {kind: %s, plural: %s, singular: %s, listKind: %sList}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
`, name, crd.group, crd.scope, crd.kind, crd.plural, strings.ToLower(crd.kind), crd.kind)
		if out, err := kubectl(t, env, []byte(y), "create", "-f", "-"); err != nil {
			t.Fatalf("create CRD %s: %v\n%s", name, err, out)
		}
		t.Cleanup(func() { _, _ = kubectl(t, env, nil, "delete", "crd", name, "--wait=false") })
		if out, err := kubectl(t, env, nil, "wait", "--for=condition=Established", "crd/"+name, "--timeout=60s"); err != nil {
			t.Fatalf("CRD %s not established: %v\n%s", name, err, out)
		}
	}
}
