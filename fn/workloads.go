package fn

import (
	"fmt"
	"maps"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/distribution/reference"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/kio/kioutil"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
)

// FromWorkloads is spec.fromWorkloads: take the images of the workloads among the function's
// input resources into the list. Set (even empty) it selects every workload; each field
// narrows the selection.
type FromWorkloads struct {
	// Namespaces keeps the workloads in these namespaces; a workload without
	// metadata.namespace counts as in "default", as kustomize and kubectl count it.
	Namespaces []string `json:"namespaces,omitempty"`
	// Selector is a label selector (kubectl's -l syntax) on the workloads' own labels.
	Selector string `json:"selector,omitempty"`
	// Include keeps only the images that match one of these reference patterns.
	Include []string `json:"include,omitempty"`
	// Exclude leaves out the images that match one of these reference patterns.
	Exclude []string `json:"exclude,omitempty"`
}

// PrefetchAnnotation set to "false" on a workload leaves its images out of every instance's
// derived list.
const PrefetchAnnotation = nodelabel.Domain + "/prefetch"

// podSpecPaths is where each workload kind keeps its pod spec. Versions do not matter (the
// paths are the same in every served version); the group does, so that a custom resource
// of the same kind is not mistaken for one.
var podSpecPaths = map[schema.GroupKind][]string{
	{Group: "", Kind: "Pod"}:                   {"spec"},
	{Group: "", Kind: "PodTemplate"}:           {"template", "spec"},
	{Group: "", Kind: "ReplicationController"}: {"spec", "template", "spec"},
	{Group: "apps", Kind: "Deployment"}:        {"spec", "template", "spec"},
	{Group: "apps", Kind: "StatefulSet"}:       {"spec", "template", "spec"},
	{Group: "apps", Kind: "DaemonSet"}:         {"spec", "template", "spec"},
	{Group: "apps", Kind: "ReplicaSet"}:        {"spec", "template", "spec"},
	{Group: "batch", Kind: "Job"}:              {"spec", "template", "spec"},
	{Group: "batch", Kind: "CronJob"}:          {"spec", "jobTemplate", "spec", "template", "spec"},
}

// containerLists are the pod spec's lists whose images a node pulls before the pod runs
// (with the image volumes, spec.volumes[].image.reference). Ephemeral containers are left
// out: they are added to running pods for debugging.
var containerLists = []string{"initContainers", "containers"}

// workloadSelection is a validated spec.fromWorkloads, ready to match.
type workloadSelection struct {
	namespaces []string
	selector   labels.Selector
	include    []string
	exclude    []string
}

// validate reports the problems of spec.fromWorkloads with their field paths.
func (w *FromWorkloads) validate(r *reporter) {
	const field = "spec.fromWorkloads"
	for i, ns := range w.Namespaces {
		r.messages(fmt.Sprintf("%s.namespaces[%d]", field, i), ns, validation.IsDNS1123Label(ns))
	}
	if _, err := labels.Parse(w.Selector); err != nil {
		r.errorf(field+".selector", w.Selector, "invalid label selector: %v", err)
	}
	for i, p := range w.Include {
		if err := checkPattern(p); err != nil {
			r.errorf(fmt.Sprintf("%s.include[%d]", field, i), p, "%v", err)
		}
	}
	for i, p := range w.Exclude {
		if err := checkPattern(p); err != nil {
			r.errorf(fmt.Sprintf("%s.exclude[%d]", field, i), p, "%v", err)
		}
	}
}

// compile turns a valid spec.fromWorkloads into a selection.
func (w *FromWorkloads) compile() (*workloadSelection, error) {
	sel, err := labels.Parse(w.Selector)
	if err != nil {
		return nil, fmt.Errorf("spec.fromWorkloads.selector %q: %w", w.Selector, err)
	}
	return &workloadSelection{namespaces: w.Namespaces, selector: sel, include: w.Include, exclude: w.Exclude}, nil
}

func checkPattern(p string) error {
	if p == "" {
		return fmt.Errorf("an empty pattern matches no image")
	}
	// path.Match checks the whole pattern even when the name does not match.
	if _, err := path.Match(p, ""); err != nil {
		return fmt.Errorf("invalid reference pattern %q: %w", p, err)
	}
	return nil
}

