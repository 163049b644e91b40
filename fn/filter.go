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
//   - an item this instance generated earlier (labels managed-by and instance) that it now
//     generates under another name (the image-list ConfigMap after a list change) is
//     rewritten in place to the new object, the same way;
//   - other items this instance generated earlier are dropped: the SCC after a switch to
//     vanilla, the PodMonitor after prometheus: false, ...;
//   - every other item passes through; generated objects not yet present are appended.
//
// With spec.fromWorkloads the image list takes the images of the workloads among items; their
// problems are returned as framework.Results.
func (c *ImagePrefetcher) Filter(items []*yaml.RNode) ([]*yaml.RNode, error) {
	out, results, err := c.render(items)
	if err != nil {
		return nil, err
	}
	if results.ExitCode() != 0 {
		return nil, results
	}
	return out, nil
}

// render is Filter that also returns the results (warnings too) about the items.
func (c *ImagePrefetcher) render(items []*yaml.RNode) ([]*yaml.RNode, framework.Results, error) {
	list, results, err := c.imageList(items)
	if err != nil || results.ExitCode() != 0 {
		return nil, results, err
	}
	out, err := c.place(items, list)
	return out, results, err
}

// place generates the instance with list as its images.txt and puts it into items.
func (c *ImagePrefetcher) place(items []*yaml.RNode, list string) ([]*yaml.RNode, error) {
	desired, err := c.objects(list)
	if err != nil {
		return nil, err
	}
	byID := map[string]*yaml.RNode{}
	for _, d := range desired {
		byID[objectID(d)] = d
	}
	inInput := map[string]bool{}
	for _, it := range items {
		if !skipped(it) {
			inInput[objectID(it)] = true
		}
	}
	used := map[string]bool{}
	var out []*yaml.RNode
	for _, it := range items {
		if it.GetApiVersion() == APIVersion && it.GetKind() == RenderCheckKind {
			continue // the function ran: the marker goes
		}
		if skipped(it) {
			out = append(out, it)
			continue
		}
		id := objectID(it)
		d, ok := byID[id]
		if !ok && c.owns(it) {
			// An object of ours renamed, the list ConfigMap after a list change: the
			// new one takes the old one's place (its file, position and comments), so
			// that the change reads as what changed.
			d, ok = renamed(desired, it, inInput, used)
		}
		if ok && !used[objectID(d)] {
			used[objectID(d)] = true
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

// renamed is the generated object that replaces the owned item old: one of its group, kind and
// namespace that is neither in the input nor placed yet.
func renamed(desired []*yaml.RNode, old *yaml.RNode, inInput, used map[string]bool) (*yaml.RNode, bool) {
	scope := func(n *yaml.RNode) string {
		id := objectID(n)
		return id[:strings.LastIndex(id, "|")]
	}
	for _, d := range desired {
		id := objectID(d)
		if !inInput[id] && !used[id] && scope(d) == scope(old) {
			return d, true
		}
	}
	return nil, false
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
	return generated(it) && it.GetLabels()["app.kubernetes.io/instance"] == c.Metadata.Name
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
// configuration, check the other configurations among the items, then Filter. Configuration
// errors and the problems of the workloads it takes images from are results with field paths,
// returned also as the error so that the process exits non-zero (framework.Execute writes the
// results first).
type Processor struct {
	// Dir resolves a relative spec.imagesFile; empty is the working directory.
	Dir string
	// ConfigFile is the file the configuration was read from when the orchestrator does not
	// say (standalone), for the results to name.
	ConfigFile string
}

var _ framework.ResourceListProcessor = Processor{}

// Process implements framework.ResourceListProcessor.
func (p Processor) Process(rl *framework.ResourceList) error {
	file := p.configFile(rl.FunctionConfig)
	c, results := Decode(rl.FunctionConfig, p.Dir)
	inFile(results, file)
	if c != nil {
		results = append(results, c.checkConfigs(rl.FunctionConfig, file, rl.Items)...)
	}
	rl.Results = append(rl.Results, results...)
	if results.ExitCode() != 0 {
		return results
	}
	items, results, err := c.render(rl.Items)
	inFile(results, file)
	rl.Results = append(rl.Results, results...)
	if err != nil {
		r := &framework.Result{Message: err.Error(), Severity: framework.Error, ResourceRef: c.ref(), File: file}
		rl.Results = append(rl.Results, r)
		return framework.Results{r}
	}
	if results.ExitCode() != 0 {
		return results
	}
	rl.Items = items
	return nil
}

// configFile is where the configuration fc was read from, when known.
func (p Processor) configFile(fc *yaml.RNode) *framework.File {
	if p.ConfigFile != "" {
		return &framework.File{Path: p.ConfigFile}
	}
	return fileOf(fc)
}

// inFile sets file on the results about the function configuration that name no file.
func inFile(results framework.Results, file *framework.File) {
	for _, r := range results {
		if r.File == nil && r.ResourceRef != nil && r.ResourceRef.Kind == Kind {
			r.File = file
		}
	}
}
