package fn_test

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/fn"
)

// The realistic app of testdata/workloads and the instance that takes its images.
const (
	workloadsConfig = "testdata/workloads/config.yaml"
	workloadsInput  = "testdata/workloads/input.yaml"
)

// imagesConfigMap returns the name and images.txt of the instance's list ConfigMap in out.
func imagesConfigMap(t *testing.T, out []byte) (name, list string) {
	t.Helper()
	nodes, err := kio.FromBytes(out)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.GetKind() == "ConfigMap" && n.GetLabels()["app.kubernetes.io/managed-by"] == fn.ManagedBy {
			if name != "" {
				t.Fatalf("two list ConfigMaps: %s and %s", name, n.GetName())
			}
			name, list = n.GetName(), n.GetDataMap()["images.txt"]
		}
	}
	if name == "" {
		t.Fatalf("no list ConfigMap in:\n%s", out)
	}
	return name, list
}

func writeFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestWorkloadsList: the list the agent reads from the realistic app: every selected image
// (of containers and image volumes) once after normalization, sorted, digests whole, after the
// explicit image; the comments
// naming the workloads do not change the agent's list digest.
func TestWorkloadsList(t *testing.T) {
	t.Parallel()
	out, err := fn.RenderFile(workloadsConfig, workloadsInput)
	if err != nil {
		t.Fatal(err)
	}
	_, list := imagesConfigMap(t, out)
	l := imagelist.Parse(strings.NewReader(list), "images.txt")
	if len(l.Errors) > 0 || len(l.Duplicates) > 0 {
		t.Errorf("the agent finds errors %v and duplicates %v in:\n%s", l.Errors, l.Duplicates, list)
	}
	want := []string{
		// spec.images first, then the workloads' images in order.
		"registry.example.com/shop/api:2.5.0-rc.1",
		"docker.io/envoyproxy/envoy:v1.31.2@sha256:0a6bd5c06c2a7e3ea8a6b3f1e0d4e2c1b9a8f7e6d5c4b3a29180706f5e4d3c2b",
		"docker.io/library/busybox:1.36.1",
		"docker.io/library/nginx:1.27",
		"docker.io/library/redis:7.4.1",
		"registry.example.com/shop/api:2.4.0",
		"registry.example.com/shop/migrate@sha256:4b6f3bd0d1ec3cf0b5e8d3b5c7a9b6a1d2e3f405162738495a6b7c8d9e0f1a2b",
		"registry.example.com/shop/ranking-model:v3",
		"registry.example.com/shop/report:1.8.3",
		"registry.example.com/shop/worker:2.4.0",
	}
	if got := l.Refs(); !reflect.DeepEqual(got, want) {
		t.Errorf("list:\n got %q\nwant %q", got, want)
	}
	if !strings.Contains(list, "docker.io/library/nginx:1.27  # Deployment/shop/static-assets, Deployment/shop/storefront\n") {
		t.Errorf("no comment naming both workloads of nginx's two spellings in:\n%s", list)
	}
	if !strings.Contains(list, "registry.example.com/shop/ranking-model:v3  # volume model of Deployment/shop/api\n") {
		t.Errorf("no comment naming the image volume and its workload in:\n%s", list)
	}
	bare := imagelist.Parse(strings.NewReader(strings.Join(want, "\n")), "bare")
	if l.Digest != bare.Digest {
		t.Errorf("the comments change the list digest: %s, without them %s", l.Digest, bare.Digest)
	}
}

// TestWorkloadsRenderTwice: the output fed back with the same configuration comes out
// unchanged, though it now holds the instance's own DaemonSet (whose agent image must not join
// the list).
func TestWorkloadsRenderTwice(t *testing.T) {
	t.Parallel()
	out, err := fn.RenderFile(workloadsConfig, workloadsInput)
	if err != nil {
		t.Fatal(err)
	}
	again, err := fn.RenderFile(workloadsConfig, writeFile(t, "out.yaml", out))
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != string(out) {
		t.Errorf("second render differs:\n%s", again)
	}
}

