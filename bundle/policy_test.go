package bundle

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pullslots"
)

const withoutPolicy = "without-admission-policy"

// policies returns the build's admission policies by name and checks that each is bound, with
// Deny, by a binding of its own.
func policies(t *testing.T, name string, objs []Object) map[string]*admissionv1.ValidatingAdmissionPolicy {
	t.Helper()
	vaps, err := OfKind[admissionv1.ValidatingAdmissionPolicy](objs, "ValidatingAdmissionPolicy")
	if err != nil {
		t.Fatal(err)
	}
	bindings, err := OfKind[admissionv1.ValidatingAdmissionPolicyBinding](objs, "ValidatingAdmissionPolicyBinding")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*admissionv1.ValidatingAdmissionPolicy{}
	for _, p := range vaps {
		out[p.Name] = p
		bound := false
		for _, b := range bindings {
			bound = bound || (b.Spec.PolicyName == p.Name && slices.Equal(b.Spec.ValidationActions, []admissionv1.ValidationAction{admissionv1.Deny}))
		}
		if !bound {
			t.Errorf("%s: policy %s has no Deny binding", name, p.Name)
		}
	}
	if len(bindings) != len(vaps) {
		t.Errorf("%s: %d bindings for %d policies", name, len(bindings), len(vaps))
	}
	return out
}

func variable(p *admissionv1.ValidatingAdmissionPolicy, name string) string {
	for _, v := range p.Spec.Variables {
		if v.Name == name {
			return v.Expression
		}
	}
	return ""
}

// Every instance is confined by default: the policies for its Node writes and Events, and with
// max-concurrent-nodes the one for its Leases, each naming the instance and nothing of the
// namespace (so a namespace set after the overlay cannot unbind them); without-admission-policy
// drops all of them, whatever came before it.
func TestPoliciesByDefault(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	for _, b := range builds {
		objs, err := Objects(b.YAML)
		if err != nil {
			t.Fatal(err)
		}
		ps := policies(t, b.Name, objs)
		if strings.HasSuffix(b.Name, "+"+withoutPolicy) {
			if len(ps) != 0 {
				t.Errorf("%s: %d admission policies left", b.Name, len(ps))
			}
			continue
		}
		dss, err := OfKind[appsv1.DaemonSet](objs, "DaemonSet")
		if err != nil || len(dss) != 1 {
			t.Fatalf("%s: DaemonSets %v %v", b.Name, dss, err)
		}
		instance, ns := dss[0].Labels["app.kubernetes.io/instance"], dss[0].Namespace
		want := []string{"nodes", "events"}
		if strings.HasSuffix(b.Name, "+max-concurrent-nodes") {
			want = append(want, "leases")
		}
		var got []string
		for name, p := range ps {
			if v := variable(p, "instance"); v != "'"+instance+"'" {
				t.Errorf("%s: policy %s: instance variable %q, want '%s'", b.Name, name, v, instance)
			}
			for _, v := range p.Spec.Variables {
				if strings.Contains(v.Expression, ns) {
					t.Errorf("%s: policy %s: variable %s names the namespace %q: a namespace override would unbind it", b.Name, name, v.Name, ns)
				}
			}
			if !strings.Contains(variable(p, "isAgent"), "endsWith(':' + variables.instance)") {
				t.Errorf("%s: policy %s does not recognise the agent by its ServiceAccount's name", b.Name, name)
			}
			for _, r := range p.Spec.MatchConstraints.ResourceRules {
				got = append(got, r.Resources[0])
			}
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("%s: policies cover %v, want %v", b.Name, got, want)
		}
	}

	// Listed before the components whose policies it removes, as the function lists them (by name).
	out, err := Instance{Flavor: FlavorVanilla, Components: []string{"max-concurrent-nodes", "startup-taint", withoutPolicy}}.Render()
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Objects(out)
	if err != nil {
		t.Fatal(err)
	}
	if ps := policies(t, "all", objs); len(ps) != 0 {
		t.Errorf("%s with max-concurrent-nodes: %d policies left", withoutPolicy, len(ps))
	}
}

