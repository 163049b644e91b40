package fn

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/bundle"
)

// Validate checks the defaulted configuration. It returns framework.Results (nil when there is
// nothing to report); error results make the function fail.
func (c *ImagePrefetcher) Validate() error {
	r := &reporter{ref: c.ref()}
	s := c.Spec
	if c.APIVersion != APIVersion {
		r.errorf("apiVersion", c.APIVersion, "must be %s", APIVersion)
	}
	if c.Kind != Kind {
		r.errorf("kind", c.Kind, "must be %s", Kind)
	}
	name := c.Metadata.Name
	switch {
	case name == "":
		r.errorf("metadata.name", name, "the instance name is required")
	default:
		// The agent's own rule: the name is also the name part of its node label and
		// annotation keys, and an agent refuses to start with a name that breaks it.
		if err := nodelabel.ValidateInstance(name); err != nil {
			r.errorf("metadata.name", name, "%v", err)
		}
	}
	r.messages("spec.namespace", s.Namespace, validation.IsDNS1123Label(s.Namespace))
	if !slices.Contains(bundle.Flavors, s.Flavor) {
		r.errorf("spec.flavor", s.Flavor, "unknown flavor %q: must be one of %s", s.Flavor, strings.Join(bundle.Flavors, ", "))
	}
	components, err := bundle.Components()
	if err != nil {
		return err
	}
	if p := s.CredentialProvider; p != CredentialProviderNone && !slices.Contains(components, p+credentialProviderSuffix) {
		r.errorf("spec.credentialProvider", p, "unknown credential provider %q: must be %s or one of %s", p, CredentialProviderNone, strings.Join(credentialProviders(components), ", "))
	}
	for i, name := range s.Components {
		field := fmt.Sprintf("spec.components[%d]", i)
		if !slices.Contains(components, name) {
			r.errorf(field, name, "unknown component %q: must be one of %s", name, strings.Join(components, ", "))
		}
		if slices.Index(s.Components, name) < i {
			r.errorf(field, name, "component %q is listed twice", name)
		}
		if bundle.Included(s.Flavor, name) {
			r.errorf(field, name, "flavor %s already does what component %q does: leave it out", s.Flavor, name)
		}
	}
	for i, img := range s.Images {
		field := fmt.Sprintf("spec.images[%d]", i)
		if strings.ContainsAny(img, " \t\r\n#") {
			r.errorf(field, img, "an image reference holds no white space and no '#'")
			continue
		}
		ref, err := imagelist.Normalize(img)
		if err != nil {
			r.errorf(field, img, "invalid image reference: %v", err)
			continue
		}
		if s.PinnedImageSet && !strings.Contains(ref, "@") {
			r.errorf(field, img, "spec.pinnedImageSet takes image references by digest only (name@sha256:...): OpenShift pins and pulls exactly that content")
		}
	}
	if s.PinnedImageSet && s.Flavor != bundle.FlavorOCP {
		r.errorf("spec.pinnedImageSet", "true", "a PinnedImageSet is OpenShift's (flavor %s); on containerd nodes use components: [pin-images]", bundle.FlavorOCP)
	}
	if comps := c.components(); slices.Contains(comps, "node-identity") && slices.Contains(comps, "startup-taint") {
		r.errorf("spec.components", "node-identity", "a node may not remove its own taints (NodeRestriction): with node-identity, "+
			"leave spec.startupTaint unset and let the node-readiness-controller remove a readiness.k8s.io/<instance> taint (docs/bundle.md)")
	}
	fileBytes, fileImages := 0, 0
	if s.ImagesFile != "" {
		fileBytes, fileImages = c.validateImagesFile(r)
	}
	// The lists the configuration gives itself, checked here with its other fields; the
	// whole list, with the workloads' images, when it is rendered.
	checkListSize(r, []listPart{{"spec.imagesFile", fileBytes}, {"spec.images", imagesBytes(s.Images)}}, false)
	if s.FromWorkloads != nil {
		s.FromWorkloads.validate(r)
	} else if len(s.Images) == 0 && fileImages == 0 {
		field := "spec.images"
		if s.ImagesFile != "" {
			field = "spec.imagesFile"
		}
		r.warnf(field, s.ImagesFile, "the image list is empty: the agents will label every node succeeded without pulling anything")
	}
	seen := map[string]bool{}
	for i, sec := range s.PullSecrets {
		field := fmt.Sprintf("spec.pullSecrets[%d]", i)
		r.messages(field, sec, validation.IsDNS1123Subdomain(sec))
		if seen[sec] {
			r.errorf(field, sec, "pull secret %q is listed twice", sec)
		}
		seen[sec] = true
	}
	for _, k := range slices.Sorted(maps.Keys(s.Placement.NodeSelector)) {
		v := s.Placement.NodeSelector[k]
		field := "spec.placement.nodeSelector." + k
		r.messages(field, k, validation.IsQualifiedName(k))
		r.messages(field, v, validation.IsValidLabelValue(v))
	}
	for i, t := range s.Placement.Tolerations {
		validateToleration(r, fmt.Sprintf("spec.placement.tolerations[%d]", i), t)
	}
	if pc := s.Placement.PriorityClassName; pc != "" {
		r.messages("spec.placement.priorityClassName", pc, validation.IsDNS1123Subdomain(pc))
	}
	if p := s.MaxParallelPulls; p != nil && *p < 0 {
		r.errorf("spec.maxParallelPulls", fmt.Sprint(*p), "must be 0 (unbounded) or more")
	}
	if p := s.MaxConcurrentNodes; p != nil && *p < 0 {
		r.errorf("spec.maxConcurrentNodes", fmt.Sprint(*p), "must be 0 (unbounded) or more")
	}
	if s.AgentImage != "" {
		if _, err := imagelist.Normalize(s.AgentImage); err != nil {
			r.errorf("spec.agentImage", s.AgentImage, "invalid image reference: %v", err)
		}
	}
	if len(r.results) == 0 {
		return nil
	}
	return r.results
}

