package main

// These tests run the real binary through every entry point: standalone, a ResourceList on
// stdin, `kpt fn render --allow-exec` and `kustomize build --enable-alpha-plugins
// --enable-exec`, on the examples under examples/ exactly as fn/README.md shows them.

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/fn"
	"github.com/nodeprefetch/image-prefetcher/internal/manifesttest"
)

// binary is the function built once for the package's tests; repo is the repository root.
var binary, repo string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	root, err := bundle.Root()
	if err != nil {
		panic(err)
	}
	repo = root
	tmp, err := os.MkdirTemp("", "image-prefetcher-fn-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(tmp)
	binary = filepath.Join(tmp, "bin", "image-prefetcher-fn")
	build := exec.Command("go", "build", "-o", binary, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		panic("build image-prefetcher-fn: " + err.Error())
	}
	return m.Run()
}

// tool finds an external CLI. Where the real tools are required (IMAGE_PREFETCHER_E2E=1 or
// CI=true) a missing one fails the test; elsewhere the test is skipped and says why.
func tool(t *testing.T, name string, candidates ...string) string {
	t.Helper()
	for _, c := range candidates {
		if c == "" {
			continue
		}
		if p, err := exec.LookPath(c); err == nil {
			return p
		}
	}
	msg := name + " not found (tried " + strings.Join(candidates, ", ") + "); `make fn-tools` installs kustomize"
	if os.Getenv("IMAGE_PREFETCHER_E2E") == "1" || os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg + "; set IMAGE_PREFETCHER_E2E=1 to make this a failure")
	return ""
}

// kustomizeCLI is $KUSTOMIZE (make check and make fn-test install the pinned version and set it)
// or kustomize on PATH.
func kustomizeCLI(t *testing.T) string {
	return tool(t, "kustomize", os.Getenv("KUSTOMIZE"), "kustomize")
}

