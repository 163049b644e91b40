package main

// What the function prints on stderr and how it exits, in each mode: standalone, a ResourceList
// on stdin (kustomize's exec transformer, and kpt), with and without --strict; and the second
// configuration that a run would drop.

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/internal/manifesttest"
)

// emptyConfig has no image: a warning, not an error.
const emptyConfig = `apiVersion: fn.image-prefetcher.stackrox.io/v1alpha1
kind: ImagePrefetcher
metadata:
  name: quiet
spec:
  namespace: prefetch-quiet
`

const emptyWarning = "spec.images: the image list is empty: the agents will label every node succeeded without pulling anything"

// runStdin runs the binary with stdin and returns its stdout, stderr and error.
func runStdin(t *testing.T, stdin string, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Dir = t.TempDir()
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	return o.String(), e.String(), err
}

// resourceList wraps config (and no items) as kustomize and kpt hand it to the function.
func resourceList(t *testing.T, config string) string {
	t.Helper()
	rl := yaml.MustParse("apiVersion: config.kubernetes.io/v1\nkind: ResourceList\nitems: []\n")
	if err := rl.PipeE(yaml.SetField("functionConfig", yaml.MustParse(config))); err != nil {
		t.Fatal(err)
	}
	return rl.MustString()
}

// resultSeverities are the severities of the output ResourceList's results, in order.
func resultSeverities(t *testing.T, out string) []string {
	t.Helper()
	rl, err := yaml.Parse(out)
	if err != nil {
		t.Fatalf("output is no ResourceList: %v\n%s", err, out)
	}
	results, err := rl.Pipe(yaml.Lookup("results"))
	if err != nil || results == nil {
		return nil
	}
	var got []string
	for _, r := range results.Content() {
		got = append(got, yaml.GetValue(yaml.NewRNode(r).Field("severity").Value))
	}
	return got
}

