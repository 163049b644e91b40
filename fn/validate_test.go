package fn_test

import (
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/fn"
)

// errorsOn returns the messages of the error results on field.
func errorsOn(results framework.Results, field string) []string {
	var out []string
	for _, r := range results {
		if r.Severity == framework.Error && r.Field != nil && r.Field.Path == field {
			out = append(out, r.Message)
		}
	}
	return out
}

// TestInstanceNameRule: metadata.name is checked with the agent's own rule
// (nodelabel.ValidateInstance), so a name the function accepts is one the agent starts with.
func TestInstanceNameRule(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"my.images", "My-Images", "-images", "images-", "my_images", strings.Repeat("a", 63) + "."} {
		t.Run(name, func(t *testing.T) {
			agent := nodelabel.ValidateInstance(name)
			if agent == nil {
				t.Fatalf("the agent accepts %q", name)
			}
			_, results := fn.Decode(yaml.MustParse("apiVersion: "+fn.APIVersion+"\nkind: "+fn.Kind+"\nmetadata: {name: "+name+"}\nspec: {images: [busybox]}\n"), "")
			got := errorsOn(results, "metadata.name")
			if len(got) != 1 {
				t.Fatalf("errors on metadata.name %q; all results: %v", got, results)
			}
			// The schema's maxLength speaks first for a name over 63 characters.
			if len(name) <= 63 && got[0] != agent.Error() {
				t.Errorf("metadata.name: %q, want the agent's %q", got[0], agent.Error())
			}
		})
	}
	_, results := fn.Decode(yaml.MustParse("apiVersion: "+fn.APIVersion+"\nkind: "+fn.Kind+"\nmetadata: {name: my-images}\nspec: {images: [busybox]}\n"), "")
	if len(results) != 0 {
		t.Errorf("my-images: %v", results)
	}
}
