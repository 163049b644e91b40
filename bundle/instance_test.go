package bundle

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
)

// The in-memory build of the embedded bundle (what the KRM function runs) equals the build of
// an on-disk copy of the repository, for every overlay and component.
func TestRenderMatchesDisk(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	for _, b := range builds {
		flavor, comp, _ := strings.Cut(b.Name, "+")
		in := Instance{Flavor: flavor}
		if comp != "" {
			in.Components = []string{comp}
		}
		out, err := in.Render()
		if err != nil {
			t.Fatalf("%s: %v", b.Name, err)
		}
		if !bytes.Equal(out, b.YAML) {
			t.Errorf("%s: in-memory build differs from the on-disk one:\n%s", b.Name, firstDiff(b.YAML, out))
		}
	}
}

// Every value of an Instance reaches the agent's DaemonSet, over what the components set.
func TestInstanceValues(t *testing.T) {
	t.Parallel()
	res := &corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Gi")}}
	for _, flavor := range Flavors {
		in := Instance{
			Flavor:      flavor,
			Namespace:   "team-c",
			Name:        "values",
			Images:      []byte("busybox:1.36.1\n"),
			Components:  []string{"max-concurrent-nodes", "metrics-collector", "node-placement"},
			AgentImage:  "registry.example.com/team/prefetcher:v2@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
			PullSecrets: []string{"first", "second"},
			Args:        []string{"--max-concurrent-nodes=3"},
			Placement: Placement{
				NodeSelector:      map[string]string{"pool": "a"},
				Tolerations:       []corev1.Toleration{{Key: "k", Operator: corev1.TolerationOpExists}},
				Affinity:          &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{}},
				PriorityClassName: "system-node-critical",
			},
			Resources: res,
		}
		out, err := in.Render()
		if err != nil {
			t.Fatalf("%s: %v", flavor, err)
		}
		objs, err := Objects(out)
		if err != nil {
			t.Fatal(err)
		}
		ds := decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet")
		pod := ds.Spec.Template.Spec
		agent := pod.Containers[0]
		if ds.Name != "values" || ds.Namespace != "team-c" {
			t.Errorf("%s: DaemonSet %s/%s, want team-c/values", flavor, ds.Namespace, ds.Name)
		}
		if agent.Image != in.AgentImage {
			t.Errorf("%s: agent image %s, want %s", flavor, agent.Image, in.AgentImage)
		}
		if dep := decodeOne[appsv1.Deployment](t, objs, "Deployment"); dep.Spec.Template.Spec.Containers[0].Image != in.AgentImage {
			t.Errorf("%s: collector image %s, want the agent's %s", flavor, dep.Spec.Template.Spec.Containers[0].Image, in.AgentImage)
		}
		wantTail := []string{
			"--docker-config=" + PullSecretDir + "/first/.dockerconfigjson",
			"--docker-config=" + PullSecretDir + "/second/.dockerconfigjson",
			"--max-concurrent-nodes=3",
		}
		if len(agent.Args) < len(wantTail) || !slices.Equal(agent.Args[len(agent.Args)-len(wantTail):], wantTail) {
			t.Errorf("%s: agent args %v, want them to end with %v", flavor, agent.Args, wantTail)
		}
		for i, s := range in.PullSecrets {
			v := pod.Volumes[len(pod.Volumes)-len(in.PullSecrets)+i]
			m := agent.VolumeMounts[len(agent.VolumeMounts)-len(in.PullSecrets)+i]
			if v.Secret == nil || v.Secret.SecretName != s || m.Name != v.Name || m.MountPath != PullSecretDir+"/"+s || !m.ReadOnly {
				t.Errorf("%s: pull secret %s: volume %+v, mount %+v", flavor, s, v, m)
			}
		}
		// node-placement's values are replaced, not merged (but tolerations, below).
		if len(pod.NodeSelector) != 1 || pod.NodeSelector["pool"] != "a" {
			t.Errorf("%s: nodeSelector %v, want only pool=a", flavor, pod.NodeSelector)
		}
		// Tolerations are added: the agent's own startup taint's, node-placement's, then these.
		var keys []string
		for _, tol := range pod.Tolerations {
			keys = append(keys, tol.Key)
		}
		if want := append(nodelabel.StartupTaintKeys("values"), "dedicated", "k"); !slices.Equal(keys, want) {
			t.Errorf("%s: toleration keys %v, want %v", flavor, keys, want)
		}
		if pod.Affinity == nil || pod.Affinity.PodAntiAffinity == nil || pod.PriorityClassName != "system-node-critical" {
			t.Errorf("%s: affinity %v, priorityClassName %q", flavor, pod.Affinity, pod.PriorityClassName)
		}
		if !agent.Resources.Limits.Memory().Equal(resource.MustParse("1Gi")) || len(agent.Resources.Requests) != 0 {
			t.Errorf("%s: agent resources %v, want %v", flavor, agent.Resources, *res)
		}
	}
}

func TestInstanceRejectsUnknownNames(t *testing.T) {
	t.Parallel()
	for _, in := range []Instance{
		{Flavor: "windows"},
		{Flavor: FlavorVanilla, Components: []string{"no-such-component"}},
		{Flavor: FlavorVanilla, Components: []string{"../overlays/ocp"}},
		{Flavor: FlavorVanilla, AgentImage: "Not A Reference"},
	} {
		if _, err := in.Render(); err == nil {
			t.Errorf("%+v renders", in)
		}
	}
}