func TestWarningsStandalone(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "quiet.yaml")
	if err := os.WriteFile(cfg, []byte(emptyConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	warning := "warning: " + cfg + ": ImagePrefetcher/quiet " + emptyWarning + "\n"

	out, stderr, err := runCmd(t, dir, binary, cfg)
	if err != nil {
		t.Fatalf("a warning failed the run: %v\n%s", err, stderr)
	}
	if stderr != warning {
		t.Errorf("stderr:\n%s\nwant:\n%s", stderr, warning)
	}
	if _, ok := manifesttest.YAMLByID(t, []byte(out))["DaemonSet/prefetch-quiet/quiet"]; !ok {
		t.Errorf("no instance on stdout:\n%s", out)
	}

	// --strict before or after the configuration: the warning fails the run, and nothing is
	// rendered.
	for _, args := range [][]string{{"--strict", cfg}, {cfg, "--strict"}} {
		out, stderr, err := runCmd(t, dir, binary, args...)
		assertExit1(t, strings.Join(args, " "), err)
		if want := warning + "error: " + cfg + ": ImagePrefetcher/quiet: --strict: the warning fails the run\n"; stderr != want {
			t.Errorf("%v: stderr:\n%s\nwant:\n%s", args, stderr, want)
		}
		if strings.Contains(out, "DaemonSet") {
			t.Errorf("%v: a failed run rendered the instance:\n%s", args, out)
		}
	}

	// --strict without warnings, before a configuration whose list file is relative to it,
	// run from elsewhere: the file is found, the run passes.
	std := filepath.Join(repo, "examples", "standalone", "prefetcher.yaml")
	if _, stderr, err := runCmd(t, t.TempDir(), binary, "--strict", std); err != nil || stderr != "" {
		t.Errorf("--strict %s: %v\n%s", std, err, stderr)
	}
}

// TestWarningsResourceList: a ResourceList on stdin, as kustomize's exec transformer (and kpt)
// run the function: the warning is a result and a line on stderr, and --strict fails the run.
func TestWarningsResourceList(t *testing.T) {
	t.Parallel()
	in := resourceList(t, emptyConfig)
	warning := "warning: ImagePrefetcher/quiet " + emptyWarning + "\n"

	out, stderr, err := runStdin(t, in)
	if err != nil {
		t.Fatalf("a warning failed the run: %v\n%s", err, stderr)
	}
	if stderr != warning {
		t.Errorf("stderr:\n%s\nwant:\n%s", stderr, warning)
	}
	if got := resultSeverities(t, out); len(got) != 1 || got[0] != "warning" {
		t.Errorf("results %v, want one warning", got)
	}

	out, stderr, err = runStdin(t, in, "--strict")
	assertExit1(t, "--strict", err)
	if want := warning + "error: ImagePrefetcher/quiet: --strict: the warning fails the run\n"; stderr != want {
		t.Errorf("--strict: stderr:\n%s\nwant:\n%s", stderr, want)
	}
	if got := resultSeverities(t, out); len(got) != 2 || got[0] != "warning" || got[1] != "error" {
		t.Errorf("--strict: results %v, want the warning and an error", got)
	}
}

// TestWarningsKustomizeExec: kustomize passes the function's stderr through, and the exec
// transformer's args pass --strict.
func TestWarningsKustomizeExec(t *testing.T) {
	t.Parallel()
	kustomize := kustomizeCLI(t)
	dir := copyExample(t, "kustomize-exec")
	if err := os.WriteFile(filepath.Join(dir, "images.txt"), []byte("# none yet\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	warning := "warning: ImagePrefetcher/my-images spec.imagesFile: the image list is empty"
	_, stderr, err := runCmd(t, t.TempDir(), kustomize, "build", "--enable-alpha-plugins", "--enable-exec", dir)
	if err != nil {
		t.Fatalf("kustomize build: %v\n%s", err, stderr)
	}
	if !strings.Contains(stderr, warning) {
		t.Errorf("kustomize's stderr lacks %q:\n%s", warning, stderr)
	}

	replaceIn(t, filepath.Join(dir, "prefetcher.yaml"), "path: ../../bin/image-prefetcher-fn\n", "path: ../../bin/image-prefetcher-fn\n        args: [--strict]\n")
	_, stderr, err = runCmd(t, t.TempDir(), kustomize, "build", "--enable-alpha-plugins", "--enable-exec", dir)
	if err == nil {
		t.Fatalf("kustomize build with --strict and a warning succeeded")
	}
	if !strings.Contains(stderr, warning) || !strings.Contains(stderr, "error: ImagePrefetcher/my-images: --strict: the warning fails the run") {
		t.Errorf("kustomize's stderr lacks the warning and the --strict error:\n%s", stderr)
	}
}

// TestSecondConfigStandalone: a configuration file with two documents fails, naming both, and
// renders nothing.
func TestSecondConfigStandalone(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "two.yaml")
	second := strings.Replace(emptyConfig, "name: quiet", "name: loud", 1) + "  images: [busybox:1.36.1]\n"
	if err := os.WriteFile(cfg, []byte(emptyConfig+"  images: [busybox:1.36.1]\n---\n"+second), 0o644); err != nil {
		t.Fatal(err)
	}
	out, stderr, err := runCmd(t, dir, binary, cfg)
	assertExit1(t, "two configurations", err)
	want := "error: " + cfg + ": ImagePrefetcher/loud metadata.name: a second configuration in the file (document 2) would be dropped: a run renders one, ImagePrefetcher/quiet (document 1)"
	if !strings.HasPrefix(stderr, want) || strings.Count(stderr, "\n") != 1 {
		t.Errorf("stderr:\n%s\nwant one line beginning:\n%s", stderr, want)
	}
	if out != "" {
		t.Errorf("output:\n%s", out)
	}
}

// TestSecondConfigKpt: two instances in one kpt package, each with its pipeline step, render;
// with the same instance name (in other namespaces) the render fails, naming both files.
func TestSecondConfigKpt(t *testing.T) {
	t.Parallel()
	kpt := tool(t, "kpt", os.Getenv("KPT"), "kpt")
	pkg := copyExample(t, "kpt-package")
	raw, err := os.ReadFile(filepath.Join(pkg, "prefetcher.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	other := strings.NewReplacer("name: my-images", "name: other-images", "namespace: prefetch-images", "namespace: prefetch-other").Replace(string(raw))
	if err := os.WriteFile(filepath.Join(pkg, "other.yaml"), []byte(other), 0o644); err != nil {
		t.Fatal(err)
	}
	kptfile := filepath.Join(pkg, "Kptfile")
	f, err := os.OpenFile(kptfile, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("  - exec: ../../bin/image-prefetcher-fn\n    configPath: other.yaml\n"); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := runCmd(t, pkg, kpt, "fn", "render", "--allow-exec"); err != nil {
		t.Fatalf("kpt fn render of two instances: %v\n%s", err, stderr)
	}
	for _, f := range []string{"my-images.yaml", "other-images.yaml"} {
		if _, err := os.Stat(filepath.Join(pkg, f)); err != nil {
			t.Errorf("kpt wrote no %s: %v", f, err)
		}
	}

	replaceIn(t, filepath.Join(pkg, "other.yaml"), "name: other-images", "name: my-images")
	_, stderr, err := runCmd(t, pkg, kpt, "fn", "render", "--allow-exec")
	if err == nil {
		t.Fatal("kpt fn render of two instances named my-images succeeded")
	}
	want := "error: other.yaml: ImagePrefetcher/my-images metadata.name: ImagePrefetcher/my-images (other.yaml) has the instance name of ImagePrefetcher/my-images (prefetcher.yaml)"
	if !strings.Contains(stderr, want) || !strings.Contains(stderr, "unique across the cluster") {
		t.Errorf("kpt's output lacks %q:\n%s", want, stderr)
	}
}
