package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/fn"
	"github.com/nodeprefetch/image-prefetcher/internal/manifesttest"
	"github.com/nodeprefetch/image-prefetcher/internal/recipe"
)

// recipeShims stand in for what a recipe needs beyond this test's copy of the repository, as
// scripts on PATH ahead of the real tools:
//   - make: the recipes' `make fn-build` and `make fn-tools`; the function built from this
//     checkout is in bin/ already and kustomize on PATH, so both are no-ops (any other target
//     fails the recipe);
//   - kubectl apply: there is no cluster in `make check`; what would be applied is written to
//     applied.yaml for the check (the real-cluster tests apply the same builds). Every other
//     kubectl command (kustomize) runs the real kubectl.
var recipeShims = map[string]string{
	"make": `#!/bin/sh
for target in "$@"; do
  case $target in fn-build|fn-tools) ;; *) echo "make shim: no target $target" >&2; exit 2 ;; esac
done
`,
	"kubectl": `#!/bin/sh
if [ "$1" = apply ]; then
  shift
  [ "$1" = -f ] || { echo "kubectl shim: apply $*" >&2; exit 2; }
  if [ "$2" = - ]; then cat; else cat "$2"; fi >> "$RECIPE_ROOT/applied.yaml"
  exit 0
fi
exec "$REAL_KUBECTL" "$@"
`,
}

