package bundle

import (
	"fmt"
	"os"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// components/metrics-collector: a hardened collector Deployment and its ClusterIP Service,
// named per instance, and an agent flag that resolves to that Service in every instance.
func TestMetricsCollectorComponent(t *testing.T) {
	t.Parallel()
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	for _, flavor := range Flavors {
		for _, in := range []Instance{
			{Flavor: flavor},
			{Flavor: flavor, Namespace: "team-b", Name: "second"},
		} {
			in.Components = []string{"metrics-collector"}
			ns, name := in.Namespace, in.Name
			if ns == "" {
				ns = DefaultNamespace
			}
			if name == "" {
				name = DefaultInstance
			}
			t.Run(flavor+"/"+name, func(t *testing.T) {
				dir, err := os.MkdirTemp(tmp, "build")
				if err != nil {
					t.Fatal(err)
				}
				out, err := BuildInstance(root, dir, in)
				if err != nil {
					t.Fatal(err)
				}
				objs, err := Objects(out)
				if err != nil {
					t.Fatal(err)
				}
				checkCollector(t, objs, ns, name)
			})
		}
	}
}

func checkCollector(t *testing.T, objs []Object, ns, instance string) {
	t.Helper()
	ds := decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet")
	dep := decodeOne[appsv1.Deployment](t, objs, "Deployment")
	svc := decodeOne[corev1.Service](t, objs, "Service")
	want := instance + "-results-collector"
	if dep.Name != want || svc.Name != want || dep.Namespace != ns || svc.Namespace != ns {
		t.Errorf("collector objects %s/%s and %s/%s, want %s/%s", dep.Namespace, dep.Name, svc.Namespace, svc.Name, ns, want)
	}

	// The Service is ClusterIP and selects the collector's pods only.
	if svc.Spec.Type != corev1.ServiceTypeClusterIP {
		t.Errorf("Service type %q, want ClusterIP", svc.Spec.Type)
	}
	sel := labels.SelectorFromSet(svc.Spec.Selector)
	if !sel.Matches(labels.Set(dep.Spec.Template.Labels)) {
		t.Errorf("Service selector %v does not select the collector pods %v", svc.Spec.Selector, dep.Spec.Template.Labels)
	}
	if sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("Service selector %v also selects the agents %v", svc.Spec.Selector, ds.Spec.Template.Labels)
	}
	if dep.Spec.Selector == nil || labels.SelectorFromSet(dep.Spec.Selector.MatchLabels).Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("Deployment selector %v selects the agents' pods", dep.Spec.Selector)
	}
	if dep.Spec.Selector.MatchLabels["app.kubernetes.io/instance"] != instance {
		t.Errorf("Deployment selector %v lacks the instance", dep.Spec.Selector.MatchLabels)
	}
	if dep.Spec.Replicas == nil || *dep.Spec.Replicas != 1 || dep.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Errorf("collector Deployment: want 1 replica and Recreate (results live in one pod's memory)")
	}

	// A hardened pod.
	pod := dep.Spec.Template.Spec
	if psc := pod.SecurityContext; psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot ||
		psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("collector pod securityContext %+v: want runAsNonRoot and seccomp RuntimeDefault", pod.SecurityContext)
	}
	if len(pod.Volumes) != 0 {
		t.Errorf("collector pod has volumes %v", pod.Volumes)
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("collector pod has %d containers", len(pod.Containers))
	}
	c := pod.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.ReadOnlyRootFilesystem == nil ||
		!*sc.ReadOnlyRootFilesystem || (sc.Privileged != nil && *sc.Privileged) || sc.Capabilities == nil ||
		fmt.Sprint(sc.Capabilities.Drop) != "[ALL]" || len(sc.Capabilities.Add) != 0 {
		t.Errorf("collector container securityContext %+v: want no escalation, read-only root, drop ALL", sc)
	}
	if sc != nil && sc.RunAsUser != nil {
		t.Errorf("collector container pins uid %d: OpenShift's restricted SCC assigns one", *sc.RunAsUser)
	}
	if c.Image != ds.Spec.Template.Spec.Containers[0].Image {
		t.Errorf("collector image %q, agent image %q: want the same", c.Image, ds.Spec.Template.Spec.Containers[0].Image)
	}
	if len(c.Args) == 0 || c.Args[0] != "collect" {
		t.Errorf("collector args %v: want the collect command", c.Args)
	}
	if c.Resources.Limits.Memory().IsZero() || c.Resources.Requests.Memory().IsZero() {
		t.Errorf("collector resources %+v: want memory request and limit", c.Resources)
	}
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	var grpcPort int32
	for _, p := range svc.Spec.Ports {
		if _, ok := ports[p.TargetPort.String()]; !ok {
			t.Errorf("Service port %s targets %s, not a named collector port", p.Name, p.TargetPort.String())
		}
		if p.Name == "grpc" {
			grpcPort = p.Port
		}
	}
	if !hasArgPrefix(c.Args, fmt.Sprintf("--grpc-address=:%d", ports["grpc"])) {
		t.Errorf("collector args %v do not listen on the grpc port %d", c.Args, ports["grpc"])
	}

	// The agent's flag, as the kubelet expands it from the agent's environment, names the
	// Service in this instance's namespace.
	agent := ds.Spec.Template.Spec.Containers[0]
	addr := expand(ns, ds.Spec.Template, agent, oneArg(t, agent.Args, "--collector-address="))
	if wantAddr := fmt.Sprintf("%s.%s.svc:%d", svc.Name, ns, grpcPort); addr != wantAddr {
		t.Errorf("--collector-address expands to %s, want %s", addr, wantAddr)
	}

	// Only the instance's agents may write: the collector accepts the agents' ServiceAccount,
	// with tokens of the audience the agents' projected volume asks for, which the agent reads.
	if sa := expand(ns, dep.Spec.Template, c, oneArg(t, c.Args, "--agent-service-account=")); sa != ns+"/"+ds.Spec.Template.Spec.ServiceAccountName {
		t.Errorf("collector accepts ServiceAccount %s, the agents run as %s/%s", sa, ns, ds.Spec.Template.Spec.ServiceAccountName)
	}
	audience := oneArg(t, c.Args, "--token-audience=")
	tokenFile := oneArg(t, agent.Args, "--collector-token-file=")
	var tokenVolume *corev1.ServiceAccountTokenProjection
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Projected == nil || len(v.Projected.Sources) != 1 || v.Projected.Sources[0].ServiceAccountToken == nil {
			continue
		}
		for _, m := range agent.VolumeMounts {
			if m.Name == v.Name && tokenFile == m.MountPath+"/"+v.Projected.Sources[0].ServiceAccountToken.Path {
				tokenVolume = v.Projected.Sources[0].ServiceAccountToken
			}
		}
	}
	switch {
	case tokenVolume == nil:
		t.Errorf("--collector-token-file=%s is not a projected serviceAccountToken the agent mounts", tokenFile)
	case tokenVolume.Audience != audience || audience == "":
		t.Errorf("agent token audience %q, collector wants %q", tokenVolume.Audience, audience)
	case tokenVolume.ExpirationSeconds == nil || *tokenVolume.ExpirationSeconds > 3600:
		t.Errorf("agent token lives %v seconds, want at most an hour", tokenVolume.ExpirationSeconds)
	}

	// The collector's own ServiceAccount may create TokenReviews and nothing else.
	wantSA := instance + "-results-collector"
	if pod.ServiceAccountName != wantSA || (pod.AutomountServiceAccountToken != nil && !*pod.AutomountServiceAccountToken) {
		t.Errorf("collector pod runs as %q (automount %v), want %s with its token", pod.ServiceAccountName, pod.AutomountServiceAccountToken, wantSA)
	}
	var found bool
	for _, sa := range decodeAll[corev1.ServiceAccount](t, objs, "ServiceAccount") {
		found = found || (sa.Name == wantSA && sa.Namespace == ns)
	}
	if !found {
		t.Errorf("no ServiceAccount %s/%s", ns, wantSA)
	}
	wantRole := fmt.Sprintf("image-prefetcher.%s.%s.results-collector", ns, instance)
	var role *rbacv1.ClusterRole
	for _, r := range decodeAll[rbacv1.ClusterRole](t, objs, "ClusterRole") {
		if r.Name == wantRole {
			role = r
		}
	}
	if role == nil {
		t.Fatalf("no ClusterRole %s", wantRole)
	}
	if len(role.Rules) != 1 || fmt.Sprint(role.Rules[0].APIGroups, role.Rules[0].Resources, role.Rules[0].Verbs) != "[authentication.k8s.io] [tokenreviews] [create]" ||
		len(role.Rules[0].ResourceNames) != 0 || len(role.Rules[0].NonResourceURLs) != 0 {
		t.Errorf("collector ClusterRole rules %+v, want create on tokenreviews only", role.Rules)
	}
	bound := false
	for _, b := range decodeAll[rbacv1.ClusterRoleBinding](t, objs, "ClusterRoleBinding") {
		if b.RoleRef.Name != wantRole {
			continue
		}
		if b.Name != wantRole || len(b.Subjects) != 1 || b.Subjects[0].Kind != "ServiceAccount" ||
			b.Subjects[0].Name != wantSA || b.Subjects[0].Namespace != ns {
			t.Errorf("ClusterRoleBinding %s binds %+v, want only ServiceAccount %s/%s", b.Name, b.Subjects, ns, wantSA)
		}
		bound = true
	}
	if !bound {
		t.Errorf("no ClusterRoleBinding of %s", wantRole)
	}
}

// oneArg returns the value of the one argument with prefix.
func oneArg(t *testing.T, args []string, prefix string) string {
	t.Helper()
	var out []string
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, prefix); ok {
			out = append(out, v)
		}
	}
	if len(out) != 1 {
		t.Fatalf("args %v: %d of %s..., want one", args, len(out), prefix)
	}
	return out[0]
}

// expand replaces $(VAR) in v as the kubelet does from c's environment in a pod of template
// in namespace ns.
func expand(ns string, template corev1.PodTemplateSpec, c corev1.Container, v string) string {
	for _, e := range c.Env {
		var value string
		switch {
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace":
			value = ns
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.labels['app.kubernetes.io/instance']":
			value = template.Labels["app.kubernetes.io/instance"]
		case e.ValueFrom == nil:
			value = e.Value
		default:
			continue
		}
		v = strings.ReplaceAll(v, "$("+e.Name+")", value)
	}
	return v
}
