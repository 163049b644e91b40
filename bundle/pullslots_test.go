package bundle

import (
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// components/max-concurrent-nodes composes with both flavors, also next to
// every other component and for a second instance: the agent gets the flag
// and its namespace, and may use Leases only in its own namespace, through a
// Role and RoleBinding named per instance.
func TestMaxConcurrentNodesComponent(t *testing.T) {
	t.Parallel()
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	for _, flavor := range Flavors {
		comps, err := FlavorComponents(flavor)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(comps, "max-concurrent-nodes") {
			t.Fatalf("components %v lack max-concurrent-nodes", comps)
		}
		for _, in := range []Instance{
			{Flavor: flavor, Components: []string{"max-concurrent-nodes"}},
			{Flavor: flavor, Namespace: "team-b", Name: "team-b-images", Components: comps},
		} {
			ns, name := in.Namespace, in.Name
			if ns == "" {
				ns, name = DefaultNamespace, DefaultInstance
			}
			t.Run(flavor+"/"+name, func(t *testing.T) {
				out, err := BuildInstance(root, tmp, in)
				if err != nil {
					t.Fatal(err)
				}
				objs, err := Objects(out)
				if err != nil {
					t.Fatal(err)
				}
				checkPullSlots(t, objs, ns, name)
			})
		}
	}
}

func checkPullSlots(t *testing.T, objs []Object, ns, instance string) {
	t.Helper()
	want := instance + "-pull-slots"
	var role *rbacv1.Role
	for _, r := range decodeAll[rbacv1.Role](t, objs, "Role") {
		if r.Name == want {
			role = r
		}
	}
	var binding *rbacv1.RoleBinding
	for _, b := range decodeAll[rbacv1.RoleBinding](t, objs, "RoleBinding") {
		if b.Name == want {
			binding = b
		}
	}
	if role == nil || binding == nil {
		t.Fatalf("no Role and RoleBinding %s (role %v, binding %v)", want, role != nil, binding != nil)
	}
	for _, r := range decodeAll[rbacv1.ClusterRole](t, objs, "ClusterRole") {
		for _, rule := range r.Rules {
			if slices.Contains(rule.Resources, "leases") {
				t.Errorf("ClusterRole %s grants leases cluster-wide", r.Name)
			}
		}
	}
	ds := decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet")
	if role.Name != want || role.Namespace != ns || binding.Name != want || binding.Namespace != ns {
		t.Errorf("Role %s/%s, RoleBinding %s/%s: want %s/%s", role.Namespace, role.Name, binding.Namespace, binding.Name, ns, want)
	}
	if len(role.Rules) != 1 || !slices.Equal(role.Rules[0].APIGroups, []string{"coordination.k8s.io"}) ||
		!slices.Equal(role.Rules[0].Resources, []string{"leases"}) {
		t.Errorf("Role rules %+v: want leases only", role.Rules)
	}
	for _, v := range role.Rules[0].Verbs {
		if !slices.Contains([]string{"get", "list", "watch", "create", "update"}, v) {
			t.Errorf("Role grants %s on leases", v)
		}
	}
	if binding.RoleRef.Kind != "Role" || binding.RoleRef.Name != want {
		t.Errorf("RoleBinding refers to %s %s, want Role %s", binding.RoleRef.Kind, binding.RoleRef.Name, want)
	}
	if len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "ServiceAccount" || binding.Subjects[0].Name != instance || binding.Subjects[0].Namespace != ns {
		t.Errorf("RoleBinding subjects %+v: want the ServiceAccount %s/%s", binding.Subjects, ns, instance)
	}
	c := ds.Spec.Template.Spec.Containers[0]
	if !slices.Contains(c.Args, "--max-concurrent-nodes=10") {
		t.Errorf("agent args %v lack --max-concurrent-nodes=10", c.Args)
	}
	found := false
	for _, e := range c.Env {
		if e.Name == "POD_NAMESPACE" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace" {
			found = true
		}
	}
	if !found {
		t.Errorf("agent has no POD_NAMESPACE from the downward API: %+v", c.Env)
	}
}
