package main

// The three ways to prefetch an application's images from its manifests (spec.fromWorkloads),
// each run on its example exactly as fn/README.md shows it: kpt with the application as a
// subpackage (examples/workloads), a kustomize exec transformer in the application's
// kustomization (examples/workloads-kustomize), and the standalone command over manifests
// another tool rendered (examples/workloads-standalone).

import (
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/kio"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/fn"
	"github.com/nodeprefetch/image-prefetcher/internal/manifesttest"
)

// The commands of fn/README.md, run from the repository root (or a copy of its layout).
const (
	kptWorkloadsCmd        = "cd examples/workloads && kpt fn render --allow-exec"
	kustomizeWorkloadsCmd  = "kustomize build --enable-alpha-plugins --enable-exec examples/workloads-kustomize"
	standaloneWorkloadsCmd = "kubectl kustomize examples/workloads/shop | bin/image-prefetcher-fn examples/workloads-standalone/prefetcher.yaml -"
)

// shopList is the list every path writes for the shop, as fn/README.md shows it: the Job
// opted out, the toolbox excluded, nginx's two spellings one line, the digest whole.
const shopList = `# The images of the workloads (spec.fromWorkloads), each with the workloads that use it:
docker.io/library/busybox:1.36.1  # Deployment/shop/storefront
docker.io/library/nginx:1.27  # Deployment/shop/api, Deployment/shop/storefront
registry.example.com/shop/api:2.4.0  # Deployment/shop/api
registry.example.com/shop/report@sha256:4b6f3bd0d1ec3cf0b5e8d3b5c7a9b6a1d2e3f405162738495a6b7c8d9e0f1a2b  # CronJob/shop/nightly-report
`

