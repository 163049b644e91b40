// Package bundle builds the Kustomize bundle (base, overlays, components) the way Flux's
// kustomize-controller does: krusty with plugins disabled and the legacy resource order. It is
// the one definition of the bundle's flavors, components and instance values: the golden tests,
// the end-to-end tests and the KRM function all build instances through it.
package bundle

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	manifests "github.com/nodeprefetch/image-prefetcher"
)

// The instance overlays under overlays/.
const (
	FlavorVanilla = "vanilla"
	FlavorOCP     = "ocp"
)

// Flavors are the instance overlays, the default first.
var Flavors = []string{FlavorVanilla, FlavorOCP}

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

// Root returns the repository root: the nearest directory at or above the working directory that
// holds go.mod and base/kustomization.yaml (go test runs a test in its package's directory). Not the
// source file's path from runtime.Caller: the Makefile builds with -trimpath, which leaves no
// absolute path in a binary and keeps the Go build cache valid for a clone at another path.
func Root() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("bundle root: %w", err)
	}
	for dir := wd; ; {
		if isRoot(dir) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("bundle root: no directory at or above %s holds go.mod and base/kustomization.yaml", wd)
		}
		dir = parent
	}
}

func isRoot(dir string) bool {
	for _, f := range []string{"go.mod", filepath.Join("base", "kustomization.yaml")} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return false
		}
	}
	return true
}

// Kustomize renders the kustomization in dir on disk with Flux's options.
func Kustomize(dir string) ([]byte, error) {
	return kustomize(filesys.MakeFsOnDisk(), dir)
}

// kustomize renders the kustomization in dir of fsys with Flux's options: builtin plugins
// only, the legacy (kind-based) resource order, and no load restrictions.
func kustomize(fsys filesys.FileSystem, dir string) ([]byte, error) {
	opts := krusty.MakeDefaultOptions()
	opts.Reorder = krusty.ReorderOptionLegacy
	opts.LoadRestrictions = types.LoadRestrictionsNone
	opts.PluginConfig = types.DisabledPluginConfig()
	m, err := krusty.MakeKustomizer(opts).Run(fsys, dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	out, err := m.AsYaml()
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: yaml: %w", dir, err)
	}
	return out, nil
}

// Components lists the components the bundle ships: the directories under components/ of the
// embedded bundle that hold a kustomization, sorted.
func Components() ([]string, error) {
	entries, err := fs.ReadDir(manifests.FS, "components")
	if err != nil {
		return nil, fmt.Errorf("list components: %w", err)
	}
	var names []string
	for _, e := range entries {
		if _, err := fs.Stat(manifests.FS, "components/"+e.Name()+"/kustomization.yaml"); e.IsDir() && err == nil {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// included are, per flavor, the components whose work the flavor's overlay does itself.
var included = map[string][]string{
	// overlays/ocp mounts CRI-O's paths alone, as components/runtime-crio does. The two do not
	// apply one after the other: the overlay's patches, which run after its components, would
	// take the component's CRI-O mounts for the base's CRI-O pair and delete them.
	FlavorOCP: {"runtime-crio"},
}

// Included reports whether flavor's overlay already does what component c does, so that c is
// not to be added to it.
func Included(flavor, c string) bool { return slices.Contains(included[flavor], c) }

// FlavorComponents lists the components that can be added to flavor: Components but the ones
// the flavor includes.
func FlavorComponents(flavor string) ([]string, error) {
	comps, err := Components()
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(comps, func(c string) bool { return Included(flavor, c) }), nil
}

// sources are the directories of the repository an instance is built from.
var sources = []string{"base", "overlays", "components"}

// Write copies base/, overlays/ and components/ of the repository at root into dir and turns
// the copy of overlays/<Flavor> into in, the way a user edits a copy; it returns the directory
// of that overlay.
func (in Instance) Write(root, dir string) (string, error) {
	for _, sub := range sources {
		if err := os.CopyFS(filepath.Join(dir, sub), os.DirFS(filepath.Join(root, sub))); err != nil {
			return "", fmt.Errorf("instance: copy %s: %w", sub, err)
		}
	}
	return in.write(filesys.MakeFsOnDisk(), dir)
}

// Render builds in from the embedded bundle, in memory.
func (in Instance) Render() ([]byte, error) {
	fsys := filesys.MakeFsInMemory()
	err := fs.WalkDir(manifests.FS, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := fs.ReadFile(manifests.FS, path)
		if err != nil {
			return err
		}
		return fsys.WriteFile("/"+path, data)
	})
	if err != nil {
		return nil, fmt.Errorf("load the embedded bundle: %w", err)
	}
	overlay, err := in.write(fsys, "/")
	if err != nil {
		return nil, err
	}
	return kustomize(fsys, overlay)
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
// added (but the ones it includes), the way docs/bundle.md tells users to add one. tmp holds
// the combinations' copies.
func BuildAll(root, tmp string) ([]Build, error) {
	var builds []Build
	for _, flavor := range Flavors {
		out, err := Kustomize(filepath.Join(root, "overlays", flavor))
		if err != nil {
			return nil, err
		}
		builds = append(builds, Build{Name: flavor, YAML: out})
		comps, err := FlavorComponents(flavor)
		if err != nil {
			return nil, err
		}
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
