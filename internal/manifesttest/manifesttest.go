// Package manifesttest holds test helpers for rendered Kubernetes manifests.
package manifesttest

import (
	"encoding/json"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/kustomize/kyaml/yaml"
)

// ByID decodes objects into plain values keyed by kind/namespace/name, so that two renders
// compare with reflect.DeepEqual whatever their order, comments and formatting.
func ByID(t testing.TB, nodes []*yaml.RNode) map[string]any {
	t.Helper()
	out := map[string]any{}
	for _, n := range nodes {
		j, err := n.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		var v any
		if err := json.Unmarshal(j, &v); err != nil {
			t.Fatal(err)
		}
		out[n.GetKind()+"/"+n.GetNamespace()+"/"+n.GetName()] = v
	}
	return out
}

// YAMLByID is ByID of a multi-document YAML stream.
func YAMLByID(t testing.TB, data []byte) map[string]any {
	t.Helper()
	nodes, err := kio.FromBytes(data)
	if err != nil {
		t.Fatal(err)
	}
	return ByID(t, nodes)
}
