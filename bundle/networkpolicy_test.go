package bundle

import (
	"fmt"
	"os"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// components/network-policy: the collector's gRPC port admits only this instance's agents; the
// agents' metrics port only the monitoring namespace; nothing else reaches either pod, and the
// policies of one instance neither select nor admit the pods of another.
func TestNetworkPolicyComponent(t *testing.T) {
	t.Parallel()
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	for _, flavor := range Flavors {
		for _, in := range []Instance{{Flavor: flavor}, {Flavor: flavor, Namespace: "team-b", Name: "second"}} {
			in.Components = []string{"metrics-collector", "network-policy"}
			t.Run(fmt.Sprintf("%s/%s", flavor, in.Name), func(t *testing.T) {
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
				checkNetworkPolicies(t, objs)
			})
		}
	}
}

func checkNetworkPolicies(t *testing.T, objs []Object) {
	t.Helper()
	ds := decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet")
	dep := decodeOne[appsv1.Deployment](t, objs, "Deployment")
	instance := ds.Spec.Template.Labels["app.kubernetes.io/instance"]
	agentPod, collectorPod := labels.Set(ds.Spec.Template.Labels), labels.Set(dep.Spec.Template.Labels)
	// The pods of another instance of the same bundle.
	otherAgent, otherCollector := labels.Set{}, labels.Set{}
	for k, v := range agentPod {
		otherAgent[k] = v
	}
	for k, v := range collectorPod {
		otherCollector[k] = v
	}
	otherAgent["app.kubernetes.io/instance"], otherCollector["app.kubernetes.io/instance"] = "other", "other"

	policies := map[string]*networkingv1.NetworkPolicy{}
	for _, p := range decodeAll[networkingv1.NetworkPolicy](t, objs, "NetworkPolicy") {
		if p.Namespace != ds.Namespace {
			t.Errorf("NetworkPolicy %s in namespace %q, want %s", p.Name, p.Namespace, ds.Namespace)
		}
		policies[p.Name] = p
	}
	agents, collector := policies[instance+"-agents"], policies[instance+"-results-collector"]
	if agents == nil || collector == nil || len(policies) != 2 {
		t.Fatalf("NetworkPolicies %v, want %s-agents and %s-results-collector", policies, instance, instance)
	}
	selects := func(p *networkingv1.NetworkPolicy, pod labels.Set) bool {
		sel, err := metav1.LabelSelectorAsSelector(&p.Spec.PodSelector)
		if err != nil {
			t.Fatal(err)
		}
		return sel.Matches(pod)
	}
	for _, c := range []struct {
		policy *networkingv1.NetworkPolicy
		pod    labels.Set
		want   bool
	}{
		{agents, agentPod, true}, {agents, collectorPod, false}, {agents, otherAgent, false},
		{collector, collectorPod, true}, {collector, agentPod, false}, {collector, otherCollector, false},
	} {
		if got := selects(c.policy, c.pod); got != c.want {
			t.Errorf("%s selects pod %v: %v, want %v", c.policy.Name, c.pod, got, c.want)
		}
	}
	for _, p := range []*networkingv1.NetworkPolicy{agents, collector} {
		if fmt.Sprint(p.Spec.PolicyTypes) != "[Ingress]" || len(p.Spec.Ingress) != 1 {
			t.Fatalf("%s: policy types %v with %d ingress rules, want Ingress with one rule", p.Name, p.Spec.PolicyTypes, len(p.Spec.Ingress))
		}
	}

	// The agents' metrics port, from the monitoring namespace only.
	rule := agents.Spec.Ingress[0]
	checkPorts(t, agents.Name, rule.Ports, ds.Spec.Template.Spec.Containers[0], "metrics")
	if len(rule.From) != 1 || rule.From[0].PodSelector != nil || rule.From[0].IPBlock != nil || rule.From[0].NamespaceSelector == nil ||
		fmt.Sprint(rule.From[0].NamespaceSelector.MatchLabels) != "map[kubernetes.io/metadata.name:monitoring]" {
		t.Errorf("%s admits %+v, want the monitoring namespace only", agents.Name, rule.From)
	}

	// The collector's gRPC port, from this instance's agents only.
	rule = collector.Spec.Ingress[0]
	checkPorts(t, collector.Name, rule.Ports, dep.Spec.Template.Spec.Containers[0], "grpc")
	if len(rule.From) != 1 || rule.From[0].PodSelector == nil || rule.From[0].NamespaceSelector != nil || rule.From[0].IPBlock != nil {
		t.Fatalf("%s admits %+v, want this namespace's agent pods only", collector.Name, rule.From)
	}
	from, err := metav1.LabelSelectorAsSelector(rule.From[0].PodSelector)
	if err != nil {
		t.Fatal(err)
	}
	if !from.Matches(agentPod) || from.Matches(otherAgent) || from.Matches(collectorPod) {
		t.Errorf("%s admits pods %v: want this instance's agents (%v) only", collector.Name, from, agentPod)
	}
}

// checkPorts requires ports to be exactly the container's named TCP port.
func checkPorts(t *testing.T, policy string, ports []networkingv1.NetworkPolicyPort, c corev1.Container, name string) {
	t.Helper()
	if len(ports) != 1 || ports[0].Port == nil || ports[0].Port.String() != name || ports[0].EndPort != nil ||
		ports[0].Protocol == nil || *ports[0].Protocol != corev1.ProtocolTCP {
		t.Errorf("%s opens ports %+v, want only %s/TCP", policy, ports, name)
	}
	for _, p := range c.Ports {
		if p.Name == name {
			return
		}
	}
	t.Errorf("%s opens port %s, which container %s does not name", policy, name, c.Name)
}
