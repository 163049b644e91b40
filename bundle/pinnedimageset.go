package bundle

import (
	"bytes"
	"errors"
	"fmt"
	"path"

	"github.com/distribution/reference"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/kustomize/kyaml/yaml"
	k8syaml "sigs.k8s.io/yaml"

	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
)

// OpenShift's PinnedImageSet (machineconfiguration.openshift.io/v1): the Machine Config Operator
// pulls its images on the nodes of the MachineConfigPools that list it in spec.pinnedImageSets and
// has CRI-O pin them (CRI-O's pinned_images), so the kubelet's image GC keeps them. It is emitted
// from the instance's list, not kept as a manifest under components/: kustomize cannot turn
// images.txt into a YAML list, and a second copy of the list would drift from the first.
const (
	pinnedImageSetAPIVersion = "machineconfiguration.openshift.io/v1"
	pinnedImageSetKind       = "PinnedImageSet"
	// pinnedImageSetFile is the resource added to the instance overlay. The object is named
	// image-prefetcher there; the overlay's replacements give it the cluster-scoped name
	// image-prefetcher.<namespace>.<instance>, like every cluster-scoped object.
	pinnedImageSetFile = "pinnedimageset.yaml"
	// MaxPinnedImages is the PinnedImageSet schema's limit.
	MaxPinnedImages = 500
)

// pinnedImageSet is the manifest of the PinnedImageSet of list (images.txt content, source names
// it in errors). OpenShift accepts digests only (name@sha256:<64 hex>, the tag dropped): any other
// reference, a bad line or a list of more than MaxPinnedImages images is an error naming the line.
func pinnedImageSet(list []byte, source string) ([]byte, error) {
	l := imagelist.Parse(bytes.NewReader(list), source)
	var errs []error
	for _, e := range l.Errors {
		errs = append(errs, &e)
	}
	names := make([]map[string]string, 0, len(l.Entries))
	for _, e := range l.Entries {
		named, err := reference.ParseNormalizedNamed(e.Ref)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s:%d: %q: %w", source, e.Line, e.Text, err))
			continue
		}
		d, ok := named.(reference.Digested)
		if !ok {
			errs = append(errs, fmt.Errorf("%s:%d: %q: a PinnedImageSet takes image references by digest only "+
				"(name@sha256:...): OpenShift pins and pulls exactly that content", source, e.Line, e.Text))
			continue
		}
		byDigest, err := reference.WithDigest(reference.TrimNamed(named), d.Digest())
		if err != nil {
			errs = append(errs, fmt.Errorf("%s:%d: %q: %w", source, e.Line, e.Text, err))
			continue
		}
		names = append(names, map[string]string{"name": byDigest.String()})
	}
	switch {
	case len(l.Entries) > MaxPinnedImages:
		errs = append(errs, fmt.Errorf("%s: %d images: a PinnedImageSet holds at most %d", source, len(l.Entries), MaxPinnedImages))
	case len(l.Entries) == 0 && len(l.Errors) == 0:
		errs = append(errs, fmt.Errorf("%s: no image: a PinnedImageSet needs at least one", source))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("pinned image set: %w", err)
	}
	return k8syaml.Marshal(map[string]any{
		"apiVersion": pinnedImageSetAPIVersion,
		"kind":       pinnedImageSetKind,
		"metadata":   map[string]any{"name": daemonSet},
		"spec":       map[string]any{"pinnedImages": names},
	})
}

// addPinnedImageSet writes the PinnedImageSet of the overlay's list (after in's edits) into the
// overlay and lists it in the overlay's resources k.
func addPinnedImageSet(k *yaml.RNode, fsys filesys.FileSystem, overlay string, list []byte) error {
	manifest, err := pinnedImageSet(list, path.Join("overlays", path.Base(overlay), "images.txt"))
	if err != nil {
		return err
	}
	if err := fsys.WriteFile(path.Join(overlay, pinnedImageSetFile), manifest); err != nil {
		return fmt.Errorf("pinned image set: %w", err)
	}
	if err := k.PipeE(yaml.LookupCreate(yaml.SequenceNode, "resources"), yaml.Append(yaml.NewStringRNode(pinnedImageSetFile).YNode())); err != nil {
		return fmt.Errorf("pinned image set: resources: %w", err)
	}
	return nil
}