// The agent's RBAC for Events is core create only: the policy narrows it to its own node's.
func TestEventRBACIsCreateOnly(t *testing.T) {
	t.Parallel()
	out, err := Instance{Flavor: FlavorVanilla}.Render()
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Objects(out)
	if err != nil {
		t.Fatal(err)
	}
	roles, err := OfKind[rbacv1.ClusterRole](objs, "ClusterRole")
	if err != nil || len(roles) != 1 {
		t.Fatalf("ClusterRoles %v %v", roles, err)
	}
	for _, r := range roles[0].Rules {
		if slices.Contains(r.Resources, "events") && (!slices.Equal(r.APIGroups, []string{""}) || !slices.Equal(r.Verbs, []string{"create"})) {
			t.Errorf("events rule %+v, want core create only", r)
		}
	}
}

// The facts the policies repeat from the agent: the startup taint keys it may remove and the
// longest pull-slot lease it writes.
func TestPoliciesAgreeWithTheAgent(t *testing.T) {
	t.Parallel()
	out, err := Instance{Flavor: FlavorVanilla, Components: []string{"max-concurrent-nodes"}}.Render()
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Objects(out)
	if err != nil {
		t.Fatal(err)
	}
	var nodes, leases *admissionv1.ValidatingAdmissionPolicy
	for _, p := range policies(t, "max-concurrent-nodes", objs) {
		switch p.Spec.MatchConstraints.ResourceRules[0].Resources[0] {
		case "nodes":
			nodes = p
		case "leases":
			leases = p
		}
	}
	if nodes == nil || leases == nil {
		t.Fatal("no node or lease policy")
	}
	keys := variable(nodes, "taintKeys")
	for _, prefix := range nodelabel.StartupTaintPrefixes {
		prefix = strings.TrimPrefix(prefix, nodelabel.Domain)
		if prefix == "" {
			if !strings.Contains(keys, "variables.labelKey") {
				t.Errorf("taintKeys %q lacks the label key", keys)
			}
			continue
		}
		if !strings.Contains(keys, "'"+prefix+"/' + variables.instance") {
			t.Errorf("taintKeys %q lacks %s/<instance>", keys, prefix)
		}
	}
	if n := strings.Count(keys, ",") + 1; n != len(nodelabel.StartupTaintPrefixes) {
		t.Errorf("taintKeys %q has %d keys, the agent allows %d", keys, n, len(nodelabel.StartupTaintPrefixes))
	}
	bound := fmt.Sprintf("<= %d", int(pullslots.MaxLeaseDuration.Seconds()))
	found := false
	for _, v := range leases.Spec.Validations {
		found = found || strings.Contains(v.Expression, "leaseDurationSeconds") && strings.Contains(v.Expression, bound)
	}
	if !found {
		t.Errorf("the lease policy does not bound leaseDurationSeconds %s (pullslots.MaxLeaseDuration)", bound)
	}
}

