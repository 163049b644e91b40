package fn

import (
	"fmt"
	"path"
	"strconv"
	"strings"

	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/kio/kioutil"
	"sigs.k8s.io/kustomize/kyaml/yaml"
)

// Annotations the orchestrators (kpt, kustomize) put on items to find their files and
// order again; an item the function rewrites keeps them.
var orchestratorPrefixes = []string{"config.kubernetes.io/", "internal.config.kubernetes.io/", "config.k8s.io/"}

// Filter puts the instance into items:
//   - local-config items (the Kptfile, function configurations, kustomize helpers) pass
//     through untouched;
//   - an item with the identity of a generated object is rewritten in place to equal it,
//     keeping its comments, field order and orchestrator annotations (rendering twice is a
//     no-op);
//   - other items this instance generated earlier (labels managed-by and instance) are
//     dropped: an old image-list ConfigMap, the SCC after a switch to vanilla, ...;
//   - every other item passes through; generated objects not yet present are appended.
func (c *ImagePrefetcher) Filter(items []*yaml.RNode) ([]*yaml.RNode, error) {
	desired, err := c.Objects()
	if err != nil {
		return nil, err
	}
	byID := map[string]*yaml.RNode{}
	for _, d := range desired {
		byID[objectID(d)] = d
	}
	used := map[string]bool{}
	var out []*yaml.RNode
	for _, it := range items {
		if skipped(it) {
			out = append(out, it)
			continue
		}
		id := objectID(it)
		if d, ok := byID[id]; ok && !used[id] {
			used[id] = true
			if err := keepOrchestratorAnnotations(it, d); err != nil {
				return nil, err
			}
			syncNode(it.YNode(), d.YNode())
			out = append(out, it)
			continue
		}
		if c.owns(it) {
			continue
		}
		out = append(out, it)
	}
	file := c.packageFile(items)
	index := nextIndex(out, file)
	for _, d := range desired {
		if used[objectID(d)] {
			continue
		}
		if file != "" {
			// kyaml's framework adds the legacy config.kubernetes.io/ forms where the
			// orchestrator uses them.
			if err := d.PipeE(yaml.SetAnnotation(kioutil.PathAnnotation, file)); err != nil {
				return nil, err
			}
			if err := d.PipeE(yaml.SetAnnotation(kioutil.IndexAnnotation, strconv.Itoa(index))); err != nil {
				return nil, err
			}
			index++
		}
		out = append(out, d)
	}
	return out, nil
}

// skipped reports the items the function never changes: local configuration.
func skipped(it *yaml.RNode) bool {
	if it.GetAnnotations()["config.kubernetes.io/local-config"] == "true" {
		return true
	}
	switch it.GetKind() {
	case "Kptfile", Kind:
		return true
	}
	return strings.HasPrefix(it.GetApiVersion(), "kustomize.config.k8s.io/")
}

func (c *ImagePrefetcher) owns(it *yaml.RNode) bool {
	l := it.GetLabels()
	return l["app.kubernetes.io/managed-by"] == ManagedBy && l["app.kubernetes.io/instance"] == c.Metadata.Name
}

// objectID is what the API server tells objects apart by: group, kind, namespace and name.
func objectID(n *yaml.RNode) string {
	group, _, _ := strings.Cut(n.GetApiVersion(), "/")
	if !strings.Contains(n.GetApiVersion(), "/") {
		group = ""
	}
	return group + "|" + n.GetKind() + "|" + n.GetNamespace() + "|" + n.GetName()
}

func keepOrchestratorAnnotations(from, to *yaml.RNode) error {
	for k, v := range from.GetAnnotations() {
		for _, p := range orchestratorPrefixes {
			if strings.HasPrefix(k, p) {
				if err := to.PipeE(yaml.SetAnnotation(k, v)); err != nil {
					return fmt.Errorf("annotation %s: %w", k, err)
				}
				break
			}
		}
	}
	return nil
}

// packageFile is the file new objects go to when the items come from files (kpt): the
// instance's own <instance>.yaml beside the configuration. Empty when they do not (kustomize,
// standalone), so no path annotation leaks into the output.
func (c *ImagePrefetcher) packageFile(items []*yaml.RNode) string {
	dir, fromFiles := "", false
	for _, it := range items {
		p := it.GetAnnotations()[kioutil.PathAnnotation]
		if p == "" {
			continue
		}
		fromFiles = true
		if it.GetKind() == Kind && it.GetName() == c.Metadata.Name {
			dir = path.Dir(p)
		}
	}
	if !fromFiles {
		return ""
	}
	return path.Join(dir, c.Metadata.Name+".yaml")
}

// nextIndex is the first free document index in file among items, so that new objects never
// collide with the ones kpt already holds in that file.
func nextIndex(items []*yaml.RNode, file string) int {
	next := 0
	for _, it := range items {
		a := it.GetAnnotations()
		p, idx := a[kioutil.PathAnnotation], a[kioutil.IndexAnnotation]
		if p != file {
			continue
		}
		if i, err := strconv.Atoi(idx); err == nil && i >= next {
			next = i + 1
		}
	}
	return next
}

// Processor runs the function over a ResourceList: decode, default and validate the
// configuration, then Filter. Configuration errors are results with field paths, returned
// also as the error so that the process exits non-zero (framework.Execute writes the
// results first). Dir resolves a relative spec.imagesFile.
type Processor struct {
	Dir string
}

var _ framework.ResourceListProcessor = Processor{}

// Process implements framework.ResourceListProcessor.
func (p Processor) Process(rl *framework.ResourceList) error {
	c, results := Decode(rl.FunctionConfig, p.Dir)
	rl.Results = append(rl.Results, results...)
	if results.ExitCode() != 0 {
		return results
	}
	items, err := c.Filter(rl.Items)
	if err != nil {
		r := &framework.Result{Message: err.Error(), Severity: framework.Error, ResourceRef: c.ref()}
		rl.Results = append(rl.Results, r)
		return framework.Results{r}
	}
	rl.Items = items
	return nil
}
