package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// tokenClient writes a kubeconfig that holds nothing but the API server, its CA and token (a
// kubeconfig with a client certificate would authenticate with the certificate instead, see
// ENVIRONMENT.md) and returns a clientset loaded from it.
func tokenClient(t *testing.T, env *clusterenv.Env, token string) kubernetes.Interface {
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
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// Scenario 6: the admission-policy component, enforced by the real API server on the agent's
// pod-bound ServiceAccount token.
func TestScenarioAdmissionPolicy(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	in := newInstance(t, env, "policy", refs(t, env, "e2e/small:17"), "admission-policy")
	in.apply()
	// The agent itself writes its label under the policy.
	in.requireRollout(3 * time.Minute)
	in.waitLabel(ctx, "succeeded")
	cs := in.cs

	// The API server compiled the policy when it was created; its type check against the Node
	// schema ends in the status.
	policyName := "image-prefetcher." + in.opts.Namespace + "." + in.name()
	var policy *admissionv1.ValidatingAdmissionPolicy
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		p, err := cs.AdmissionregistrationV1().ValidatingAdmissionPolicies().Get(ctx, policyName, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		policy = p
		return p.Status.ObservedGeneration == p.Generation && p.Status.TypeChecking != nil, nil
	})
	if err != nil {
		t.Fatalf("policy %s not type-checked: %v (%+v)", policyName, err, policy)
	}
	for _, w := range policy.Status.TypeChecking.ExpressionWarnings {
		t.Errorf("policy %s: type check warning at %s: %s", policyName, w.FieldRef, w.Warning)
	}

	// Another node to try on: never schedulable, no OS label, so no DaemonSet's pods land there.
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

	pods := in.pods(ctx)
	if len(pods) != 1 {
		t.Fatalf("%d agent pods, want 1", len(pods))
	}
	sa := in.name()
	out, err := kubectl(t, env, nil, "-n", in.opts.Namespace, "create", "token", sa,
		"--bound-object-kind", "Pod", "--bound-object-name", pods[0].Name, "--duration", "10m")
	if err != nil {
		t.Fatalf("kubectl create token (pod-bound): %v\n%s", err, out)
	}
	agent := tokenClient(t, env, strings.TrimSpace(out))
	out, err = kubectl(t, env, nil, "-n", in.opts.Namespace, "create", "token", sa, "--duration", "10m")
	if err != nil {
		t.Fatalf("kubectl create token (unbound): %v\n%s", err, out)
	}
	unbound := tokenClient(t, env, strings.TrimSpace(out))

	// The token really is the agent's and carries the node name.
	review, err := agent.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("SelfSubjectReview with the agent's token: %v", err)
	}
	ui := review.Status.UserInfo
	if want := "system:serviceaccount:" + in.opts.Namespace + ":" + sa; ui.Username != want {
		t.Fatalf("token authenticates as %q, want %q", ui.Username, want)
	}
	if got := ui.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != env.NodeName {
		t.Fatalf("pod-bound token's node-name extra %v, want [%s]", got, env.NodeName)
	}

	patch := func(c kubernetes.Interface, node string, labels map[string]any, spec map[string]any) error {
		body := map[string]any{}
		if labels != nil {
			body["metadata"] = map[string]any{"labels": labels}
		}
		if spec != nil {
			body["spec"] = spec
		}
		raw := mustJSON(t, body)
		_, err := c.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, raw, metav1.PatchOptions{})
		return err
	}
	denied := func(what string, err error, msg string) {
		t.Helper()
		if err == nil {
			t.Errorf("%s: allowed, want denied by the policy", what)
			return
		}
		if !strings.Contains(err.Error(), msg) {
			t.Errorf("%s: %v; want the policy's message %q", what, err, msg)
			return
		}
		t.Logf("%s: denied: %v", what, err)
	}
	own := in.labelKey()
	denied("own key on another node", patch(agent, other.Name, map[string]any{own: "succeeded"}, nil),
		"may change only the node its pod runs on")
	denied("another instance's key on its own node", patch(agent, env.NodeName, map[string]any{labelPrefix + "someone-else": "succeeded"}, nil),
		"may change only its own instance's label")
	denied("another label on its own node", patch(agent, env.NodeName, map[string]any{"e2e.image-prefetcher.stackrox.io/other": "x"}, nil),
		"may change only its own instance's label")
	denied("an invalid value of its own key", patch(agent, env.NodeName, map[string]any{own: "maybe"}, nil),
		"must be succeeded or failed")
	denied("its own node's spec", patch(agent, env.NodeName, nil, map[string]any{"unschedulable": true}),
		"may not change the node's spec")
	denied("own key with an unbound token", patch(unbound, env.NodeName, map[string]any{own: "failed"}, nil),
		"may change only the node its pod runs on")

	// Allowed: its own key on its own node, both values and back.
	for _, v := range []string{"failed", "succeeded"} {
		if err := patch(agent, env.NodeName, map[string]any{own: v}, nil); err != nil {
			t.Errorf("own key = %s on its own node: %v", v, err)
		}
	}
	// Other users are not affected.
	if err := patch(cs, other.Name, map[string]any{own: "succeeded"}, nil); err != nil {
		t.Errorf("admin patching the dummy node: %v", err)
	}
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