// matchPattern reports whether the path.Match pattern p matches the image: its registry, its
// repository or the whole reference, each fully qualified or in the short form Docker shows
// (nginx for docker.io/library/nginx). '*' stops at '/', so a pattern of a registry is its
// host alone.
func matchPattern(p string, named reference.Named) bool {
	for _, s := range []string{
		reference.Domain(named),
		named.Name(), reference.FamiliarName(named),
		named.String(), reference.FamiliarString(named),
	} {
		if ok, _ := path.Match(p, s); ok {
			return true
		}
	}
	return false
}

// wants reports whether the selection keeps the image (already normalized).
func (s *workloadSelection) wants(named reference.Named) bool {
	if len(s.include) > 0 && !slices.ContainsFunc(s.include, func(p string) bool { return matchPattern(p, named) }) {
		return false
	}
	return !slices.ContainsFunc(s.exclude, func(p string) bool { return matchPattern(p, named) })
}

// selects reports whether the workload is a source, from its metadata.
func (s *workloadSelection) selects(it *yaml.RNode) bool {
	if len(s.namespaces) > 0 {
		ns := it.GetNamespace()
		if ns == "" {
			ns = metav1.NamespaceDefault
		}
		if !slices.Contains(s.namespaces, ns) {
			return false
		}
	}
	return s.selector.Matches(labels.Set(it.GetLabels()))
}

// workloadImage is one image of the derived list and the workloads that use it.
type workloadImage struct {
	ref string // normalized, as the agent sends it to CRI
	// workloads name the workloads that use the image, as "Kind/namespace/name" for a
	// container's image and "volume <name> of Kind/namespace/name" for an image volume's.
	workloads []string
}

// workloadImages collects the images of the selected workloads among items, normalized with
// the agent's rules, without those the selection's patterns leave out, sorted by reference.
// Local configuration and the objects of any instance of this function are never sources
// (the agent's own image would otherwise enter the list on the second render). Problems are
// error results on the workload, with the field path.
func (s *workloadSelection) workloadImages(items []*yaml.RNode) ([]workloadImage, framework.Results) {
	var results framework.Results
	users := map[string][]string{}
	for _, it := range items {
		if skipped(it) || generated(it) {
			continue
		}
		specPath, ok := podSpecPaths[schema.FromAPIVersionAndKind(it.GetApiVersion(), it.GetKind()).GroupKind()]
		if !ok {
			continue
		}
		if !s.selects(it) {
			continue
		}
		r := &reporter{ref: resourceRef(it), file: fileOf(it)}
		switch v := it.GetAnnotations()[PrefetchAnnotation]; v {
		case "", "true":
		case "false":
			continue
		default:
			r.errorf("metadata.annotations."+PrefetchAnnotation, v, "must be \"true\" or \"false\" (\"false\" leaves the workload's images out)")
			results = append(results, r.results...)
			continue
		}
		name := workloadName(it)
		for _, img := range podImages(r, it, specPath) {
			named, ok := img.parse(r)
			if !ok || !s.wants(named) {
				continue
			}
			ref, user := named.String(), img.user(name)
			if !slices.Contains(users[ref], user) {
				users[ref] = append(users[ref], user)
			}
		}
		results = append(results, r.results...)
	}
	out := make([]workloadImage, 0, len(users))
	for _, ref := range slices.Sorted(maps.Keys(users)) {
		w := users[ref]
		slices.Sort(w)
		out = append(out, workloadImage{ref: ref, workloads: w})
	}
	return out, results
}

// podImage is an image the node pulls for a pod: a container's image or an image volume's
// reference (KEP-4639: the kubelet pulls it through CRI like a container's image).
type podImage struct {
	field, value string
	// volume is the image volume's name; empty for a container's image.
	volume string
}

// user names the workload, and the volume when the image is one, in the list's comment.
func (p podImage) user(workload string) string {
	if p.volume == "" {
		return workload
	}
	return "volume " + p.volume + " of " + workload
}

// parse normalizes the image with the agent's rules (imagelist.Normalize) and returns it
// parsed, for the patterns.
func (p podImage) parse(r *reporter) (reference.Named, bool) {
	if p.value == "" {
		what := "give the container an image"
		if p.volume != "" {
			what = "give the image volume a reference"
		}
		r.errorf(p.field, p.value, "no image: %s, or opt the workload out with %s: \"false\"", what, PrefetchAnnotation)
		return nil, false
	}
	ref, err := imagelist.Normalize(p.value)
	if err != nil {
		r.errorf(p.field, p.value, "invalid image reference: %v", err)
		return nil, false
	}
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		r.errorf(p.field, p.value, "invalid image reference %s: %v", ref, err)
		return nil, false
	}
	return named, true
}