// A namespace set around the overlay (a wrapping kustomization, as Flux's targetNamespace or
// Argo CD's kustomize namespace do) moves the ServiceAccount and its binding; the policies
// recognise the agent by its name alone, so they still apply to it.
func TestNamespaceOverrideKeepsThePolicyBound(t *testing.T) {
	t.Parallel()
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	overlay, err := filepath.Rel(dir, filepath.Join(root, "overlays", FlavorVanilla))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(
		"namespace: moved\nresources:\n- "+overlay+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := Kustomize(dir)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Objects(out)
	if err != nil {
		t.Fatal(err)
	}
	bindings, err := OfKind[rbacv1.ClusterRoleBinding](objs, "ClusterRoleBinding")
	if err != nil || len(bindings) != 1 || len(bindings[0].Subjects) != 1 {
		t.Fatalf("ClusterRoleBindings %v %v", bindings, err)
	}
	subject := bindings[0].Subjects[0]
	if subject.Namespace != "moved" {
		t.Fatalf("the agent's ServiceAccount is in %q, want moved", subject.Namespace)
	}
	ps := policies(t, "moved", objs)
	if len(ps) == 0 {
		t.Fatal("no policies")
	}
	for name, p := range ps {
		if v := variable(p, "instance"); v != "'"+subject.Name+"'" {
			t.Errorf("policy %s recognises %s, the agent's ServiceAccount is %s", name, v, subject.Name)
		}
	}
}

// The one read the agent has beyond its node: the DaemonSets named after its instance, in any
// namespace (whether another namespace's instance of the name still exists), in every build.
func TestInstanceReadIsNarrow(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	for _, b := range builds {
		objs, err := Objects(b.YAML)
		if err != nil {
			t.Fatal(err)
		}
		roles, err := OfKind[rbacv1.ClusterRole](objs, "ClusterRole")
		if err != nil {
			t.Fatal(err)
		}
		dss, err := OfKind[appsv1.DaemonSet](objs, "DaemonSet")
		if err != nil || len(dss) != 1 {
			t.Fatalf("%s: DaemonSets %v %v", b.Name, dss, err)
		}
		instance := dss[0].Labels["app.kubernetes.io/instance"]
		found := false
		for _, role := range roles {
			for _, r := range role.Rules {
				if !slices.Contains(r.Resources, "daemonsets") {
					continue
				}
				found = true
				if !slices.Equal(r.ResourceNames, []string{instance}) || !slices.Equal(r.Verbs, []string{"get"}) {
					t.Errorf("%s: %s: daemonsets rule %+v, want get on %s only", b.Name, role.Name, r, instance)
				}
			}
		}
		if !found {
			t.Errorf("%s: no rule to read the instance's DaemonSets", b.Name)
		}
	}
}

// The overlays' Namespace may be shared by instances: GitOps tools never prune it with one.
func TestNamespaceSurvivesGitOpsPrune(t *testing.T) {
	t.Parallel()
	for _, flavor := range Flavors {
		out, err := Instance{Flavor: flavor}.Render()
		if err != nil {
			t.Fatal(err)
		}
		objs, err := Objects(out)
		if err != nil {
			t.Fatal(err)
		}
		nss, err := OfKind[corev1.Namespace](objs, "Namespace")
		if err != nil || len(nss) != 1 {
			t.Fatalf("%s: Namespaces %v %v", flavor, nss, err)
		}
		for k, v := range map[string]string{"kustomize.toolkit.fluxcd.io/prune": "disabled", "argocd.argoproj.io/sync-options": "Delete=false"} {
			if got := nss[0].Annotations[k]; got != v {
				t.Errorf("%s: Namespace annotation %s=%q, want %q", flavor, k, got, v)
			}
		}
	}
}

// The function's pullSecrets mount Secrets the way the pull-secret component does
// (TestVolumesReadableByTheAgentsGroup): readable by the agent's group 0.
func TestFunctionPullSecretsReadableByTheAgentsGroup(t *testing.T) {
	t.Parallel()
	out, err := Instance{Flavor: FlavorVanilla, PullSecrets: []string{"extra", "more"}}.Render()
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Objects(out)
	if err != nil {
		t.Fatal(err)
	}
	ds := decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet")
	sc := ds.Spec.Template.Spec.SecurityContext
	if sc == nil || sc.RunAsGroup == nil || *sc.RunAsGroup != 0 {
		t.Fatalf("pod securityContext %+v: want runAsGroup 0", sc)
	}
	secrets := 0
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Secret == nil {
			continue
		}
		secrets++
		if v.Secret.DefaultMode == nil || *v.Secret.DefaultMode&0o040 == 0 {
			t.Errorf("secret volume %s: defaultMode %v, not readable by group 0", v.Name, v.Secret.DefaultMode)
		}
	}
	if secrets != 2 {
		t.Errorf("%d secret volumes, want 2", secrets)
	}
}
