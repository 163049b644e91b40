package flux_test

import (
	"bytes"
	"fmt"
	"path/filepath"
	"testing"

	kustomizev1 "github.com/fluxcd/kustomize-controller/api/v1"
	ssautil "github.com/fluxcd/pkg/ssa/utils"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/flux"
)

// Flux's generator and build give the same objects as bundle.Kustomize, which every golden, the
// KRM function and the e2e tests use as "what Flux builds": each overlay, and each overlay with
// each component, as a user's repository holds them. Needs no cluster.
func TestFluxBuildEqualsBundleBuild(t *testing.T) {
	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	for _, flavor := range bundle.Flavors {
		// a component the flavor already includes cannot be added to it
		comps, err := bundle.FlavorComponents(flavor)
		if err != nil {
			t.Fatal(err)
		}
		for _, comp := range append([]string{""}, comps...) {
			in := bundle.Instance{Flavor: flavor}
			name := flavor
			if comp != "" {
				in.Components = []string{comp}
				name += "+" + comp
			}
			t.Run(name, func(t *testing.T) {
				src := t.TempDir()
				overlay, err := in.Write(root, src)
				if err != nil {
					t.Fatal(err)
				}
				want, err := bundle.Kustomize(overlay)
				if err != nil {
					t.Fatal(err)
				}
				rel, err := filepath.Rel(src, overlay)
				if err != nil {
					t.Fatal(err)
				}
				got, err := flux.Build(&kustomizev1.Kustomization{Spec: kustomizev1.KustomizationSpec{Path: "./" + rel}}, src)
				if err != nil {
					t.Fatal(err)
				}
				if err := sameObjects(got, want); err != nil {
					t.Error(err)
				}
			})
		}
	}
}

// sameObjects compares Flux's objects with a bundle build, object by object.
func sameObjects(got []*unstructured.Unstructured, bundleYAML []byte) error {
	want, err := ssautil.ReadObjects(bytes.NewReader(bundleYAML))
	if err != nil {
		return fmt.Errorf("decode the bundle build: %w", err)
	}
	key := func(u *unstructured.Unstructured) string { return ssautil.FmtUnstructured(u) }
	byKey := map[string]*unstructured.Unstructured{}
	for _, u := range want {
		byKey[key(u)] = u
	}
	if len(got) != len(want) {
		return fmt.Errorf("Flux built %d objects, the bundle %d:\n%s\n---\n%s", len(got), len(want), ssautil.FmtUnstructuredList(got), ssautil.FmtUnstructuredList(want))
	}
	for _, u := range got {
		w, ok := byKey[key(u)]
		if !ok {
			return fmt.Errorf("Flux built %s, the bundle did not", key(u))
		}
		if !equality.Semantic.DeepEqual(u.Object, w.Object) {
			return fmt.Errorf("%s differs:\nFlux:\n%s\nbundle:\n%s", key(u), ssautil.ObjectToYAML(u), ssautil.ObjectToYAML(w))
		}
	}
	return nil
}
