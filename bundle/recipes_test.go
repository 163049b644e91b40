package bundle

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/internal/recipe"
)

// The recipes of docs/bundle.md that the e2e tests run on the real cluster instead (they change
// a cluster rather than build files).
var clusterRecipes = []string{"uninstall"}

// TestDocRecipes runs each build recipe of docs/bundle.md from the doc's own text, in a copy of
// base/, overlays/ and components/ as a user has it, with the kustomize and kubectl CLIs; the
// last command's output (a build) must be a whole, valid instance with what the recipe promises.
func TestDocRecipes(t *testing.T) {
	t.Parallel()
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	recipes, err := recipe.ParseFile(filepath.Join(root, "docs", "bundle.md"))
	if err != nil {
		t.Fatal(err)
	}
	checks := map[string]func(t *testing.T, objs []Object){
		"own-instance": func(t *testing.T, objs []Object) {
			checkInstance(t, "vanilla", objs, "team-a", "team-a-images")
			ds := decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet")
			if got := ds.Spec.Template.Spec.Containers[0].Image; got != "registry.example.com/platform/image-prefetcher:v1.0.0" {
				t.Errorf("agent image %s, want the one the recipe set", got)
			}
			cm := decodeOne[corev1.ConfigMap](t, objs, "ConfigMap")
			if !strings.Contains(cm.Data["images.txt"], "registry.example.com/team-a/worker:1.4.2") {
				t.Errorf("images.txt %q lacks the recipe's list", cm.Data["images.txt"])
			}
		},
		"runtime-k3s": func(t *testing.T, objs []Object) {
			checkInstance(t, "vanilla+runtime-k3s", objs, DefaultNamespace, DefaultInstance)
		},
		"pull-secret": func(t *testing.T, objs []Object) {
			checkInstance(t, "vanilla+pull-secret", objs, DefaultNamespace, DefaultInstance)
			secret := decodeOne[corev1.Secret](t, objs, "Secret")
			if secret.Type != corev1.SecretTypeDockerConfigJson {
				t.Errorf("Secret type %s", secret.Type)
			}
			if conf := string(secret.Data[corev1.DockerConfigJsonKey]); !strings.Contains(conf, "registry.example.com") {
				t.Errorf("the Secret holds %q, not the recipe's credentials (the placeholder was not replaced)", conf)
			}
		},
		"tolerations": func(t *testing.T, objs []Object) {
			checkInstance(t, "vanilla", objs, DefaultNamespace, DefaultInstance)
			ds := decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet")
			var keys []string
			for _, tol := range ds.Spec.Template.Spec.Tolerations {
				keys = append(keys, tol.Key)
			}
			for _, want := range []string{"nvidia.com/gpu", "image-prefetcher.stackrox.io/" + DefaultInstance} {
				if !slices.Contains(keys, want) {
					t.Errorf("tolerations %v lack %s", keys, want)
				}
			}
		},
		"node-identity": func(t *testing.T, objs []Object) {
			var rule, rest []Object
			for _, o := range objs {
				if o.Kind == "NodeReadinessRule" {
					rule = append(rule, o)
				} else {
					rest = append(rest, o)
				}
			}
			checkInstance(t, "vanilla+node-identity", rest, DefaultNamespace, DefaultInstance)
			ds := decodeOne[appsv1.DaemonSet](t, rest, "DaemonSet")
			if args := ds.Spec.Template.Spec.Containers[0].Args; !slices.Contains(args, "--act-as-node") || !slices.Contains(args, "--node-condition") {
				t.Errorf("agent args %v lack --act-as-node or --node-condition", args)
			}
			if len(rule) != 1 {
				t.Fatalf("%d NodeReadinessRules, want the recipe's", len(rule))
			}
			// The rule's condition is the instance's, and its taint one the agent tolerates.
			for _, want := range []string{"type: " + nodelabel.Key(DefaultInstance), "key: readiness.k8s.io/" + DefaultInstance} {
				if !strings.Contains(rule[0].YAML, want) {
					t.Errorf("the NodeReadinessRule lacks %q:\n%s", want, rule[0].YAML)
				}
			}
			if !slices.Contains(nodelabel.StartupTaintKeys(DefaultInstance), "readiness.k8s.io/"+DefaultInstance) {
				t.Error("the agent does not tolerate the rule's taint key")
			}
		},
		"shared-namespace": func(t *testing.T, objs []Object) {
			checkInstance(t, "vanilla", objs, DefaultNamespace, "more-images")
			for _, o := range objs {
				if o.Kind == "Namespace" {
					t.Errorf("the second instance still owns the Namespace %s", o.Name)
				}
			}
		},
	}
	env := recipeEnv(t)
	for _, r := range recipes {
		if slices.Contains(clusterRecipes, r.Name) {
			continue
		}
		check, ok := checks[r.Name]
		if !ok {
			t.Errorf("docs/bundle.md has a recipe %q that no test runs: add its check here or to the e2e recipes", r.Name)
			continue
		}
		delete(checks, r.Name)
		t.Run(r.Name, func(t *testing.T) {
			dir := t.TempDir()
			for _, sub := range sources {
				if err := os.CopyFS(filepath.Join(dir, sub), os.DirFS(filepath.Join(root, sub))); err != nil {
					t.Fatal(err)
				}
			}
			cmd := exec.Command("bash", "-euo", "pipefail", "-c", r.Script())
			cmd.Dir, cmd.Env = dir, env
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("recipe %s of %s: %v\n%s", r.Name, r.Doc, err, stderr.String())
			}
			objs, err := Objects(stdout.Bytes())
			if err != nil {
				t.Fatal(err)
			}
			check(t, objs)
		})
	}
	for name := range checks {
		t.Errorf("docs/bundle.md has no recipe %q any more", name)
	}
}

// recipeEnv is the environment the recipes run in: kustomize ($KUSTOMIZE, which make check
// installs and sets, or on PATH) and kubectl on PATH, and the variables the recipes expect a user
// to have set.
func recipeEnv(t *testing.T) []string {
	t.Helper()
	kustomize := os.Getenv("KUSTOMIZE")
	if kustomize == "" {
		kustomize, _ = exec.LookPath("kustomize")
	}
	if kustomize == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("the docs' recipes need the kustomize CLI: `make check` installs it and sets KUSTOMIZE")
		}
		t.Skip("no kustomize CLI (set KUSTOMIZE, or run make check, which installs it)")
	}
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Fatalf("the docs' recipes need kubectl: %v", err)
	}
	bin := t.TempDir()
	if err := os.Symlink(kustomize, filepath.Join(bin, "kustomize")); err != nil {
		t.Fatal(err)
	}
	return append(os.Environ(), "PATH="+bin+string(os.PathListSeparator)+os.Getenv("PATH"), "REGISTRY_TOKEN=s3cr3t")
}
