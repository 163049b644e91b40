// Package bundle builds the Kustomize bundle (base, overlays, components) the way Flux's
// kustomize-controller does: krusty with plugins disabled and the legacy resource order. The
// golden tests here and the end-to-end tests (server-side dry runs) share these builds.
package bundle

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// Flavors are the instance overlays under overlays/.
var Flavors = []string{"vanilla", "ocp"}

// The default instance of every overlay.
const (
	DefaultNamespace = "prefetch-images"
	DefaultInstance  = "my-images"
)

// Build is one rendered kustomization.
type Build struct {
	// Name is the flavor, or flavor+component for a combination ("ocp+pull-secret").
	Name string
	// YAML is the multi-document output, as `kustomize build` prints it.
	YAML []byte
}

// Root returns the repository root: the directory of this package's parent, found from the
// source file so tests and e2e binaries work from any working directory.
func Root() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("locate bundle package source")
	}
	root := filepath.Dir(filepath.Dir(file))
	if _, err := os.Stat(filepath.Join(root, "base", "kustomization.yaml")); err != nil {
		return "", fmt.Errorf("bundle root %s: %w", root, err)
	}
	return root, nil
}

// Kustomize renders the kustomization in dir with Flux's options: builtin plugins only, the
// legacy (kind-based) resource order, and no load restrictions.
func Kustomize(dir string) ([]byte, error) {
	opts := krusty.MakeDefaultOptions()
	opts.Reorder = krusty.ReorderOptionLegacy
	opts.LoadRestrictions = types.LoadRestrictionsNone
	opts.PluginConfig = types.DisabledPluginConfig()
	m, err := krusty.MakeKustomizer(opts).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	out, err := m.AsYaml()
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: yaml: %w", dir, err)
	}
	return out, nil
}

// Components lists the component directories under components/.
func Components(root string) ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(root, "components"))
	if err != nil {
		return nil, fmt.Errorf("list components: %w", err)
	}
	var names []string
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		if _, err := os.Stat(filepath.Join(root, "components", e.Name(), "kustomization.yaml")); err == nil {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	return names, nil
}

// Instance describes an instance overlay derived from one of the shipped ones, as a user
// writes it: a copy of overlays/<Flavor> with its marked values changed.
type Instance struct {
	Flavor     string
	Namespace  string   // empty: the overlay's default
	Name       string   // the instance name; empty: the overlay's default
	Images     string   // images.txt content; empty: the overlay's sample list
	Components []string // names under components/
}

// Write copies base/, components/ and overlays/ of root into dir and edits the copy of
// overlays/<Flavor> for in; it returns the directory of that overlay.
func (in Instance) Write(root, dir string) (string, error) {
	for _, sub := range []string{"base", "components", "overlays"} {
		if err := copyTree(filepath.Join(root, sub), filepath.Join(dir, sub)); err != nil {
			return "", err
		}
	}
	overlay := filepath.Join(dir, "overlays", in.Flavor)
	kfile := filepath.Join(overlay, "kustomization.yaml")
	raw, err := os.ReadFile(kfile)
	if err != nil {
		return "", fmt.Errorf("instance %s: %w", in.Flavor, err)
	}
	k := string(raw)
	edit := func(old, repl string) error {
		if strings.Count(k, old) != 1 {
			return fmt.Errorf("instance %s: expected %q exactly once in %s", in.Flavor, old, kfile)
		}
		k = strings.Replace(k, old, repl, 1)
		return nil
	}
	if in.Namespace != "" {
		if err := edit("\nnamespace: "+DefaultNamespace+"\n", "\nnamespace: "+in.Namespace+"\n"); err != nil {
			return "", err
		}
	}
	if in.Name != "" {
		if err := edit("app.kubernetes.io/instance: "+DefaultInstance+"\n", "app.kubernetes.io/instance: "+in.Name+"\n"); err != nil {
			return "", err
		}
	}
	if len(in.Components) > 0 {
		list := "components:\n"
		for _, c := range in.Components {
			list += "- ../../components/" + c + "\n"
		}
		if err := edit("components: []\n", list); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(kfile, []byte(k), 0o644); err != nil {
		return "", fmt.Errorf("instance %s: %w", in.Flavor, err)
	}
	if in.Images != "" {
		if err := os.WriteFile(filepath.Join(overlay, "images.txt"), []byte(in.Images), 0o644); err != nil {
			return "", fmt.Errorf("instance %s: %w", in.Flavor, err)
		}
	}
	return overlay, nil
}

// BuildInstance writes in under a new directory in tmp and renders it.
func BuildInstance(root, tmp string, in Instance) ([]byte, error) {
	dir, err := os.MkdirTemp(tmp, "instance-")
	if err != nil {
		return nil, fmt.Errorf("instance dir: %w", err)
	}
	overlay, err := in.Write(root, dir)
	if err != nil {
		return nil, err
	}
	return Kustomize(overlay)
}

// BuildAll renders every overlay as shipped and every overlay with each single component
// added, the way docs/bundle.md tells users to add one. tmp holds the combinations' copies.
func BuildAll(root, tmp string) ([]Build, error) {
	comps, err := Components(root)
	if err != nil {
		return nil, err
	}
	var builds []Build
	for _, flavor := range Flavors {
		out, err := Kustomize(filepath.Join(root, "overlays", flavor))
		if err != nil {
			return nil, err
		}
		builds = append(builds, Build{Name: flavor, YAML: out})
		for _, c := range comps {
			out, err := BuildInstance(root, tmp, Instance{Flavor: flavor, Components: []string{c}})
			if err != nil {
				return nil, fmt.Errorf("%s+%s: %w", flavor, c, err)
			}
			builds = append(builds, Build{Name: flavor + "+" + c, YAML: out})
		}
	}
	return builds, nil
}

func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("copy %s: %w", path, err)
		}
		return os.WriteFile(target, data, 0o644)
	})
}
