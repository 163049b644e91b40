package fn_test

import (
	"reflect"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/fn"
)

// TestSchemaEnumsMatchBundle: the schema's lists of flavors, credential providers and
// components are the bundle's (in any order), so a new overlay or component cannot be forgotten there.
func TestSchemaEnumsMatchBundle(t *testing.T) {
	t.Parallel()
	comps, err := bundle.Components()
	if err != nil {
		t.Fatal(err)
	}
	providers := []string{fn.CredentialProviderNone}
	for _, c := range comps {
		if p, ok := strings.CutSuffix(c, "-credential-provider"); ok {
			providers = append(providers, p)
		}
	}
	schema := yaml.MustParse(string(fn.SchemaYAML))
	for _, tc := range []struct {
		path []string
		want []string
	}{
		{[]string{"properties", "spec", "properties", "flavor", "enum"}, bundle.Flavors},
		{[]string{"properties", "spec", "properties", "credentialProvider", "enum"}, providers},
		{[]string{"properties", "spec", "properties", "components", "items", "enum"}, comps},
	} {
		n, err := schema.Pipe(yaml.Lookup(tc.path...))
		if err != nil || n == nil {
			t.Fatalf("schema has no %v: %v", tc.path, err)
		}
		var got []string
		if err := n.Document().Decode(&got); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(tc.want))) {
			t.Errorf("schema %v = %v, the bundle has %v", tc.path, got, tc.want)
		}
	}
}
