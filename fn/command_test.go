package fn_test

import (
	"path/filepath"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/kio"

	"github.com/nodeprefetch/image-prefetcher/fn"
)

// TestResourceFilesStaySeparate: standalone, the last document of one resource file and the
// first of the next are two objects (read as one stream, they merged into one, and the first
// was lost).
func TestResourceFilesStaySeparate(t *testing.T) {
	t.Parallel()
	a := writeFile(t, "a.yaml", []byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: app}\n"))
	b := writeFile(t, "b.yaml", []byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b, namespace: app}\ndata: {k: v}"))
	c := writeFile(t, "c.yaml", []byte("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: app}\n"))
	out, err := fn.RenderFile(filepath.Join("..", "examples", "standalone", "prefetcher.yaml"), a, b, c)
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := kio.FromBytes(out)
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, n := range nodes {
		if n.GetNamespace() == "app" {
			found[n.GetName()] = true
		}
	}
	if len(found) != 3 {
		t.Errorf("resources in the output %v, want a, b and c:\n%s", found, out)
	}
}
