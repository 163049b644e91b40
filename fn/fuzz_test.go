package fn

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
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

// FuzzWorkloadImages: any manifests as input give images the agent's parser takes as they are,
// or error results with a field path; never a panic.
func FuzzWorkloadImages(f *testing.F) {
	for _, s := range []string{"testdata/workloads/input.yaml", "testdata/workloads-bad-image/input.yaml"} {
		raw, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
	}
	f.Add([]byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: [1]\n"))
	f.Add([]byte("apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c, labels: {a: b}}\nspec: {jobTemplate: {spec: {template: {spec: {containers: [{image: 3}]}}}}}\n"))
	sel, err := (&FromWorkloads{Selector: "a"}).compile()
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// Read as kpt, kustomize and the standalone command read items (the framework's
		// ByteReader, which rejects what is not an object).
		items, err := (&kio.ByteReader{Reader: bytes.NewReader(data)}).Read()
		if err != nil {
			return
		}
		imgs, results := sel.workloadImages(items)
		for _, r := range results {
			if r.Severity != framework.Error || r.Field == nil || r.Field.Path == "" || r.ResourceRef == nil {
				t.Fatalf("result without severity error, field path or resource: %+v", r)
			}
		}
		for _, w := range imgs {
			if again, err := imagelist.Normalize(w.ref); err != nil || again != w.ref || len(w.workloads) == 0 {
				t.Fatalf("image %+v: Normalize gives %q, %v", w, again, err)
			}
		}
	})
}