// TestWorkloadsTagBump: a new tag in one Deployment changes exactly its list line and with it
// the ConfigMap's name; the rest of the output is the same but the Deployment itself and the
// DaemonSet's reference to the ConfigMap.
func TestWorkloadsTagBump(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(workloadsInput)
	if err != nil {
		t.Fatal(err)
	}
	const before, after = "registry.example.com/shop/worker:2.4.0", "registry.example.com/shop/worker:2.4.1"
	if strings.Count(string(raw), before) != 1 {
		t.Fatalf("%s: want exactly one %s", workloadsInput, before)
	}
	old, err := fn.RenderFile(workloadsConfig, workloadsInput)
	if err != nil {
		t.Fatal(err)
	}
	bumped, err := fn.RenderFile(workloadsConfig, writeFile(t, "input.yaml", []byte(strings.Replace(string(raw), before, after, 1))))
	if err != nil {
		t.Fatal(err)
	}
	oldName, oldList := imagesConfigMap(t, old)
	newName, newList := imagesConfigMap(t, bumped)
	if oldName == newName {
		t.Errorf("the ConfigMap keeps its name %s after a list change", oldName)
	}
	line := "  # Deployment/shop/worker\n"
	if strings.Count(oldList, before+line) != 1 || newList != strings.Replace(oldList, before+line, after+line, 1) {
		t.Errorf("the list changed other than in the line of %s:\n%s\nnow:\n%s", before, oldList, newList)
	}
	// The whole output: the same but for the Deployment's image, the list line, and the
	// ConfigMap's name (in the ConfigMap and in the DaemonSet's volume).
	if want := strings.NewReplacer(before, after, oldName, newName).Replace(string(old)); string(bumped) != want {
		t.Errorf("after the tag bump the output is:\n%s\nwant:\n%s", bumped, want)
	}
}

// TestWorkloadsMergeExplicit: an image that spec.images (or the list file) already lists is
// not listed again from the workloads, whatever its spelling.
func TestWorkloadsMergeExplicit(t *testing.T) {
	t.Parallel()
	c, results := fn.Decode(yaml.MustParse(`apiVersion: fn.image-prefetcher.stackrox.io/v1alpha1
kind: ImagePrefetcher
metadata: {name: merge}
spec:
  images: [nginx:1.27]
  fromWorkloads: {}
`), "")
	if results.ExitCode() != 0 {
		t.Fatal(results)
	}
	items, err := kio.FromBytes([]byte(`apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  containers:
  - {name: a, image: docker.io/library/nginx:1.27}
  - {name: b, image: alpine:3.20}
`))
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.Filter(items)
	if err != nil {
		t.Fatal(err)
	}
	var list string
	for _, o := range out {
		if o.GetKind() == "ConfigMap" {
			list = o.GetDataMap()["images.txt"]
		}
	}
	want := "nginx:1.27\n" +
		"# The images of the workloads (spec.fromWorkloads), each with the workloads that use it:\n" +
		"docker.io/library/alpine:3.20  # Pod/shop/web\n"
	if list != want {
		t.Errorf("images.txt:\n%s\nwant:\n%s", list, want)
	}
}

// process runs the function's Processor over a ResourceList of config and items.
func process(t *testing.T, config, items string) (*framework.ResourceList, error) {
	t.Helper()
	nodes, err := kio.FromBytes([]byte(items))
	if err != nil {
		t.Fatal(err)
	}
	rl := &framework.ResourceList{FunctionConfig: yaml.MustParse(config), Items: nodes}
	return rl, fn.Processor{}.Process(rl)
}

// TestWorkloadsNoneSelected: a selection that finds nothing and no other image is a warning,
// not an error; the instance is still generated.
func TestWorkloadsNoneSelected(t *testing.T) {
	t.Parallel()
	rl, err := process(t, `apiVersion: fn.image-prefetcher.stackrox.io/v1alpha1
kind: ImagePrefetcher
metadata: {name: empty}
spec:
  fromWorkloads: {namespaces: [nowhere]}
`, "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec:\n  containers: [{name: a, image: nginx}]\n")
	if err != nil {
		t.Fatalf("a selection of nothing failed the render: %v", err)
	}
	if len(rl.Results) != 1 || rl.Results[0].Severity != framework.Warning || rl.Results[0].Field.Path != "spec.fromWorkloads" {
		t.Errorf("results %v, want one warning on spec.fromWorkloads", rl.Results)
	}
	if len(rl.Items) < 2 {
		t.Errorf("no instance generated: %d items", len(rl.Items))
	}
}
