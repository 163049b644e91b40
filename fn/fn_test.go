package fn_test

import (
	"encoding/json"
	"flag"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/kustomize/kyaml/fn/framework/frameworktestutil"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/fn"
	"github.com/nodeprefetch/image-prefetcher/internal/manifesttest"
)

var update = flag.Bool("update", false, "rewrite testdata/*/expected.yaml from the function's output")

// TestGolden runs every testdata/<case>/ (config.yaml, input*.yaml) through the function's
// standalone command and compares expected.yaml, or errors.txt with what it prints on stderr:
// each non-empty line of errors.txt must occur in it (-update writes both).
func TestGolden(t *testing.T) {
	t.Parallel()
	c := frameworktestutil.CommandResultsChecker{
		Command:                  fn.NewCommand,
		UpdateExpectedFromActual: *update,
		ErrorAssertionFunc:       eachLineOccurs,
	}
	c.Assert(t)
	want := []string{"bad-image", "bad-name", "credential-provider", "images-file", "node-identity-taint", "ocp", "ocp-runtime-crio", "placement", "pull-secret", "rerender", "same-name", "second-config", "two-configs", "unknown-flavor", "vanilla", "workloads", "workloads-bad-config", "workloads-bad-image"}
	var ran []string
	for _, p := range c.TestCasesRun() {
		ran = append(ran, p[strings.LastIndex(p, "/")+1:])
	}
	if !reflect.DeepEqual(ran, want) {
		t.Errorf("golden cases run %v, want %v", ran, want)
	}
}

func eachLineOccurs(t *testing.T, expected, actual string) {
	t.Helper()
	for _, line := range strings.Split(expected, "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.Contains(actual, line) {
			t.Errorf("error output lacks %q; it is:\n%s", line, actual)
		}
	}
}

// TestMatchesBundle holds the function to the bundle: for every flavor, every component, each
// field that adds one and a configuration with every field, its output equals what kustomize
// builds from a copy of the overlay a user edits by hand with the same values (bundle.Instance
// written to disk), but for the managed-by label.
func TestMatchesBundle(t *testing.T) {
	t.Parallel()
	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	type testCase struct {
		name string
		spec string // YAML lines of spec besides namespace and images
		want bundle.Instance
	}
	var cases []testCase
	for _, flavor := range bundle.Flavors {
		f := "flavor: " + flavor + "\n"
		add := func(name, spec string, want bundle.Instance) {
			want.Flavor = flavor
			cases = append(cases, testCase{flavor + "/" + name, f + spec, want})
		}
		add("plain", "", bundle.Instance{})
		// The components a flavor includes are refused (TestGolden's ocp-runtime-crio).
		comps, err := bundle.FlavorComponents(flavor)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range comps {
			add("components-"+c, "components: ["+c+"]\n", bundle.Instance{Components: []string{c}})
		}
		add("spec.credentialProvider-gke", "credentialProvider: gke\n", bundle.Instance{Components: []string{"gke-credential-provider"}})
		add("spec.credentialProvider-ecr", "credentialProvider: ecr\n", bundle.Instance{Components: []string{"ecr-credential-provider"}})
		add("spec.prometheus", "prometheus: true\n", bundle.Instance{Components: []string{"prometheus"}})
		add("spec.metricsCollector", "metricsCollector: true\n", bundle.Instance{Components: []string{"metrics-collector"}})
		add("spec.startupTaint", "startupTaint: true\n", bundle.Instance{Components: []string{"startup-taint"}})
		add("spec.maxConcurrentNodes", "maxConcurrentNodes: 3\n",
			bundle.Instance{Components: []string{"max-concurrent-nodes"}, Args: []string{"--max-concurrent-nodes=3"}})
		add("everything", `components: [pull-secret, node-placement]
credentialProvider: gke
prometheus: true
metricsCollector: true
maxConcurrentNodes: 3
maxParallelPulls: 2
pullSecrets: [registry-a, registry-b]
agentImage: registry.example.com/image-prefetcher:v1.0.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
placement:
  nodeSelector: {node.example.com/pool: gpu}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/arch, operator: In, values: [amd64]}]}]}}}
  priorityClassName: system-node-critical
resources: {requests: {cpu: 20m, memory: 64Mi}, limits: {memory: 256Mi}}
`, bundle.Instance{
			Components:  []string{"gke-credential-provider", "max-concurrent-nodes", "metrics-collector", "node-placement", "prometheus", "pull-secret"},
			Args:        []string{"--max-parallel-pulls=2", "--max-concurrent-nodes=3"},
			PullSecrets: []string{"registry-a", "registry-b"},
			AgentImage:  "registry.example.com/image-prefetcher:v1.0.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
			Placement: bundle.Placement{
				NodeSelector:      map[string]string{"node.example.com/pool": "gpu"},
				Tolerations:       []corev1.Toleration{{Key: "nvidia.com/gpu", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}},
				Affinity:          &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "kubernetes.io/arch", Operator: corev1.NodeSelectorOpIn, Values: []string{"amd64"}}}}}}}},
				PriorityClassName: "system-node-critical",
			},
			Resources: &corev1.ResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("20m"), corev1.ResourceMemory: resource.MustParse("64Mi")},
				Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")},
			},
		})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.want
			in.Namespace, in.Name = "team-a", "team-a-images"
			in.Images = []byte("busybox:1.36.1\nregistry.example.com/team/app:2.0\n")
			built, err := bundle.BuildInstance(root, t.TempDir(), in)
			if err != nil {
				t.Fatal(err)
			}
			cfg := "apiVersion: " + fn.APIVersion + "\nkind: " + fn.Kind + "\nmetadata:\n  name: team-a-images\nspec:\n" +
				"  namespace: team-a\n  images: [busybox:1.36.1, registry.example.com/team/app:2.0]\n"
			for line := range strings.Lines(tc.spec) {
				cfg += "  " + line
			}
			c, results := fn.Decode(yaml.MustParse(cfg), "")
			if results.ExitCode() != 0 {
				t.Fatal(results)
			}
			objs, err := c.Filter(nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, o := range objs {
				if o.GetLabels()["app.kubernetes.io/managed-by"] != fn.ManagedBy {
					t.Errorf("%s/%s lacks the managed-by label", o.GetKind(), o.GetName())
				}
				if _, err := o.Pipe(yaml.Lookup("metadata", "labels"), yaml.Clear("app.kubernetes.io/managed-by")); err != nil {
					t.Fatal(err)
				}
			}
			got, want := manifesttest.ByID(t, objs), manifesttest.YAMLByID(t, built)
			for id, w := range want {
				if !reflect.DeepEqual(got[id], w) {
					g, _ := json.MarshalIndent(got[id], "", " ")
					wj, _ := json.MarshalIndent(w, "", " ")
					t.Errorf("%s:\nfunction: %s\nbundle:   %s", id, g, wj)
				}
			}
			for id := range got {
				if _, ok := want[id]; !ok {
					t.Errorf("%s: generated by the function, not by the bundle", id)
				}
			}
		})
	}
}
