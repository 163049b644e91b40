package fn

import (
	"os"
	"path/filepath"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/yaml"
)

// FuzzDecode: any YAML as function configuration gives either error results or a
// configuration that renders; never a panic, never silence.
func FuzzDecode(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/*/config.yaml")
	for _, s := range seeds {
		raw, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
	}
	f.Add([]byte("apiVersion: fn.image-prefetcher.stackrox.io/v1alpha1\nkind: ImagePrefetcher\nmetadata: {name: x}\nspec: {maxParallelPulls: -1, placement: {tolerations: [{operator: Equal}]}}\n"))
	f.Add([]byte("[1, 2]"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		node, err := yaml.Parse(string(data))
		if err != nil {
			node = nil
		}
		c, results := Decode(node, dir)
		if results.ExitCode() != 0 {
			return
		}
		if c == nil {
			t.Fatalf("no configuration and no error result for %q", data)
		}
		if _, err := c.Filter(nil); err != nil {
			t.Fatalf("valid configuration %q does not render: %v", data, err)
		}
	})
}
