package imageset

import (
	"encoding/json"
	"io"
	"log"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nodeprefetch/image-prefetcher/e2e/testimage"
)

// TestModelPushesAnArtifact: the model set is pushed as the OCI artifact
// image volumes mount (artifactType, empty config, file layers), once; Size
// counts its manifest, config and layers.
func TestModelPushesAnArtifact(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	s := Model(MiB)
	if n, err := Push(u.Host, s); err != nil || n != 1 {
		t.Fatalf("first push: %d pushed, %v; want 1", n, err)
	}
	if n, err := Push(u.Host, s); err != nil || n != 0 {
		t.Fatalf("second push: %d pushed, %v; want 0 (already there)", n, err)
	}
	ref, err := name.ParseReference(s.Refs(u.Host)[0], name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Get(ref)
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(desc.Manifest, &m); err != nil {
		t.Fatal(err)
	}
	if m.ArtifactType != testimage.ModelArtifactType || m.Config.MediaType != ocispec.MediaTypeEmptyJSON || len(m.Layers) != 2 ||
		m.Layers[0].MediaType != testimage.ModelWeightsMediaType {
		t.Errorf("manifest %s: want the model artifact", desc.Manifest)
	}
	want := int64(len(desc.Manifest)) + m.Config.Size + m.Layers[0].Size + m.Layers[1].Size
	got, err := Size(u.Host, s.Images[0])
	if err != nil {
		t.Fatal(err)
	}
	if got != want || got <= int64(s.Bytes()) {
		t.Errorf("Size %d, want %d (more than the weights' %d)", got, want, s.Bytes())
	}
}
