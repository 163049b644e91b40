package fn

import (
	"fmt"
	"maps"
	"slices"
	"strconv"

	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/bundle"
)

// ManagedBy is the app.kubernetes.io/managed-by value on every object the function generates;
// together with app.kubernetes.io/instance it tells a later run which input objects it owns.
const ManagedBy = "image-prefetcher-fn"

// managedByLabel carries ManagedBy.
const managedByLabel = "app.kubernetes.io/managed-by"

// generated reports whether it is an object some instance of this function generated.
func generated(it *yaml.RNode) bool {
	return it.GetLabels()[managedByLabel] == ManagedBy
}

// objects returns the instance's objects as the bundle builds them, in its order, with list as
// its images.txt. c must be valid.
func (c *ImagePrefetcher) objects(list string) ([]*yaml.RNode, error) {
	out, err := c.instance(list).Render()
	if err != nil {
		return nil, err
	}
	nodes, err := kio.FromBytes(out)
	if err != nil {
		return nil, fmt.Errorf("read the built instance: %w", err)
	}
	for _, n := range nodes {
		if err := n.PipeE(yaml.LookupCreate(yaml.MappingNode, "metadata", "labels"), yaml.SetField(managedByLabel, yaml.NewScalarRNode(ManagedBy))); err != nil {
			return nil, fmt.Errorf("label %s: %w", n.GetName(), err)
		}
	}
	return nodes, nil
}

// instance is the bundle instance the configuration describes, with list as its images.txt.
func (c *ImagePrefetcher) instance(list string) bundle.Instance {
	s := c.Spec
	in := bundle.Instance{
		Flavor:      s.Flavor,
		Namespace:   s.Namespace,
		Name:        c.Metadata.Name,
		Images:      []byte(list),
		Components:  c.components(),
		AgentImage:  s.AgentImage,
		PullSecrets: s.PullSecrets,
		Placement:   s.Placement,
		Resources:   s.Resources,

		PinnedImageSet: s.PinnedImageSet,
	}
	if p := s.MaxParallelPulls; p != nil {
		in.Args = append(in.Args, "--max-parallel-pulls="+strconv.Itoa(*p))
	}
	if p := s.MaxConcurrentNodes; p != nil {
		// After the component's default, so this one wins.
		in.Args = append(in.Args, "--max-concurrent-nodes="+strconv.Itoa(*p))
	}
	return in
}

// components are the bundle components the configuration asks for, sorted by name so that
// the output does not depend on how the configuration lists them.
func (c *ImagePrefetcher) components() []string {
	s := c.Spec
	want := map[string]bool{}
	for _, name := range s.Components {
		want[name] = true
	}
	if s.Prometheus {
		want["prometheus"] = true
	}
	if s.MetricsCollector {
		want["metrics-collector"] = true
	}
	if s.StartupTaint {
		want["startup-taint"] = true
	}
	if s.MaxConcurrentNodes != nil {
		// The agents coordinate through Leases in their namespace: the component's Role.
		want["max-concurrent-nodes"] = true
	}
	if p := s.CredentialProvider; p != CredentialProviderNone {
		want[p+credentialProviderSuffix] = true
	}
	return slices.Sorted(maps.Keys(want))
}