// TestReadmeRecipes runs every recipe of fn/README.md from the doc's own text, in a copy of
// the repository's examples with the function built from this checkout in bin/, and checks
// what each one promises.
func TestReadmeRecipes(t *testing.T) {
	t.Parallel()
	kustomize := kustomizeCLI(t)
	kpt := tool(t, "kpt", os.Getenv("KPT"), "kpt")
	kubectl := tool(t, "kubectl", "kubectl")
	recipes, err := recipe.ParseFile(filepath.Join(repo, "fn", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	instance := func(t *testing.T, yaml []byte, name string) {
		t.Helper()
		objs := manifesttest.YAMLByID(t, yaml)
		found := false
		for id := range objs {
			found = found || (strings.HasPrefix(id, "DaemonSet/") && strings.HasSuffix(id, "/"+name))
		}
		if !found {
			t.Errorf("no DaemonSet %s in:\n%s", name, yaml)
		}
	}
	read := func(t *testing.T, path string) []byte {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	type check struct {
		// setup prepares the copy the way a user's checkout is before the recipe.
		setup func(t *testing.T, root string)
		check func(t *testing.T, root string, stdout []byte)
	}
	checks := map[string]check{
		"strict": {
			setup: func(t *testing.T, root string) {
				// The recipe's prefetcher.yaml: the standalone example's, beside its list.
				for _, f := range []string{"prefetcher.yaml", "images.txt"} {
					if err := os.WriteFile(filepath.Join(root, f), read(t, filepath.Join(root, "examples", "standalone", f)), 0o644); err != nil {
						t.Fatal(err)
					}
				}
			},
			check: func(t *testing.T, root string, _ []byte) {
				instance(t, read(t, filepath.Join(root, "prefetch.yaml")), "my-images")
			},
		},
		"workloads-kpt": {check: func(t *testing.T, root string, _ []byte) {
			if list := read(t, filepath.Join(root, "examples", "workloads", "shop-images.yaml")); !strings.Contains(string(list), "registry.example.com/shop/api:2.4.0") {
				t.Errorf("shop-images.yaml lacks the shop's list:\n%s", list)
			}
		}},
		"workloads-kustomize": {check: func(t *testing.T, _ string, out []byte) {
			if _, list := listOf(t, string(out)); list != shopList {
				t.Errorf("list:\n%s\nwant:\n%s", list, shopList)
			}
		}},
		"workloads-standalone": {check: func(t *testing.T, _ string, out []byte) {
			if _, list := listOf(t, string(out)); list != shopList {
				t.Errorf("list:\n%s\nwant:\n%s", list, shopList)
			}
		}},
		"hydrate-in-ci": {
			setup: func(t *testing.T, root string) {
				if err := os.MkdirAll(filepath.Join(root, "clusters", "prod", "shop"), 0o755); err != nil {
					t.Fatal(err)
				}
			},
			check: func(t *testing.T, root string, _ []byte) {
				if _, list := listOf(t, string(read(t, filepath.Join(root, "clusters", "prod", "shop", "shop.yaml")))); list != shopList {
					t.Errorf("committed list:\n%s\nwant:\n%s", list, shopList)
				}
				if log, _, err := runCmd(t, root, "git", "log", "-1", "--format=%s", "--", "clusters/prod/shop"); err != nil || strings.TrimSpace(log) != "shop: hydrate (prefetch list)" {
					t.Errorf("the hydrated output is not committed: %q %v", log, err)
				}
			},
		},
		"standalone": {check: func(t *testing.T, root string, _ []byte) {
			instance(t, read(t, filepath.Join(root, "applied.yaml")), "my-images")
		}},
		"kpt": {check: func(t *testing.T, root string, _ []byte) {
			instance(t, read(t, filepath.Join(root, "examples", "kpt-package", "my-images.yaml")), "my-images")
		}},
		"kustomize-exec": {check: func(t *testing.T, root string, _ []byte) {
			applied := read(t, filepath.Join(root, "applied.yaml"))
			instance(t, applied, "my-images")
			if strings.Contains(string(applied), fn.RenderCheckKind) {
				t.Errorf("the render check is in the applied build")
			}
		}},
		"flux": {
			setup: func(t *testing.T, root string) {
				// A user's change to the list, to be hydrated and committed.
				cfg := filepath.Join(root, "examples", "flux", "prefetcher.yaml")
				raw := read(t, cfg)
				changed := strings.Replace(string(raw), "images:\n", "images:\n  - registry.example.com/team/new:1.0\n", 1)
				if changed == string(raw) {
					t.Fatalf("examples/flux/prefetcher.yaml has no images: list to change:\n%s", raw)
				}
				if err := os.WriteFile(cfg, []byte(changed), 0o644); err != nil {
					t.Fatal(err)
				}
			},
			check: func(t *testing.T, root string, _ []byte) {
				out := read(t, filepath.Join(root, "examples", "flux", "clusters", "dev", "image-prefetcher", "prefetch.yaml"))
				if !strings.Contains(string(out), "registry.example.com/team/new:1.0") {
					t.Errorf("the hydrated output lacks the new image")
				}
				if status, _, _ := runCmd(t, root, "git", "status", "--porcelain", "examples/flux"); status != "" {
					t.Errorf("the change is not committed:\n%s", status)
				}
			},
		},
	}

	shims := t.TempDir()
	for name, body := range recipeShims {
		if err := os.WriteFile(filepath.Join(shims, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, p := range map[string]string{"kustomize": kustomize, "kpt": kpt} {
		if err := os.Symlink(p, filepath.Join(shims, name)); err != nil {
			t.Fatal(err)
		}
	}
	var names []string
	for _, r := range recipes {
		names = append(names, r.Name)
		c, ok := checks[r.Name]
		if !ok {
			t.Errorf("fn/README.md has a recipe %q that no test runs: add its check here", r.Name)
			continue
		}
		t.Run(r.Name, func(t *testing.T) {
			root := exampleTree(t, "standalone", "kpt-package", "kustomize-exec", "workloads", "workloads-kustomize", "workloads-standalone", "flux")
			for _, args := range [][]string{{"init", "-q"}, {"add", "."}, {"-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "checkout"}} {
				if _, stderr, err := runCmd(t, root, "git", args...); err != nil {
					t.Fatalf("git %v: %v\n%s", args, err, stderr)
				}
			}
			if c.setup != nil {
				c.setup(t, root)
			}
			cmd := exec.Command("bash", "-euo", "pipefail", "-c", r.Script())
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "PATH="+shims+string(os.PathListSeparator)+os.Getenv("PATH"),
				"RECIPE_ROOT="+root, "REAL_KUBECTL="+kubectl,
				"GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.com", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.com")
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("recipe %s of %s: %v\n%s", r.Name, r.Doc, err, stderr.String())
			}
			c.check(t, root, stdout.Bytes())
		})
	}
	for name := range checks {
		if !slices.Contains(names, name) {
			t.Errorf("fn/README.md has no recipe %q any more", name)
		}
	}
}
