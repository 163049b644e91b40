package fn_test

import (
	"os"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/fn"
)

// TestReadme keeps fn/README.md's copy of the schema equal to schema.yaml and every field of
// the schema in its field table.
func TestReadme(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(raw)
	if !strings.Contains(readme, "```yaml\n"+string(fn.SchemaYAML)+"```") {
		t.Errorf("README.md's schema differs from schema.yaml")
	}
	schema := yaml.MustParse(string(fn.SchemaYAML))
	var walk func(prefix string, n *yaml.RNode)
	walk = func(prefix string, n *yaml.RNode) {
		props := n.Field("properties")
		if props == nil {
			return
		}
		_ = props.Value.VisitFields(func(f *yaml.MapNode) error {
			path := prefix + f.Key.YNode().Value
			switch path {
			case "apiVersion", "kind", "metadata", "metadata.namespace", "metadata.labels", "metadata.annotations", "spec", "spec.placement":
			default:
				if !strings.Contains(readme, "| `"+path+"` |") {
					t.Errorf("README.md documents no field %s", path)
				}
			}
			if !strings.HasPrefix(path, "spec.placement.tolerations") && !strings.HasPrefix(path, "spec.resources") {
				walk(path+".", f.Value)
			}
			return nil
		})
	}
	walk("", schema)
}
