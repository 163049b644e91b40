package fn

import (
	"fmt"
	"path"
	"strings"

	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/kio/kioutil"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/bundle"
)

// uniqueNames says why two configurations, of instances in namespaces ns and otherNS, may not
// share the instance name.
func uniqueNames(name, ns, otherNS string) string {
	where := ""
	if ns != otherNS {
		where = fmt.Sprintf(" (even in namespaces %s and %s)", ns, otherNS)
	}
	return fmt.Sprintf("two instances named %s%s: the node label key %s is cluster-wide, so an instance name must be unique across the cluster",
		name, where, nodelabel.Key(name))
}

// isConfig reports whether n is an ImagePrefetcher configuration.
func isConfig(n *yaml.RNode) bool {
	group, _, _ := strings.Cut(n.GetApiVersion(), "/")
	wantGroup, _, _ := strings.Cut(APIVersion, "/")
	return n.GetKind() == Kind && group == wantGroup
}

// describe names a configuration in a message: ImagePrefetcher/<name> and its file, or what it
// is when the file is not known.
func describe(name string, file *framework.File, otherwise string) string {
	if file != nil {
		return Kind + "/" + name + " (" + file.Path + ")"
	}
	return Kind + "/" + name + " (" + otherwise + ")"
}

// checkConfigs reports the other ImagePrefetcher configurations among items, which a run would
// otherwise pass through without rendering them:
//   - one with this configuration's instance name is an error whatever its namespace;
//   - one that no Kptfile among items renders with a pipeline step of its own (several
//     instances in one kpt package) is an error: nothing would ever render it.
//
// self is the function configuration as the orchestrator gave it, and file where it was read
// from (nil when unknown); the item that is self is not another configuration.
func (c *ImagePrefetcher) checkConfigs(self *yaml.RNode, file *framework.File, items []*yaml.RNode) framework.Results {
	var results framework.Results
	rendered, fromKpt := kptConfigPaths(items)
	this := describe(c.Metadata.Name, file, "the function configuration")
	for _, it := range items {
		if !isConfig(it) || sameConfig(it, self) {
			continue
		}
		name := configName(it)
		r := &reporter{ref: resourceRef(it), file: fileOf(it)}
		other := describe(name, r.file, "an input resource")
		switch {
		case name == c.Metadata.Name:
			r.errorf("metadata.name", name, "%s has the instance name of %s, which this run renders: %s",
				other, this, uniqueNames(name, c.Spec.Namespace, configNamespace(it)))
		case fromKpt && r.file != nil && rendered[path.Clean(r.file.Path)]:
			// Another pipeline step renders it.
		case fromKpt:
			r.errorf("metadata.name", name, "a second configuration, %s, is among the package's resources, but only %s is rendered by this step "+
				"and no Kptfile pipeline step has it as configPath: give each configuration a pipeline step of its own", other, this)
		default:
			r.errorf("metadata.name", name, "a second configuration, %s, would pass through unrendered: "+
				"this run renders %s only; run the function once per configuration", other, this)
		}
		results = append(results, r.results...)
	}
	return results
}

// kptConfigPaths returns the files the pipelines of the Kptfiles among items name as
// configPath, relative to the package root as kpt's path annotations are, and whether items
// hold a Kptfile at all (the run is kpt's).
func kptConfigPaths(items []*yaml.RNode) (map[string]bool, bool) {
	paths, fromKpt := map[string]bool{}, false
	for _, it := range items {
		if it.GetKind() != "Kptfile" {
			continue
		}
		fromKpt = true
		p, _, err := kioutil.GetFileAnnotations(it)
		if err != nil || p == "" {
			continue
		}
		dir := path.Dir(p)
		for _, list := range []string{"mutators", "validators"} {
			steps, err := it.Pipe(yaml.Lookup("pipeline", list))
			if err != nil || steps == nil || steps.YNode().Kind != yaml.SequenceNode {
				continue
			}
			for _, step := range steps.Content() {
				if step.Kind != yaml.MappingNode {
					continue
				}
				if cp := yaml.NewRNode(step).Field("configPath"); cp != nil && cp.Value.YNode().Kind == yaml.ScalarNode {
					paths[path.Join(dir, cp.Value.YNode().Value)] = true
				}
			}
		}
	}
	return paths, fromKpt
}

// sameConfig reports whether the item is the function configuration itself: the same file and
// document when the orchestrator says (kpt), else the same content but for the orchestrator's
// annotations.
func sameConfig(item, self *yaml.RNode) bool {
	if self == nil {
		return false
	}
	ip, ii, _ := kioutil.GetFileAnnotations(item)
	sp, si, _ := kioutil.GetFileAnnotations(self)
	if ip != "" && sp != "" {
		return path.Clean(ip) == path.Clean(sp) && indexOrZero(ii) == indexOrZero(si)
	}
	a, errA := withoutOrchestratorAnnotations(item)
	b, errB := withoutOrchestratorAnnotations(self)
	return errA == nil && errB == nil && a == b
}

func indexOrZero(s string) string {
	if s == "" {
		return "0"
	}
	return s
}

// withoutOrchestratorAnnotations is n as YAML without the annotations kpt and kustomize add.
func withoutOrchestratorAnnotations(n *yaml.RNode) (string, error) {
	c := n.Copy()
	for k := range c.GetAnnotations() {
		for _, p := range orchestratorPrefixes {
			if strings.HasPrefix(k, p) {
				if _, err := c.Pipe(yaml.ClearAnnotation(k)); err != nil {
					return "", err
				}
				break
			}
		}
	}
	return c.String()
}

// configNamespace is spec.namespace of a configuration item, defaulted.
func configNamespace(n *yaml.RNode) string {
	v, err := n.Pipe(yaml.Lookup("spec", "namespace"))
	if err != nil || v == nil || yaml.GetValue(v) == "" {
		return bundle.DefaultNamespace
	}
	return yaml.GetValue(v)
}
