package testimage

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"log"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

const modelSize = 1 << 20

// TestModelFiles: the weights are a safetensors file (header length, JSON header naming one
// tensor of the size asked for, then exactly that many bytes), the same for the same seed and
// different for another.
func TestModelFiles(t *testing.T) {
	weights, config, err := ModelFiles("m", modelSize)
	if err != nil {
		t.Fatal(err)
	}
	n := binary.LittleEndian.Uint64(weights)
	if n%8 != 0 || 8+n > uint64(len(weights)) {
		t.Fatalf("header length %d in a file of %d bytes", n, len(weights))
	}
	var header map[string]struct {
		DType       string `json:"dtype"`
		Shape       []int  `json:"shape"`
		DataOffsets []int  `json:"data_offsets"`
	}
	if err := json.Unmarshal(bytes.TrimRight(weights[8:8+n], " "), &header); err != nil {
		t.Fatalf("safetensors header: %v", err)
	}
	if w := header["weights"]; w.DType != "U8" || len(w.DataOffsets) != 2 || w.DataOffsets[1] != modelSize || len(weights)-int(8+n) != modelSize {
		t.Errorf("tensor %+v, %d data bytes; want U8 of %d", w, len(weights)-int(8+n), modelSize)
	}
	if !json.Valid(config) {
		t.Errorf("config.json is not JSON: %s", config)
	}
	again, _, _ := ModelFiles("m", modelSize)
	other, _, _ := ModelFiles("n", modelSize)
	if !bytes.Equal(weights, again) || bytes.Equal(weights, other) {
		t.Errorf("weights not a function of the seed")
	}
}

// TestModelImage: an OCI image with one tar layer holding model/config.json and
// model/weights.safetensors, the same digest on every build.
func TestModelImage(t *testing.T) {
	img, err := ModelImage("m", modelSize)
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.MediaType != types.OCIManifestSchema1 || m.Config.MediaType != types.OCIConfigJSON || len(m.Layers) != 1 || m.Layers[0].MediaType != types.OCILayer {
		t.Errorf("manifest %s, config %s, layers %+v: want an OCI image with one gzip tar layer", m.MediaType, m.Config.MediaType, m.Layers)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	weights, config, err := ModelFiles("m", modelSize)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{"model/": nil, "model/config.json": config, "model/weights.safetensors": weights}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		w, ok := want[h.Name]
		if !ok || !bytes.Equal(body, w) {
			t.Errorf("layer file %s (%d bytes) unexpected", h.Name, len(body))
		}
		delete(want, h.Name)
	}
	if len(want) > 0 {
		t.Errorf("layer lacks %v", want)
	}
	// The tar's digest is pinned: the catalogue's model image must not change unnoticed (the
	// image digest also depends on the architecture and gzip, so it is compared between builds).
	diffID, err := layers[0].DiffID()
	if err != nil {
		t.Fatal(err)
	}
	if want := "sha256:fd0fd883753da1905dd2cd69679635c84bfaa7ecb5a655a9c4fc04ff53d7a1c8"; diffID.String() != want {
		t.Errorf("model layer diffID %s, want %s", diffID, want)
	}
	again, err := ModelImage("m", modelSize)
	if err != nil {
		t.Fatal(err)
	}
	if d1, d2 := mustDigest(t, img), mustDigest(t, again); d1 != d2 {
		t.Errorf("same model, different image digests: %s %s", d1, d2)
	}
}

// TestModelArtifact: an OCI 1.1 artifact: image manifest media type, its own artifactType,
// the empty config descriptor, file layers of non-container media types with their titles,
// blobs that match their descriptors, and a pinned digest.
func TestModelArtifact(t *testing.T) {
	img, err := ModelArtifact("m", modelSize)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	if m.SchemaVersion != 2 || m.MediaType != ocispec.MediaTypeImageManifest || m.ArtifactType != ModelArtifactType {
		t.Errorf("schemaVersion %d, mediaType %q, artifactType %q", m.SchemaVersion, m.MediaType, m.ArtifactType)
	}
	empty := ocispec.DescriptorEmptyJSON
	if m.Config.MediaType != ocispec.MediaTypeEmptyJSON || m.Config.Digest != empty.Digest || m.Config.Size != 2 || string(m.Config.Data) != "{}" {
		t.Errorf("config %+v, want the empty descriptor %+v", m.Config, empty)
	}
	weights, config, err := ModelFiles("m", modelSize)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		mediaType, title string
		body             []byte
	}{{ModelWeightsMediaType, ModelWeightsFile, weights}, {ModelConfigMediaType, ModelConfigFile, config}}
	if len(m.Layers) != len(want) {
		t.Fatalf("layers %+v, want %d", m.Layers, len(want))
	}
	for i, l := range m.Layers {
		if l.MediaType != want[i].mediaType || l.Annotations[ocispec.AnnotationTitle] != want[i].title || l.Size != int64(len(want[i].body)) {
			t.Errorf("layer %d: %+v, want %s titled %s of %d bytes", i, l, want[i].mediaType, want[i].title, len(want[i].body))
		}
		if strings.HasPrefix(l.MediaType, "application/vnd.oci.image.layer.") || strings.HasPrefix(l.MediaType, "application/vnd.docker.image.rootfs.") {
			t.Errorf("layer %d has a container layer media type %s", i, l.MediaType)
		}
		h, err := v1.NewHash(l.Digest.String())
		if err != nil {
			t.Fatal(err)
		}
		blob, err := img.LayerByDigest(h)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := blob.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(body, want[i].body) {
			t.Errorf("blob of layer %d (%v) is not its file", i, err)
		}
	}
	again, err := ModelArtifact("m", modelSize)
	if err != nil {
		t.Fatal(err)
	}
	if d1, d2 := mustDigest(t, img), mustDigest(t, again); d1 != d2 {
		t.Errorf("same model, different artifact digests: %s %s", d1, d2)
	}
	if want := "sha256:6cc4d51945d41d07167b91c41bea2503cbdb5d932ddc7d073a0739cb6b7b760b"; mustDigest(t, img).String() != want {
		t.Errorf("artifact digest %s, want %s", mustDigest(t, img), want)
	}
}

// TestModelPush: both push through remote.Write, as e2e/cmd/testimages pushes, and the
// registry serves the artifact's manifest byte for byte (artifactType kept) under its digest.
func TestModelPush(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	for tag, build := range map[string]func(string, int) (v1.Image, error){"image": ModelImage, "artifact": ModelArtifact} {
		img, err := build("m", modelSize)
		if err != nil {
			t.Fatal(err)
		}
		ref, err := name.ParseReference(u.Host+"/e2e/model:"+tag, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(ref, img); err != nil {
			t.Fatalf("push %s: %v", ref, err)
		}
		got, err := remote.Get(ref)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := img.RawManifest()
		if err != nil {
			t.Fatal(err)
		}
		if got.Digest != mustDigest(t, img) || !bytes.Equal(got.Manifest, raw) {
			t.Errorf("%s: the registry serves %s:\n%s\nwant %s:\n%s", tag, got.Digest, got.Manifest, mustDigest(t, img), raw)
		}
	}
}

func mustDigest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}
