package bundled

import (
	"bytes"
	"flag"
	"os"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/kustomize/kyaml/yaml"
)

var update = flag.Bool("update", false, "rewrite the embedded YAML from the bundle")

const header = "# Generated from the Kustomize bundle by `go test ./fn/bundled -update`. Do not edit.\n"

// render builds what each embedded file must hold from the bundle as it is now.
func render(t *testing.T) map[string][]byte {
	t.Helper()
	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, flavor := range Flavors {
		y, err := bundle.BuildInstance(root, t.TempDir(), bundle.Instance{Flavor: flavor})
		if err != nil {
			t.Fatal(err)
		}
		out[flavor+".yaml"] = append([]byte(header), y...)
	}
	plain, err := kio.FromBytes(out["vanilla.yaml"])
	if err != nil {
		t.Fatal(err)
	}
	inPlain := map[string]bool{}
	for _, n := range plain {
		inPlain[n.GetKind()+"/"+n.GetName()] = true
	}
	for _, c := range Components {
		y, err := bundle.BuildInstance(root, t.TempDir(), bundle.Instance{Flavor: "vanilla", Components: []string{c}})
		if err != nil {
			t.Fatal(err)
		}
		nodes, err := kio.FromBytes(y)
		if err != nil {
			t.Fatal(err)
		}
		var added []*yaml.RNode
		for _, n := range nodes {
			if !inPlain[n.GetKind()+"/"+n.GetName()] {
				added = append(added, n)
			}
		}
		if len(added) == 0 {
			t.Fatalf("component %s adds no object", c)
		}
		s, err := kio.StringAll(added)
		if err != nil {
			t.Fatal(err)
		}
		out["component-"+c+".yaml"] = append([]byte(header), s...)
	}
	return out
}

// TestInSync keeps the embedded YAML equal to what the bundle renders today.
func TestInSync(t *testing.T) {
	for name, want := range render(t) {
		if *update {
			if err := os.WriteFile(name, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		have, err := files.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(have, want) {
			t.Errorf("%s differs from the bundle; run `go test ./fn/bundled -update` (or make fn-bundled)", name)
		}
	}
}

// TestDefaults checks the constants the function relies on against the embedded objects.
func TestDefaults(t *testing.T) {
	for _, flavor := range Flavors {
		nodes, err := Flavor(flavor)
		if err != nil {
			t.Fatal(err)
		}
		var ds *yaml.RNode
		for _, n := range nodes {
			if n.GetKind() == "DaemonSet" {
				ds = n
			}
		}
		if ds == nil {
			t.Fatalf("%s: no DaemonSet", flavor)
		}
		if ds.GetName() != Instance || ds.GetNamespace() != Namespace {
			t.Errorf("%s: DaemonSet %s/%s, want %s/%s", flavor, ds.GetNamespace(), ds.GetName(), Namespace, Instance)
		}
		img, err := ds.Pipe(yaml.Lookup("spec", "template", "spec", "containers", "[name=agent]", "image"))
		if err != nil || img == nil {
			t.Fatalf("%s: agent image: %v", flavor, err)
		}
		if got := yaml.GetValue(img); got != AgentImage {
			t.Errorf("%s: agent image %q, want %q", flavor, got, AgentImage)
		}
	}
	for _, c := range Components {
		if _, err := Component(c); err != nil {
			t.Fatal(err)
		}
	}
}