// podImages are the images of the workload's init containers and containers, then of its
// image volumes.
func podImages(r *reporter, it *yaml.RNode, specPath []string) []podImage {
	spec, err := it.Pipe(yaml.Lookup(specPath...))
	prefix := strings.Join(specPath, ".")
	if err != nil {
		r.errorf(prefix, "", "read the pod spec: %v", err)
		return nil
	}
	if spec == nil {
		return nil
	}
	var out []podImage
	for _, list := range containerLists {
		eachMapping(r, spec, prefix+"."+list, list, "container", func(field string, c *yaml.RNode) {
			if v, ok := scalar(r, c, field, "image"); ok {
				out = append(out, podImage{field: field + ".image", value: v})
			}
		})
	}
	eachMapping(r, spec, prefix+".volumes", "volumes", "volume", func(vf string, v *yaml.RNode) {
		src := v.Field("image")
		if src == nil || yaml.IsMissingOrNull(src.Value) {
			return // another kind of volume
		}
		field := vf + ".image"
		if src.Value.YNode().Kind != yaml.MappingNode {
			r.errorf(field, "", "must be an image volume source (a mapping)")
			return
		}
		ref, ok := scalar(r, src.Value, field, "reference")
		if !ok {
			return
		}
		// The API requires a name; without one the comment still says which volume.
		name := vf[strings.LastIndex(vf, ".")+1:]
		if n := v.Field("name"); n != nil && !yaml.IsMissingOrNull(n.Value) && n.Value.YNode().Kind == yaml.ScalarNode && n.Value.YNode().Value != "" {
			name = n.Value.YNode().Value
		}
		out = append(out, podImage{field: field + ".reference", value: ref, volume: name})
	})
	return out
}

// eachMapping calls do with each element of the spec's list key (field is its path) and the
// element's path, in order, after checking it is a mapping; what names an element in the
// errors.
func eachMapping(r *reporter, spec *yaml.RNode, field, key, what string, do func(field string, m *yaml.RNode)) {
	l := spec.Field(key)
	if l == nil || yaml.IsMissingOrNull(l.Value) {
		return
	}
	if l.Value.YNode().Kind != yaml.SequenceNode {
		r.errorf(field, "", "must be a list of %ss", what)
		return
	}
	for i, n := range l.Value.Content() {
		f := fmt.Sprintf("%s[%d]", field, i)
		if n.Kind != yaml.MappingNode {
			r.errorf(f, "", "must be a %s (a mapping)", what)
			continue
		}
		do(f, yaml.NewRNode(n))
	}
}

// scalar is the string value of the mapping's key (field is the mapping's path): empty when
// absent or null, as the API server reads it; false after an error result for another type.
func scalar(r *reporter, m *yaml.RNode, field, key string) (string, bool) {
	f := m.Field(key)
	switch {
	case f == nil || yaml.IsMissingOrNull(f.Value):
		return "", true
	case f.Value.YNode().Kind != yaml.ScalarNode:
		r.errorf(field+"."+key, "", "must be a string")
		return "", false
	default:
		return f.Value.YNode().Value, true
	}
}

// workloadName names a workload in the list's comments: Kind/namespace/name, or Kind/name
// when the manifest gives no namespace.
func workloadName(it *yaml.RNode) string {
	if ns := it.GetNamespace(); ns != "" {
		return it.GetKind() + "/" + ns + "/" + it.GetName()
	}
	return it.GetKind() + "/" + it.GetName()
}

func resourceRef(it *yaml.RNode) *yaml.ResourceIdentifier {
	return &yaml.ResourceIdentifier{
		TypeMeta: yaml.TypeMeta{APIVersion: it.GetApiVersion(), Kind: it.GetKind()},
		NameMeta: yaml.NameMeta{Name: it.GetName(), Namespace: it.GetNamespace()},
	}
}

// fileOf is where the orchestrator read the item from, when it says.
func fileOf(it *yaml.RNode) *framework.File {
	if it == nil {
		return nil
	}
	p, idx, err := kioutil.GetFileAnnotations(it)
	if err != nil || p == "" {
		return nil
	}
	// kpt and kustomize write the index as a decimal; a missing one is the first document.
	i, _ := strconv.Atoi(idx)
	return &framework.File{Path: p, Index: i}
}