// TestWorkloadsReadme: fn/README.md shows the commands these tests run and the list they
// check.
func TestWorkloadsReadme(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(filepath.Join(repo, "fn", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{kptWorkloadsCmd, kustomizeWorkloadsCmd, standaloneWorkloadsCmd, "```text\n" + shopList + "```"} {
		if !strings.Contains(string(raw), s) {
			t.Errorf("fn/README.md lacks %q", s)
		}
	}
}

// shell runs command with sh in dir, with the binaries tools (name -> path) on PATH under
// their names.
func shell(t *testing.T, dir, command string, tools map[string]string) (stdout, stderr string, err error) {
	t.Helper()
	bin := t.TempDir()
	for name, p := range tools {
		if err := os.Symlink(p, filepath.Join(bin, name)); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("sh", "-c", command)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PATH="+bin+string(filepath.ListSeparator)+os.Getenv("PATH"))
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// listOf returns the name and content of the shop instance's list ConfigMap in out.
func listOf(t *testing.T, out string) (name, list string) {
	t.Helper()
	nodes, err := kio.FromBytes([]byte(out))
	if err != nil {
		t.Fatalf("%v in:\n%s", err, out)
	}
	for _, n := range nodes {
		if n.GetKind() == "ConfigMap" && n.GetLabels()["app.kubernetes.io/instance"] == "shop-images" {
			if name != "" {
				t.Fatalf("two list ConfigMaps: %s and %s", name, n.GetName())
			}
			name, list = n.GetName(), n.GetDataMap()["images.txt"]
		}
	}
	if name == "" {
		t.Fatalf("no list ConfigMap of shop-images in:\n%s", out)
	}
	return name, list
}

// shopRender is the standalone render of the shop, in-process: what every path must produce.
func shopRender(t *testing.T) string {
	t.Helper()
	app, err := bundle.Kustomize(filepath.Join(repo, "examples", "workloads", "shop"))
	if err != nil {
		t.Fatal(err)
	}
	in := filepath.Join(t.TempDir(), "shop.yaml")
	if err := os.WriteFile(in, app, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := fn.RenderFile(filepath.Join(repo, "examples", "workloads-standalone", "prefetcher.yaml"), in)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

func TestWorkloadsStandalone(t *testing.T) {
	t.Parallel()
	kubectl := tool(t, "kubectl", os.Getenv("KUBECTL"), "kubectl")
	root := exampleTree(t, "workloads", "workloads-standalone")
	out, stderr, err := shell(t, root, standaloneWorkloadsCmd, map[string]string{"kubectl": kubectl})
	if err != nil {
		t.Fatalf("%s: %v\n%s", standaloneWorkloadsCmd, err, stderr)
	}
	if _, list := listOf(t, out); list != shopList {
		t.Errorf("list:\n%s\nwant:\n%s", list, shopList)
	}
	if got, want := manifesttest.YAMLByID(t, []byte(out)), manifesttest.YAMLByID(t, []byte(shopRender(t))); !reflect.DeepEqual(got, want) {
		t.Errorf("the piped render differs from the render of the same files:\n%s", out)
	}

	// Its output through the function again: no change.
	prev := filepath.Join(root, "prev.yaml")
	if err := os.WriteFile(prev, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	again, stderr, err := shell(t, root, "bin/image-prefetcher-fn examples/workloads-standalone/prefetcher.yaml - < prev.yaml", nil)
	if err != nil {
		t.Fatalf("second render: %v\n%s", err, stderr)
	}
	if again != out {
		t.Errorf("second render differs:\n%s", again)
	}

	// A bad pattern: exit 1 and the field path.
	cfg := filepath.Join(root, "examples", "workloads-standalone", "prefetcher.yaml")
	replaceIn(t, cfg, "- nicolaka/netshoot", "- nicolaka/[netshoot")
	_, stderr, err = shell(t, root, standaloneWorkloadsCmd, map[string]string{"kubectl": kubectl})
	assertExit1(t, "standalone with a bad pattern", err)
	if !strings.Contains(stderr, "spec.fromWorkloads.exclude[0]") {
		t.Errorf("stderr lacks the field path:\n%s", stderr)
	}
}

func TestWorkloadsKustomizeExec(t *testing.T) {
	t.Parallel()
	kustomize := kustomizeCLI(t)
	root := exampleTree(t, "workloads", "workloads-kustomize")
	out, stderr, err := shell(t, root, kustomizeWorkloadsCmd, map[string]string{"kustomize": kustomize})
	if err != nil {
		t.Fatalf("%s: %v\n%s", kustomizeWorkloadsCmd, err, stderr)
	}
	if strings.Contains(out, "config.kubernetes.io/") || strings.Contains(out, fn.Kind) {
		t.Errorf("function configuration or orchestrator annotations leaked:\n%s", out)
	}
	if _, list := listOf(t, out); list != shopList {
		t.Errorf("list:\n%s\nwant:\n%s", list, shopList)
	}
	if got, want := manifesttest.YAMLByID(t, []byte(out)), manifesttest.YAMLByID(t, []byte(shopRender(t))); !reflect.DeepEqual(got, want) {
		t.Errorf("kustomize exec output differs from the standalone render:\n%s", out)
	}

	// kustomize's own transformers run first: the list has the image an images: override
	// sets.
	kustomization := filepath.Join(root, "examples", "workloads-kustomize", "kustomization.yaml")
	raw, err := os.ReadFile(kustomization)
	if err != nil {
		t.Fatal(err)
	}
	override := "images:\n- name: registry.example.com/shop/api\n  newTag: 2.4.1\n"
	if err := os.WriteFile(kustomization, append(raw, override...), 0o644); err != nil {
		t.Fatal(err)
	}
	out, stderr, err = shell(t, root, kustomizeWorkloadsCmd, map[string]string{"kustomize": kustomize})
	if err != nil {
		t.Fatalf("%s with an images override: %v\n%s", kustomizeWorkloadsCmd, err, stderr)
	}
	line := "  # Deployment/shop/api\n"
	if _, list := listOf(t, out); list != strings.Replace(shopList, "registry.example.com/shop/api:2.4.0"+line, "registry.example.com/shop/api:2.4.1"+line, 1) {
		t.Errorf("with the images override, the list is:\n%s", list)
	}
	if err := os.WriteFile(kustomization, raw, 0o644); err != nil {
		t.Fatal(err)
	}

	// A workload's bad image fails the build, naming the workload and the field.
	replaceIn(t, filepath.Join(root, "examples", "workloads", "shop", "api.yaml"), "registry.example.com/shop/api:", "registry.example.com/Shop/api:")
	_, stderr, err = shell(t, root, kustomizeWorkloadsCmd, map[string]string{"kustomize": kustomize})
	if err == nil {
		t.Fatalf("kustomize build with a bad workload image succeeded")
	}
	for _, s := range []string{"Deployment/shop/api", "spec.template.spec.containers[0].image"} {
		if !strings.Contains(stderr, s) {
			t.Errorf("kustomize error lacks %q:\n%s", s, stderr)
		}
	}
}

// TestWorkloadsKpt renders examples/workloads (the shop as a subpackage) twice: no diff. Then a
// tag bump in one Deployment changes exactly its list line and the ConfigMap's name; a bad
// selector fails the render with the field path.
func TestWorkloadsKpt(t *testing.T) {
	t.Parallel()
	kpt := tool(t, "kpt", os.Getenv("KPT"), "kpt")
	tools := map[string]string{"kpt": kpt}
	root := exampleTree(t, "workloads")
	pkg := filepath.Join(root, "examples", "workloads")
	render := func() map[string]string {
		t.Helper()
		if _, stderr, err := shell(t, root, kptWorkloadsCmd, tools); err != nil {
			t.Fatalf("%s: %v\n%s", kptWorkloadsCmd, err, stderr)
		}
		return readTree(t, pkg)
	}
	first := render()
	out, ok := first["shop-images.yaml"]
	if !ok {
		t.Fatalf("kpt wrote no shop-images.yaml; files: %v", slices.Sorted(maps.Keys(first)))
	}
	if strings.Contains(out, "config.kubernetes.io/") {
		t.Errorf("orchestrator annotations left in the rendered file:\n%s", out)
	}
	oldName, list := listOf(t, out)
	if list != shopList {
		t.Errorf("list:\n%s\nwant:\n%s", list, shopList)
	}
	if wantName, _ := listOf(t, shopRender(t)); oldName != wantName {
		t.Errorf("kpt's ConfigMap %s, the standalone render's %s", oldName, wantName)
	}
	source := readTree(t, filepath.Join(repo, "examples", "workloads"))
	for name, data := range source {
		if first[name] != data {
			t.Errorf("the render changed %s:\n%s", name, first[name])
		}
	}
	second := render()
	if !reflect.DeepEqual(first, second) {
		for name := range second {
			if first[name] != second[name] {
				t.Errorf("second render changed %s:\n%s", name, second[name])
			}
		}
	}

	const before, after = "registry.example.com/shop/api:2.4.0", "registry.example.com/shop/api:2.4.1"
	replaceIn(t, filepath.Join(pkg, "shop", "api.yaml"), before, after)
	third := render()
	newName, _ := listOf(t, third["shop-images.yaml"])
	if newName == oldName {
		t.Errorf("the ConfigMap keeps its name %s after a tag bump", oldName)
	}
	line := "  # Deployment/shop/api\n"
	if want := strings.NewReplacer(before+line, after+line, oldName, newName).Replace(out); third["shop-images.yaml"] != want {
		t.Errorf("after the tag bump kpt wrote:\n%s\nwant (only the list line and the ConfigMap's name changed):\n%s", third["shop-images.yaml"], want)
	}
	for name, data := range second {
		if name != "shop-images.yaml" && name != filepath.Join("shop", "api.yaml") && third[name] != data {
			t.Errorf("the tag bump changed %s", name)
		}
	}

	replaceIn(t, filepath.Join(pkg, "prefetcher.yaml"), "namespaces: [shop]", `selector: "tier in (web"`)
	_, stderr, err := shell(t, root, kptWorkloadsCmd, tools)
	if err == nil {
		t.Fatalf("kpt fn render with a bad selector succeeded")
	}
	if !strings.Contains(stderr, "spec.fromWorkloads.selector") {
		t.Errorf("kpt's error lacks the field path:\n%s", stderr)
	}
	if got := readTree(t, pkg)["shop-images.yaml"]; got != third["shop-images.yaml"] {
		t.Errorf("a failed render changed shop-images.yaml")
	}
}

// readTree returns every file under dir by its path relative to dir.
func readTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		raw, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		files[rel] = string(raw)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// replaceIn replaces the one occurrence of old in the file p.
func replaceIn(t *testing.T, p, old, new string) {
	t.Helper()
	raw, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(raw), old) != 1 {
		t.Fatalf("%s: want exactly one %q", p, old)
	}
	if err := os.WriteFile(p, []byte(strings.Replace(string(raw), old, new, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
}