// credentialProviders are the spec.credentialProvider values the bundle's components offer.
func credentialProviders(components []string) []string {
	var out []string
	for _, c := range components {
		if p, ok := strings.CutSuffix(c, credentialProviderSuffix); ok {
			out = append(out, p)
		}
	}
	return out
}

func validateToleration(r *reporter, field string, t corev1.Toleration) {
	switch t.Operator {
	case "", corev1.TolerationOpEqual:
		if t.Key == "" {
			r.errorf(field+".operator", string(t.Operator), "a toleration without a key must use operator Exists")
		}
		r.messages(field+".value", t.Value, validation.IsValidLabelValue(t.Value))
	case corev1.TolerationOpExists:
		if t.Value != "" {
			r.errorf(field+".value", t.Value, "must be empty with operator Exists")
		}
	default:
		r.errorf(field+".operator", string(t.Operator), "must be Exists or Equal")
	}
	if t.Key != "" {
		r.messages(field+".key", t.Key, validation.IsQualifiedName(t.Key))
	}
}

// readImagesFile reads spec.imagesFile, a local path (relative, not leaving its directory)
// resolved against the configuration's directory, so a configuration cannot make the function
// read files outside the package. It returns the file's size and its content, of which it
// reads no more than MaxListBytes+1 bytes: a larger file breaks the size rule anyway.
func (c *ImagePrefetcher) readImagesFile() ([]byte, int, error) {
	p := c.Spec.ImagesFile
	if !filepath.IsLocal(p) {
		return nil, 0, fmt.Errorf("%q must be a relative path inside the package (no leading /, no ..)", p)
	}
	if c.dir != "" {
		p = filepath.Join(c.dir, p)
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	if !st.Mode().IsRegular() {
		return nil, 0, fmt.Errorf("%s is not a regular file", p)
	}
	raw, err := io.ReadAll(io.LimitReader(f, MaxListBytes+1))
	if err != nil {
		return nil, 0, fmt.Errorf("read %s: %w", p, err)
	}
	return raw, max(int(st.Size()), len(raw)), nil
}

// fileListBytes is what the file's content adds to the list: itself and a last newline.
func fileListBytes(raw []byte) int {
	if len(raw) > 0 && raw[len(raw)-1] != '\n' {
		return len(raw) + 1
	}
	return len(raw)
}

// validateImagesFile reports the file's unreadable or invalid lines and returns what it adds
// to the list, in bytes, and how many lines it has that are not empty or comments. A file
// that cannot be read counts as one image: what is wrong with it is an error already.
func (c *ImagePrefetcher) validateImagesFile(r *reporter) (size, images int) {
	raw, size, err := c.readImagesFile()
	if err != nil {
		r.errorf("spec.imagesFile", c.Spec.ImagesFile, "read the image list: %v", err)
		return 0, 1
	}
	if size > MaxListBytes {
		// Only its start was read; the size rule reports it.
		return size, 1
	}
	l := imagelist.Parse(bytes.NewReader(raw), c.Spec.ImagesFile)
	for _, le := range l.Errors {
		r.errorf("spec.imagesFile", c.Spec.ImagesFile, "line %d: %q: %v", le.Line, le.Text, le.Err)
	}
	return fileListBytes(raw), len(l.Entries) + len(l.Errors) + len(l.Duplicates)
}

// imageList is the content of the instance's images.txt: the file's lines, then spec.images,
// then (with spec.fromWorkloads) the images of the selected workloads among items that the
// lines before do not list already, one per line with a comment naming the workloads. The
// agent ignores the comments and its list digest with them; the ConfigMap's hash does not.
func (c *ImagePrefetcher) imageList(items []*yaml.RNode) (string, framework.Results, error) {
	var b strings.Builder
	if c.Spec.ImagesFile != "" {
		raw, _, err := c.readImagesFile()
		if err != nil {
			return "", nil, fmt.Errorf("read spec.imagesFile: %w", err)
		}
		b.Write(raw)
		if len(raw) > 0 && raw[len(raw)-1] != '\n' {
			b.WriteByte('\n')
		}
	}
	fileBytes := b.Len()
	for _, img := range c.Spec.Images {
		b.WriteString(img)
		b.WriteByte('\n')
	}
	parts := []listPart{{"spec.imagesFile", fileBytes}, {"spec.images", b.Len() - fileBytes}}
	r := &reporter{ref: c.ref()}
	if c.Spec.FromWorkloads == nil {
		if !checkListSize(r, parts, true) {
			return "", r.results, nil
		}
		return b.String(), r.results, nil
	}
	sel, err := c.Spec.FromWorkloads.compile()
	if err != nil {
		return "", nil, err
	}
	derived, results := sel.workloadImages(items)
	if results.ExitCode() != 0 {
		return "", results, nil
	}
	explicit := b.Len()
	listed := map[string]bool{}
	for _, e := range imagelist.Parse(strings.NewReader(b.String()), "images").Entries {
		listed[e.Ref] = true
	}
	added := 0
	for _, w := range derived {
		if listed[w.ref] {
			continue
		}
		if added == 0 {
			b.WriteString("# The images of the workloads (spec.fromWorkloads), each with the workloads that use it:\n")
		}
		added++
		fmt.Fprintf(&b, "%s  # %s\n", w.ref, strings.Join(w.workloads, ", "))
	}
	if len(listed)+added == 0 {
		r.warnf("spec.fromWorkloads", "", "no image from the workloads in the input and no other image: the agents will label every node succeeded without pulling anything")
	}
	fits := checkListSize(r, append(parts, listPart{"spec.fromWorkloads", b.Len() - explicit}), true)
	results = append(results, r.results...)
	if !fits {
		return "", results, nil
	}
	return b.String(), results, nil
}

func (c *ImagePrefetcher) ref() *yaml.ResourceIdentifier {
	return &yaml.ResourceIdentifier{
		TypeMeta: yaml.TypeMeta{APIVersion: APIVersion, Kind: Kind},
		NameMeta: yaml.NameMeta{Name: c.Metadata.Name},
	}
}

// reporter collects results about the configuration, each with its field path.
type reporter struct {
	ref     *yaml.ResourceIdentifier
	file    *framework.File // where ref was read from, when known
	results framework.Results
}

func (r *reporter) add(sev framework.Severity, field, value, msg string) {
	r.results = append(r.results, &framework.Result{
		Message:     msg,
		Severity:    sev,
		ResourceRef: r.ref,
		Field:       &framework.Field{Path: field, CurrentValue: value},
		File:        r.file,
	})
}

func (r *reporter) errorf(field, value, format string, args ...any) {
	r.add(framework.Error, field, value, fmt.Sprintf(format, args...))
}

func (r *reporter) warnf(field, value, format string, args ...any) {
	r.add(framework.Warning, field, value, fmt.Sprintf(format, args...))
}

// messages reports each of apimachinery's validation messages as an error.
func (r *reporter) messages(field, value string, msgs []string) {
	for _, m := range msgs {
		r.errorf(field, value, "%q: %s", value, m)
	}
}
