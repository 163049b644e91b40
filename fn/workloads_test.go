package fn

import (
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/distribution/reference"
	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/kustomize/kyaml/yaml"
)

// podSpec is a pod spec with one init container, one container, one ephemeral container and
// an image volume beside another volume, their images named after tag.
func podSpec(indent, tag string) string {
	s := fmt.Sprintf(`volumes:
- name: scratch
  emptyDir: {}
- name: model
  image:
    reference: registry.example.com/model:%[1]s
    pullPolicy: IfNotPresent
initContainers:
- name: init
  image: registry.example.com/init:%[1]s
containers:
- name: main
  image: registry.example.com/main:%[1]s
ephemeralContainers:
- name: debug
  image: registry.example.com/ephemeral:%[1]s
`, tag)
	var b strings.Builder
	for line := range strings.Lines(s) {
		b.WriteString(indent + line)
	}
	return b.String()
}

func parseItems(t *testing.T, docs ...string) []*yaml.RNode {
	t.Helper()
	items, err := kio.FromBytes([]byte(strings.Join(docs, "\n---\n")))
	if err != nil {
		t.Fatal(err)
	}
	return items
}

func selection(t *testing.T, w FromWorkloads) *workloadSelection {
	t.Helper()
	r := &reporter{}
	w.validate(r)
	if len(r.results) > 0 {
		t.Fatalf("invalid selection %+v: %v", w, r.results)
	}
	s, err := w.compile()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func collect(t *testing.T, s *workloadSelection, items []*yaml.RNode) map[string][]string {
	t.Helper()
	imgs, results := s.workloadImages(items)
	if len(results) > 0 {
		t.Fatalf("results: %v", results)
	}
	got := map[string][]string{}
	for _, w := range imgs {
		got[w.ref] = w.workloads
	}
	return got
}

// TestWorkloadKinds: every workload kind gives the images of its init containers, containers
// and image volumes, not of its ephemeral containers; kinds of other API groups are not
// workloads.
func TestWorkloadKinds(t *testing.T) {
	t.Parallel()
	docs := []string{
		"apiVersion: v1\nkind: Pod\nmetadata: {name: pod}\nspec:\n" + podSpec("  ", "pod"),
		"apiVersion: v1\nkind: PodTemplate\nmetadata: {name: podtemplate}\ntemplate:\n  spec:\n" + podSpec("    ", "podtemplate"),
		"apiVersion: v1\nkind: ReplicationController\nmetadata: {name: rc}\nspec:\n  template:\n    spec:\n" + podSpec("      ", "rc"),
		"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: deployment}\nspec:\n  template:\n    spec:\n" + podSpec("      ", "deployment"),
		"apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: statefulset}\nspec:\n  template:\n    spec:\n" + podSpec("      ", "statefulset"),
		"apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: daemonset}\nspec:\n  template:\n    spec:\n" + podSpec("      ", "daemonset"),
		"apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: replicaset}\nspec:\n  template:\n    spec:\n" + podSpec("      ", "replicaset"),
		"apiVersion: batch/v1\nkind: Job\nmetadata: {name: job}\nspec:\n  template:\n    spec:\n" + podSpec("      ", "job"),
		"apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: cronjob}\nspec:\n  jobTemplate:\n    spec:\n      template:\n        spec:\n" + podSpec("          ", "cronjob"),
		// Same kind, another group: a custom resource, not a workload.
		"apiVersion: example.com/v1\nkind: Deployment\nmetadata: {name: custom}\nspec:\n  template:\n    spec:\n" + podSpec("      ", "custom"),
		// Not a workload at all.
		"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config}\ndata: {image: registry.example.com/main:config}\n",
	}
	got := collect(t, selection(t, FromWorkloads{}), parseItems(t, docs...))
	want := map[string][]string{}
	for _, w := range []struct{ kind, tag string }{
		{"Pod", "pod"}, {"PodTemplate", "podtemplate"}, {"ReplicationController", "rc"},
		{"Deployment", "deployment"}, {"StatefulSet", "statefulset"}, {"DaemonSet", "daemonset"},
		{"ReplicaSet", "replicaset"}, {"Job", "job"}, {"CronJob", "cronjob"},
	} {
		name := []string{w.kind + "/" + w.tag}
		want["registry.example.com/init:"+w.tag] = name
		want["registry.example.com/main:"+w.tag] = name
		want["registry.example.com/model:"+w.tag] = []string{"volume model of " + name[0]}
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("images:\n got %v\nwant %v", got, want)
	}
}

// TestWorkloadSelection: namespaces, label selector, the opt-out annotation, and the items that
// are never sources.
func TestWorkloadSelection(t *testing.T) {
	t.Parallel()
	deploy := func(name, ns, labels, annotations string) string {
		meta := "name: " + name
		if ns != "" {
			meta += ", namespace: " + ns
		}
		if labels != "" {
			meta += ", labels: {" + labels + "}"
		}
		if annotations != "" {
			meta += ", annotations: {" + annotations + "}"
		}
		return "apiVersion: apps/v1\nkind: Deployment\nmetadata: {" + meta + "}\nspec:\n  template:\n    spec:\n      containers:\n      - {name: c, image: registry.example.com/" + name + ":1}\n"
	}
	items := parseItems(t,
		deploy("web", "shop", "tier: front, team: shop", ""),
		deploy("api", "shop", "tier: back, team: shop", ""),
		deploy("batch", "shop", "tier: back", `image-prefetcher.stackrox.io/prefetch: "false"`),
		deploy("kept", "shop", "tier: back", `image-prefetcher.stackrox.io/prefetch: "true"`),
		deploy("grafana", "monitoring", "team: observability", ""),
		deploy("nons", "", "tier: front", ""),
		deploy("local", "shop", "", `config.kubernetes.io/local-config: "true"`),
		// An instance's own agent: its image must not enter the list on the next render.
		deploy("agent", "prefetch", "app.kubernetes.io/managed-by: image-prefetcher-fn, app.kubernetes.io/instance: other", ""),
	)
	tests := []struct {
		name string
		sel  FromWorkloads
		want []string
	}{
		{"all", FromWorkloads{}, []string{"api", "grafana", "kept", "nons", "web"}},
		{"namespace", FromWorkloads{Namespaces: []string{"shop"}}, []string{"api", "kept", "web"}},
		{"no namespace is default", FromWorkloads{Namespaces: []string{"default", "monitoring"}}, []string{"grafana", "nons"}},
		{"equality selector", FromWorkloads{Selector: "tier=back"}, []string{"api", "kept"}},
		{"set selector", FromWorkloads{Selector: "team in (shop, observability), tier!=back"}, []string{"grafana", "web"}},
		{"existence selector", FromWorkloads{Selector: "!team"}, []string{"kept", "nons"}},
		{"namespace and selector", FromWorkloads{Namespaces: []string{"shop"}, Selector: "tier=front"}, []string{"web"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := collect(t, selection(t, tc.sel), items)
			var names []string
			for ref, users := range got {
				if len(users) != 1 {
					t.Errorf("%s used by %v", ref, users)
				}
				named, err := reference.ParseNormalizedNamed(ref)
				if err != nil {
					t.Fatal(err)
				}
				names = append(names, reference.Path(named))
			}
			if !equalSets(names, tc.want) {
				t.Errorf("selected %v, want %v", names, tc.want)
			}
		})
	}
}

func equalSets(a, b []string) bool {
	m := map[string]int{}
	for _, s := range a {
		m[s]++
	}
	for _, s := range b {
		m[s]--
	}
	for _, n := range m {
		if n != 0 {
			return false
		}
	}
	return true
}

// TestWorkloadImagesNormalized: two spellings of one image are one entry naming both
// workloads, a digest stays whole, the list is sorted, and one workload using an image twice
// is named once.
func TestWorkloadImagesNormalized(t *testing.T) {
	t.Parallel()
	const dig = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	items := parseItems(t,
		"apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x}\nspec:\n  initContainers: [{name: i, image: busybox}]\n  containers: [{name: c, image: busybox}, {name: d, image: 'quay.io/a/b:1@"+dig+"'}]\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec:\n  containers: [{name: c, image: docker.io/library/busybox:latest}, {name: d, image: 'quay.io/a/b@"+dig+"'}]\n",
	)
	imgs, results := selection(t, FromWorkloads{}).workloadImages(items)
	if len(results) > 0 {
		t.Fatal(results)
	}
	want := []workloadImage{
		{"docker.io/library/busybox:latest", []string{"Pod/x/a", "Pod/x/b"}},
		{"quay.io/a/b:1@" + dig, []string{"Pod/x/b"}},
		{"quay.io/a/b@" + dig, []string{"Pod/x/a"}},
	}
	if !reflect.DeepEqual(imgs, want) {
		t.Errorf("images:\n got %+v\nwant %+v", imgs, want)
	}
}

// TestImageVolumes: an image volume's reference is normalized like a container's image; the
// comment names the volume and its workload, so an image both a container and a volume use
// names both; include and exclude apply to volumes too, and so does the opt-out annotation.
func TestImageVolumes(t *testing.T) {
	t.Parallel()
	const dig = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	items := parseItems(t,
		"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api, namespace: shop}\nspec:\n  template:\n    spec:\n"+
			"      containers: [{name: api, image: registry.example.com/shop/api:2.4.0}]\n"+
			"      volumes:\n"+
			"      - {name: model, image: {reference: registry.example.com/models/ranker:v3, pullPolicy: IfNotPresent}}\n"+
			"      - {name: tokenizer, image: {reference: 'registry.example.com/models/tokenizer@"+dig+"'}}\n"+
			"      - {name: same-as-container, image: {reference: registry.example.com/shop/api:2.4.0}}\n"+
			"      - {name: config, configMap: {name: api}}\n"+
			"      - {name: nothing, image: null}\n",
		"apiVersion: batch/v1\nkind: Job\nmetadata: {name: warmup, namespace: shop}\nspec:\n  template:\n    spec:\n"+
			"      containers: [{name: c, image: busybox}]\n"+
			"      volumes: [{name: weights, image: {reference: 'registry.example.com/models/ranker:v3'}}, {name: data, image: {reference: ollama/llama}}]\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: skipped, namespace: shop, annotations: {image-prefetcher.stackrox.io/prefetch: 'false'}}\nspec:\n"+
			"  containers: [{name: c, image: busybox}]\n  volumes: [{name: m, image: {reference: registry.example.com/models/opted-out:1}}]\n",
	)
	imgs, results := selection(t, FromWorkloads{}).workloadImages(items)
	if len(results) > 0 {
		t.Fatal(results)
	}
	want := []workloadImage{
		{"docker.io/library/busybox:latest", []string{"Job/shop/warmup"}},
		{"docker.io/ollama/llama:latest", []string{"volume data of Job/shop/warmup"}},
		{"registry.example.com/models/ranker:v3", []string{"volume model of Deployment/shop/api", "volume weights of Job/shop/warmup"}},
		{"registry.example.com/models/tokenizer@" + dig, []string{"volume tokenizer of Deployment/shop/api"}},
		{"registry.example.com/shop/api:2.4.0", []string{"Deployment/shop/api", "volume same-as-container of Deployment/shop/api"}},
	}
	if !reflect.DeepEqual(imgs, want) {
		t.Errorf("images:\n got %+v\nwant %+v", imgs, want)
	}
	var refs []string
	for ref := range collect(t, selection(t, FromWorkloads{Include: []string{"registry.example.com/models/*"}, Exclude: []string{"*/*/tokenizer@*"}}), items) {
		refs = append(refs, ref)
	}
	if want := []string{"registry.example.com/models/ranker:v3"}; !reflect.DeepEqual(refs, want) {
		t.Errorf("include and exclude on volumes give %v, want %v", refs, want)
	}
}

// TestPatterns: include and exclude match the registry, the repository or the whole
// reference, fully qualified or short.
func TestPatterns(t *testing.T) {
	t.Parallel()
	tests := []struct {
		pattern, image string
		want           bool
	}{
		{"registry.example.com", "registry.example.com/team/app:1", true},
		{"*.example.com", "registry.example.com/team/app:1", true},
		{"registry.example.com", "other.example.com/team/app:1", false},
		{"docker.io", "nginx:1.27", true},
		{"nginx", "nginx:1.27", true},
		{"nginx", "docker.io/library/nginx:1.27", true},
		{"docker.io/library/nginx", "nginx", true},
		{"nginx:1.*", "nginx:1.27", true},
		{"nginx:1.*", "nginx:2.0", false},
		{"docker.io/library/nginx:1.27", "nginx:1.27", true},
		{"nicolaka/*", "nicolaka/netshoot:v0.13", true},
		{"*/image-prefetcher", "127.0.0.1:5000/image-prefetcher:dev", true},
		{"*/image-prefetcher:*", "127.0.0.1:5000/image-prefetcher@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", false},
		{"*/image-prefetcher@*", "127.0.0.1:5000/image-prefetcher@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", true},
		// '*' stops at '/': the registry's host alone is the pattern of a registry.
		{"registry.example.com/*", "registry.example.com/team/app:1", false},
		{"registry.example.com/*/*", "registry.example.com/team/app:1", true},
		{"team/app", "registry.example.com/team/app:1", false},
	}
	for _, tc := range tests {
		if err := checkPattern(tc.pattern); err != nil {
			t.Fatalf("pattern %q: %v", tc.pattern, err)
		}
		named, err := reference.ParseNormalizedNamed(tc.image)
		if err != nil {
			t.Fatal(err)
		}
		named = reference.TagNameOnly(named)
		if got := matchPattern(tc.pattern, named); got != tc.want {
			t.Errorf("pattern %q, image %q: %v, want %v", tc.pattern, tc.image, got, tc.want)
		}
	}
	for _, bad := range []string{"", "[", "a[b", "nginx:[1-", `x\`} {
		if checkPattern(bad) == nil {
			t.Errorf("pattern %q accepted", bad)
		}
	}
}

// TestIncludeExclude: include keeps only matching images, exclude then removes its matches.
func TestIncludeExclude(t *testing.T) {
	t.Parallel()
	items := parseItems(t, "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n"+
		"  - {name: a, image: registry.example.com/team/app:1}\n"+
		"  - {name: b, image: registry.example.com/team/debug:1}\n"+
		"  - {name: c, image: nginx:1.27}\n"+
		"  - {name: d, image: quay.io/prometheus/node-exporter:v1.8.2}\n")
	tests := []struct {
		name string
		sel  FromWorkloads
		want []string
	}{
		{"neither", FromWorkloads{}, []string{"docker.io/library/nginx:1.27", "quay.io/prometheus/node-exporter:v1.8.2", "registry.example.com/team/app:1", "registry.example.com/team/debug:1"}},
		{"include", FromWorkloads{Include: []string{"registry.example.com", "nginx"}}, []string{"docker.io/library/nginx:1.27", "registry.example.com/team/app:1", "registry.example.com/team/debug:1"}},
		{"exclude", FromWorkloads{Exclude: []string{"quay.io", "*/*/debug"}}, []string{"docker.io/library/nginx:1.27", "registry.example.com/team/app:1"}},
		{"both", FromWorkloads{Include: []string{"registry.example.com"}, Exclude: []string{"registry.example.com/team/debug"}}, []string{"registry.example.com/team/app:1"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for ref := range collect(t, selection(t, tc.sel), items) {
				got = append(got, ref)
			}
			if !equalSets(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

// TestWorkloadErrors: problems of workloads are error results on the workload, with the field
// path and, when the orchestrator says, the file; the other workloads, containers and volumes
// are still read. A null image is no image, as the API server reads it.
func TestWorkloadErrors(t *testing.T) {
	t.Parallel()
	items := parseItems(t,
		"apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: shop\n  annotations: {config.kubernetes.io/path: app/web.yaml, config.kubernetes.io/index: '2'}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: nginx}, {name: b, image: 'UPPER:1'}]\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec:\n  containers: {name: a}\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: q, namespace: shop}\nspec:\n  containers: [{name: a, image: [x]}, oops]\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: r, namespace: shop, annotations: {image-prefetcher.stackrox.io/prefetch: 'False'}}\nspec:\n  containers: [{name: a, image: busybox}]\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: ok, namespace: shop}\nspec:\n  containers: [{name: a, image: alpine:3.20}]\n",
		"apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: llm\n  namespace: shop\n  annotations: {config.kubernetes.io/path: app/llm.yaml}\nspec:\n  template:\n    spec:\n"+
			"      containers: [{name: a, image: null}]\n"+
			"      volumes:\n"+
			"      - {name: empty, image: {reference: ''}}\n"+
			"      - {name: absent, image: {pullPolicy: Always}}\n"+
			"      - {name: upper, image: {reference: 'Models/X:1'}}\n"+
			"      - {name: list, image: {reference: [x]}}\n"+
			"      - {name: scalar, image: registry.example.com/models/x:1}\n"+
			"      - oops\n"+
			"      - {name: good, image: {reference: registry.example.com/models/good:1}}\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: v, namespace: shop}\nspec:\n  volumes: {name: m}\n",
	)
	imgs, results := selection(t, FromWorkloads{}).workloadImages(items)
	var got []string
	for _, r := range results {
		line := fmt.Sprintf("%s %s/%s %s", r.Severity, r.ResourceRef.Kind, r.ResourceRef.Name, r.Field.Path)
		if r.File != nil {
			line += fmt.Sprintf(" %s#%d", r.File.Path, r.File.Index)
		}
		got = append(got, line)
	}
	want := []string{
		"error Deployment/web spec.template.spec.containers[1].image app/web.yaml#2",
		"error Pod/p spec.containers",
		"error Pod/q spec.containers[0].image",
		"error Pod/q spec.containers[1]",
		"error Pod/r metadata.annotations.image-prefetcher.stackrox.io/prefetch",
		// The shape of the pod spec is checked first, then each image.
		"error StatefulSet/llm spec.template.spec.volumes[3].image.reference app/llm.yaml#0",
		"error StatefulSet/llm spec.template.spec.volumes[4].image app/llm.yaml#0",
		"error StatefulSet/llm spec.template.spec.volumes[5] app/llm.yaml#0",
		"error StatefulSet/llm spec.template.spec.containers[0].image app/llm.yaml#0",
		"error StatefulSet/llm spec.template.spec.volumes[0].image.reference app/llm.yaml#0",
		"error StatefulSet/llm spec.template.spec.volumes[1].image.reference app/llm.yaml#0",
		"error StatefulSet/llm spec.template.spec.volumes[2].image.reference app/llm.yaml#0",
		"error Pod/v spec.volumes",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("results:\n got %q\nwant %q", got, want)
	}
	var refs []string
	for _, w := range imgs {
		refs = append(refs, w.ref)
	}
	if want := []string{"docker.io/library/alpine:3.20", "docker.io/library/nginx:latest", "registry.example.com/models/good:1"}; !reflect.DeepEqual(refs, want) {
		t.Errorf("images of the good containers and volumes %v, want %v", refs, want)
	}
}

// TestUnselectedNotChecked: a workload outside the selection is not read at all, so its
// problems are not the instance's.
func TestUnselectedNotChecked(t *testing.T) {
	t.Parallel()
	items := parseItems(t,
		"apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: other, annotations: {image-prefetcher.stackrox.io/prefetch: 'no'}}\nspec:\n  containers: [{name: a, image: 'UPPER:1'}]\n")
	imgs, results := selection(t, FromWorkloads{Namespaces: []string{"shop"}}).workloadImages(items)
	if len(imgs) > 0 || len(results) > 0 {
		t.Errorf("images %v, results %v from a workload outside the selection", imgs, results)
	}
}
