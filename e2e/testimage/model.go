package testimage

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Model test content: what image volumes (KEP-4639) mount, model weights and their
// configuration, once as an ordinary image and once as an OCI artifact.
const (
	// ModelDir is the directory of the model image's files.
	ModelDir = "model"
	// ModelWeightsFile and ModelConfigFile are the names of the model's two files, in the
	// image under ModelDir and in the artifact as the layers' titles.
	ModelWeightsFile = "weights.safetensors"
	ModelConfigFile  = "config.json"

	// ModelArtifactType is the artifact's artifactType: what the artifact is, for tools that
	// list or filter artifacts (OCI image spec 1.1).
	ModelArtifactType = "application/vnd.example.model.v1"
	// ModelWeightsMediaType and ModelConfigMediaType are the artifact's layer media types:
	// plain files, not container layers, so nothing may unpack them as a tar.
	ModelWeightsMediaType = "application/vnd.example.model.safetensors.v1"
	ModelConfigMediaType  = "application/vnd.example.model.config.v1+json"
)

// ModelFiles are the model's weights, a safetensors file holding one tensor of size bytes
// from a ChaCha8 stream seeded by seed, and its config.json naming the seed.
func ModelFiles(seed string, size int) (weights, config []byte, err error) {
	// safetensors: a little-endian uint64 header length, a JSON header (padded with spaces
	// to 8 bytes), then the tensors' bytes.
	header, err := json.Marshal(map[string]any{
		"weights":      map[string]any{"dtype": "U8", "shape": []int{size}, "data_offsets": []int{0, size}},
		"__metadata__": map[string]string{"seed": seed},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("safetensors header: %w", err)
	}
	if pad := len(header) % 8; pad != 0 {
		header = append(header, bytes.Repeat([]byte(" "), 8-pad)...)
	}
	var w bytes.Buffer
	w.Grow(8 + len(header) + size)
	if err := binary.Write(&w, binary.LittleEndian, uint64(len(header))); err != nil {
		return nil, nil, err
	}
	w.Write(header)
	if _, err := io.CopyN(&w, rand.NewChaCha8(sha256.Sum256([]byte(seed))), int64(size)); err != nil {
		return nil, nil, fmt.Errorf("weights of %s: %w", seed, err)
	}
	config, err = json.MarshalIndent(map[string]any{"model_type": "example", "seed": seed, "weights": ModelWeightsFile, "bytes": size}, "", "  ")
	if err != nil {
		return nil, nil, fmt.Errorf("model config: %w", err)
	}
	return w.Bytes(), append(config, '\n'), nil
}

// ModelImage is an OCI image (one tar layer, no command) holding the model of ModelFiles
// under /model: what a pod mounts as an image volume today, on every runtime.
func ModelImage(seed string, size int) (v1.Image, error) {
	weights, config, err := ModelFiles(seed, size)
	if err != nil {
		return nil, err
	}
	layer, err := Layer([]File{
		{Name: ModelDir + "/", Dir: true, Mode: 0o755},
		{Name: ModelDir + "/" + ModelConfigFile, Mode: 0o644, Body: config},
		{Name: ModelDir + "/" + ModelWeightsFile, Mode: 0o644, Body: weights},
	})
	if err != nil {
		return nil, fmt.Errorf("model layer: %w", err)
	}
	return Image(v1.Config{}, layer)
}

// ModelArtifact is the model of ModelFiles as an OCI artifact: artifactType
// ModelArtifactType, the empty config descriptor the image spec (1.1) asks artifacts without
// a config to use, and each file as a layer of its own media type, titled with its name.
func ModelArtifact(seed string, size int) (v1.Image, error) {
	weights, config, err := ModelFiles(seed, size)
	if err != nil {
		return nil, err
	}
	a := &artifact{blobs: map[v1.Hash]v1.Layer{}}
	m := ocispec.Manifest{
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: ModelArtifactType,
		Config:       ocispec.DescriptorEmptyJSON,
		Layers:       []ocispec.Descriptor{},
	}
	m.SchemaVersion = 2
	for _, f := range []struct {
		name, mediaType string
		body            []byte
	}{{ModelWeightsFile, ModelWeightsMediaType, weights}, {ModelConfigFile, ModelConfigMediaType, config}} {
		l := static.NewLayer(f.body, types.MediaType(f.mediaType))
		h, err := l.Digest()
		if err != nil {
			return nil, fmt.Errorf("digest of %s: %w", f.name, err)
		}
		a.blobs[h] = l
		m.Layers = append(m.Layers, ocispec.Descriptor{
			MediaType:   f.mediaType,
			Digest:      digest.Digest(h.String()),
			Size:        int64(len(f.body)),
			Annotations: map[string]string{ocispec.AnnotationTitle: f.name},
		})
	}
	if a.manifest, err = json.Marshal(m); err != nil {
		return nil, fmt.Errorf("artifact manifest: %w", err)
	}
	return partial.CompressedToImage(a)
}

// artifact is the minimal image core go-containerregistry builds a v1.Image from (for
// remote.Write), over a manifest it cannot express itself: v1.Manifest has no artifactType.
type artifact struct {
	manifest []byte
	blobs    map[v1.Hash]v1.Layer
}

var _ partial.CompressedImageCore = (*artifact)(nil)

// RawConfigFile is the empty config's content, "{}".
func (a *artifact) RawConfigFile() ([]byte, error) { return ocispec.DescriptorEmptyJSON.Data, nil }

func (a *artifact) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

func (a *artifact) RawManifest() ([]byte, error) { return a.manifest, nil }

func (a *artifact) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	if l, ok := a.blobs[h]; ok {
		return l, nil
	}
	if h.String() == ocispec.DescriptorEmptyJSON.Digest.String() {
		return static.NewLayer(ocispec.DescriptorEmptyJSON.Data, ocispec.MediaTypeEmptyJSON), nil
	}
	return nil, fmt.Errorf("artifact has no blob %s", h)
}
