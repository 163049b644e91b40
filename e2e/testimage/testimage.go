// Package testimage builds reproducible OCI images for tests and benchmarks
// without Docker: fixed file times and content from a PRNG seeded by a name,
// so the same definition gives the same digests on every machine and run, and
// a second push finds everything already in the registry.
package testimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Epoch is the modification time of every file and the creation time of every image.
var Epoch = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// CatalogueEntry is one image of the catalogue (JSON) that e2e/cmd/testimages
// writes and e2e/clusterenv reads: one definition for both sides.
type CatalogueEntry struct {
	// Ref is the tagged reference, e.g. 127.0.0.1:5000/e2e/random:4mib.
	Ref string `json:"ref"`
	// DigestRef is Ref's repository with the manifest digest (repo@sha256:...).
	DigestRef string `json:"digestRef"`
	Digest    string `json:"digest"`
	// Private images are only on the auth registry.
	Private bool `json:"private"`
	// Runnable images have busybox and a default command.
	Runnable bool `json:"runnable"`
	// ArtifactType is set for an OCI artifact (not an image): its manifest's artifactType.
	ArtifactType string `json:"artifactType,omitempty"`
	// LayersBytes is the sum of the compressed layer sizes (an artifact's blobs).
	LayersBytes int64    `json:"layersBytes"`
	Layers      []string `json:"layers"`
	Description string   `json:"description"`
}

// File is one entry of a layer: a regular file (Body), a directory (Dir) or a symlink (Link).
type File struct {
	Name, Link string
	Dir        bool
	Mode       int64
	Body       []byte
}

// Layer packs files into a gzip layer held in memory.
func Layer(files []File) (v1.Layer, error) {
	return gzipLayer(func(tw *tar.Writer) error {
		for _, f := range files {
			h := &tar.Header{Name: f.Name, Mode: f.Mode, ModTime: Epoch, Format: tar.FormatPAX}
			switch {
			case f.Dir:
				h.Typeflag = tar.TypeDir
			case f.Link != "":
				h.Typeflag, h.Linkname = tar.TypeSymlink, f.Link
			default:
				h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Body))
			}
			if err := tw.WriteHeader(h); err != nil {
				return fmt.Errorf("tar header %s: %w", f.Name, err)
			}
			if _, err := tw.Write(f.Body); err != nil {
				return fmt.Errorf("tar body %s: %w", f.Name, err)
			}
		}
		return nil
	})
}

// RandomLayer is a layer with one file, data/<seed>.bin, of size bytes from a
// ChaCha8 stream seeded by seed. Random bytes do not compress, so the blob is
// as large as the file.
func RandomLayer(seed string, size int) (v1.Layer, error) {
	return gzipLayer(func(tw *tar.Writer) error {
		name := "data/" + seed + ".bin"
		h := &tar.Header{Name: name, Mode: 0o644, Size: int64(size), ModTime: Epoch, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("tar header %s: %w", name, err)
		}
		rng := rand.NewChaCha8(sha256.Sum256([]byte(seed)))
		if _, err := io.CopyN(tw, rng, int64(size)); err != nil {
			return fmt.Errorf("tar body %s: %w", name, err)
		}
		return nil
	})
}

// gzipLayer compresses once, here, instead of on every read of the layer.
// BestSpeed: the content is mostly random and would not shrink anyway.
func gzipLayer(write func(*tar.Writer) error) (v1.Layer, error) {
	var gz bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(zw)
	if err := write(tw); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close tar: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("close gzip: %w", err)
	}
	blob := gz.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(blob)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

// Image is an OCI image for linux on this machine's architecture with the
// layers in order and cfg as its runtime config.
func Image(cfg v1.Config, layers ...v1.Layer) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		return nil, fmt.Errorf("append layers: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Created = v1.Time{Time: Epoch}
	cf.Config = cfg
	return mutate.ConfigFile(img, cf)
}
