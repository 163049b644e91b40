// Package bundled holds the Kustomize bundle as rendered by kustomize, embedded in the KRM
// function so that the function derives every instance from the same manifests users build by
// hand. The YAML files are generated from base/, overlays/ and components/ (`go test
// ./fn/bundled -update`); a test fails when they drift from the bundle.
package bundled

import (
	"embed"
	"fmt"

	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/kustomize/kyaml/yaml"
)

// The instance the shipped overlays render: every name in the embedded YAML derives from these.
const (
	Namespace = "prefetch-images"
	Instance  = "my-images"
	// AgentImage is the agent image the overlays set (where `make image-push` puts it).
	AgentImage = "127.0.0.1:5000/image-prefetcher:dev"
)

// Flavors are the instance overlays, each embedded as <flavor>.yaml.
var Flavors = []string{"vanilla", "ocp"}

// Components are the components whose added objects are embedded as component-<name>.yaml.
var Components = []string{"prometheus", "max-concurrent-nodes", "metrics-collector"}

//go:embed vanilla.yaml ocp.yaml component-*.yaml
var files embed.FS

// Flavor returns a fresh copy of the objects overlays/<flavor> renders, in kustomize's order.
func Flavor(flavor string) ([]*yaml.RNode, error) {
	return parse(flavor + ".yaml")
}

// Component returns fresh copies of the objects components/<name> adds to an instance (its
// patches to the DaemonSet are not included: the function applies those itself).
func Component(name string) ([]*yaml.RNode, error) {
	return parse("component-" + name + ".yaml")
}

func parse(name string) ([]*yaml.RNode, error) {
	raw, err := files.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("embedded bundle %s: %w", name, err)
	}
	nodes, err := kio.FromBytes(raw)
	if err != nil {
		return nil, fmt.Errorf("embedded bundle %s: %w", name, err)
	}
	// The file's "generated" header is about the file, not about the first object.
	for _, n := range nodes {
		y := n.YNode()
		y.HeadComment = ""
		if len(y.Content) > 0 {
			y.Content[0].HeadComment = ""
		}
	}
	return nodes, nil
}