func runCmd(t *testing.T, dir string, name string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// copyExample copies examples/<name> to <tmp>/examples/<name> and the binary to <tmp>/bin, the
// layout the examples' relative exec paths (../../bin/image-prefetcher-fn) expect.
func copyExample(t *testing.T, name string) string {
	t.Helper()
	return filepath.Join(exampleTree(t, name), "examples", name)
}

// exampleTree lays out examples/<name> for each name and bin/image-prefetcher-fn under a new
// temporary directory, as in the repository after `make fn-build`, and returns it.
func exampleTree(t *testing.T, names ...string) string {
	t.Helper()
	tmp := t.TempDir()
	for _, name := range names {
		dst := filepath.Join(tmp, "examples", name)
		if err := os.CopyFS(dst, os.DirFS(filepath.Join(repo, "examples", name))); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := os.ReadFile(binary)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(tmp, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "bin", "image-prefetcher-fn"), raw, 0o755); err != nil {
		t.Fatal(err)
	}
	return tmp
}

func kinds(objs map[string]any) []string {
	var ks []string
	for id := range objs {
		ks = append(ks, id[:strings.Index(id, "/")])
	}
	return ks
}

func TestStandalone(t *testing.T) {
	t.Parallel()
	cfg := filepath.Join(repo, "examples", "standalone", "prefetcher.yaml")
	out, stderr, err := runCmd(t, t.TempDir(), binary, cfg)
	if err != nil {
		t.Fatalf("%v: %s", err, stderr)
	}
	objs := manifesttest.YAMLByID(t, []byte(out))
	if len(objs) != 10 {
		t.Errorf("standalone vanilla render: %d objects (%v), want 10", len(objs), kinds(objs))
	}
	if _, ok := objs["DaemonSet/prefetch-images/my-images"]; !ok {
		t.Errorf("no DaemonSet prefetch-images/my-images in %v", kinds(objs))
	}
	lib, err := fn.RenderFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if string(lib) != out {
		t.Errorf("fn.RenderFile differs from the binary's output")
	}
	// Rendering the output again through the function changes nothing.
	prev := filepath.Join(t.TempDir(), "prev.yaml")
	if err := os.WriteFile(prev, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	again, stderr, err := runCmd(t, t.TempDir(), binary, cfg, prev)
	if err != nil {
		t.Fatalf("%v: %s", err, stderr)
	}
	if again != out {
		t.Errorf("second standalone render differs:\n%s", again)
	}
}

const badConfig = `apiVersion: fn.image-prefetcher.stackrox.io/v1alpha1
kind: ImagePrefetcher
metadata:
  name: Bad_Name
spec:
  images: [busybox:1.36.1, "UPPER:case"]
`

// TestErrorsExitNonZero: kyaml's framework alone exits 0 when a Filter returns error results;
// the function must fail its caller, in both I/O modes, and still write the results.
func TestErrorsExitNonZero(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(cfg, []byte(badConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, err := runCmd(t, dir, binary, cfg)
	assertExit1(t, "standalone", err)
	// One line per result, naming the file, the configuration and the field.
	lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "error: "+cfg+": ImagePrefetcher/Bad_Name metadata.name: ") ||
		!strings.HasPrefix(lines[1], "error: "+cfg+": ImagePrefetcher/Bad_Name spec.images[1]: ") {
		t.Errorf("standalone stderr, want an error line on metadata.name and one on spec.images[1]:\n%s", stderr)
	}

	cfgNode := yaml.MustParse(badConfig)
	rl := yaml.MustParse("apiVersion: config.kubernetes.io/v1\nkind: ResourceList\nitems: []\n")
	if err := rl.PipeE(yaml.SetField("functionConfig", cfgNode)); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary)
	cmd.Stdin = strings.NewReader(rl.MustString())
	var o bytes.Buffer
	cmd.Stdout = &o
	assertExit1(t, "ResourceList", cmd.Run())
	out, err := yaml.Parse(o.String())
	if err != nil {
		t.Fatalf("output is no ResourceList: %v\n%s", err, o.String())
	}
	results, err := out.Pipe(yaml.Lookup("results"))
	if err != nil || results == nil {
		t.Fatalf("no results in the output ResourceList:\n%s", o.String())
	}
	var got []string
	for _, r := range results.Content() {
		sev := yaml.GetValue(yaml.NewRNode(r).Field("severity").Value)
		path, _ := yaml.NewRNode(r).Pipe(yaml.Lookup("field", "path"))
		got = append(got, sev+" "+yaml.GetValue(path))
	}
	want := []string{"error metadata.name", "error spec.images[1]"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("results %v, want %v", got, want)
	}

	// And a good configuration exits 0.
	good := filepath.Join(repo, "examples", "standalone", "prefetcher.yaml")
	if _, stderr, err := runCmd(t, dir, binary, good); err != nil {
		t.Errorf("good configuration: %v: %s", err, stderr)
	}
}

func assertExit1(t *testing.T, what string, err error) {
	t.Helper()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Errorf("%s: exit %v, want exit status 1", what, err)
	}
}

// TestKptRenderTwice renders examples/kpt-package the way fn/README.md says (from the package
// directory), twice: the second run must change nothing. Then a list change must replace the
// image-list ConfigMap, not add one.
func TestKptRenderTwice(t *testing.T) {
	t.Parallel()
	kpt := tool(t, "kpt", os.Getenv("KPT"), "kpt")
	pkg := copyExample(t, "kpt-package")
	render := func() map[string]string {
		t.Helper()
		if _, stderr, err := runCmd(t, pkg, kpt, "fn", "render", "--allow-exec"); err != nil {
			t.Fatalf("kpt fn render: %v\n%s", err, stderr)
		}
		files := map[string]string{}
		entries, err := os.ReadDir(pkg)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			raw, err := os.ReadFile(filepath.Join(pkg, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			files[e.Name()] = string(raw)
		}
		return files
	}
	first := render()
	out, ok := first["my-images.yaml"]
	if !ok {
		t.Fatalf("kpt wrote no my-images.yaml; files: %v", first)
	}
	objs := manifesttest.YAMLByID(t, []byte(out))
	if _, ok := objs["DaemonSet/prefetch-images/my-images"]; !ok || len(objs) != 10 {
		t.Errorf("kpt render: %v, want the 10 objects of a vanilla instance", kinds(objs))
	}
	if strings.Contains(out, "config.kubernetes.io/") {
		t.Errorf("orchestrator annotations left in the rendered file:\n%s", out)
	}
	second := render()
	if !reflect.DeepEqual(first, second) {
		for name := range second {
			if first[name] != second[name] {
				t.Errorf("second render changed %s:\n%s", name, second[name])
			}
		}
	}

	cfg := filepath.Join(pkg, "prefetcher.yaml")
	raw, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte(strings.Replace(string(raw), "alpine:3.20", "alpine:3.21", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	third := render()
	var cms []string
	for id := range manifesttest.YAMLByID(t, []byte(third["my-images.yaml"])) {
		if strings.HasPrefix(id, "ConfigMap/") {
			cms = append(cms, id)
		}
	}
	if len(cms) != 1 || cms[0] == "" || strings.Contains(first["my-images.yaml"], strings.TrimPrefix(cms[0], "ConfigMap/prefetch-images/")) {
		t.Errorf("after a list change: ConfigMaps %v, want exactly one new one", cms)
	}
}

// TestKustomizeExec builds examples/kustomize-exec with the kustomize CLI running the
// function as an exec transformer, and compares it with the standalone render of the same
// instance.
func TestKustomizeExec(t *testing.T) {
	t.Parallel()
	kustomize := kustomizeCLI(t)
	dir := copyExample(t, "kustomize-exec")
	out, stderr, err := runCmd(t, t.TempDir(), kustomize, "build", "--enable-alpha-plugins", "--enable-exec", dir)
	if err != nil {
		t.Fatalf("kustomize build: %v\n%s", err, stderr)
	}
	if strings.Contains(out, "config.kubernetes.io/") || strings.Contains(out, "ImagePrefetcher") {
		t.Errorf("function configuration, render check or orchestrator annotations leaked:\n%s", out)
	}
	// Without --enable-exec (kustomize skips the function silently, exit 0) the build is the
	// render check alone: a kind no cluster serves, so no apply or sync goes ahead with it.
	skipped, stderr, err := runCmd(t, t.TempDir(), kustomize, "build", "--enable-alpha-plugins", dir)
	if err != nil {
		t.Fatalf("kustomize build without --enable-exec: %v\n%s", err, stderr)
	}
	if objs := manifesttest.YAMLByID(t, []byte(skipped)); len(objs) != 1 || !strings.Contains(skipped, "kind: "+fn.RenderCheckKind) {
		t.Errorf("a build that did not run the function is not the render check alone:\n%s", skipped)
	}
	want, err := fn.RenderFile(filepath.Join(repo, "examples", "standalone", "prefetcher.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if got, w := manifesttest.YAMLByID(t, []byte(out)), manifesttest.YAMLByID(t, want); !reflect.DeepEqual(got, w) {
		t.Errorf("kustomize exec output differs from the standalone render:\n%s", out)
	}

	// A bad configuration fails the build.
	cfg := filepath.Join(dir, "prefetcher.yaml")
	raw, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte(strings.Replace(string(raw), "name: my-images", "name: My_Images", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := runCmd(t, t.TempDir(), kustomize, "build", "--enable-alpha-plugins", "--enable-exec", dir); err == nil {
		t.Errorf("kustomize build of a bad configuration succeeded")
	} else if !strings.Contains(stderr, "metadata.name") {
		t.Errorf("kustomize error lacks the field path:\n%s", stderr)
	}
}

// TestFluxHydrated: the committed hydrated output under examples/flux equals a fresh render
// of its configuration, and is a plain kustomization Flux builds without plugins.
func TestFluxHydrated(t *testing.T) {
	t.Parallel()
	flux := filepath.Join(repo, "examples", "flux")
	want, err := fn.RenderFile(filepath.Join(flux, "prefetcher.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	hydrated := filepath.Join(flux, "clusters", "dev", "image-prefetcher")
	have, err := os.ReadFile(filepath.Join(hydrated, "prefetch.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(have, want) {
		t.Errorf("examples/flux is stale: run `make fn-hydrate` and commit")
	}
	built, err := bundle.Kustomize(hydrated)
	if err != nil {
		t.Fatal(err)
	}
	if got, w := manifesttest.YAMLByID(t, built), manifesttest.YAMLByID(t, want); !reflect.DeepEqual(got, w) {
		t.Errorf("Flux's plugin-less build of %s differs from the render", hydrated)
	}
}
