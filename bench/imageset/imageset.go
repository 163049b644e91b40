// Package imageset defines the benchmark's image sets and pushes them: seeded
// random content (a ChaCha8 stream per layer name, fixed file times), so the
// digests are the same on every machine and run, and a set already in the
// registry is not built again.
package imageset

import (
	"bytes"
	"fmt"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/nodeprefetch/image-prefetcher/e2e/testimage"
)

const (
	KiB = 1 << 10
	MiB = 1 << 20
)

// version is part of every tag: bump it when the content definition changes,
// so an old push is never mistaken for the new one.
const version = "v2"

// Layer is one random file of Size bytes, seeded by Seed.
type Layer struct {
	Seed string
	Size int
}

// Image is a repository path and tag (without the registry) and its layers.
type Image struct {
	Path   string // e.g. bench/shared:00-v2
	Layers []Layer
	// Artifact makes the image an OCI artifact, a model as image volumes
	// mount it (testimage.ModelArtifact: its own artifactType, the empty
	// config, the weights and config.json as untarred layers): its one Layer
	// is the weights' seed and size.
	Artifact bool
}

// Set is a named list of images.
type Set struct {
	Name   string
	About  string
	Images []Image
}

// Bytes is the sum of the distinct layers' sizes (what a cold pull fetches).
func (s Set) Bytes() int {
	seen := map[string]bool{}
	n := 0
	for _, im := range s.Images {
		for _, l := range im.Layers {
			if !seen[l.Seed] {
				seen[l.Seed] = true
				n += l.Size
			}
		}
	}
	return n
}

// Refs returns the references of the set's images on registry host.
func (s Set) Refs(host string) []string {
	out := make([]string, len(s.Images))
	for i, im := range s.Images {
		out[i] = host + "/" + im.Path
	}
	return out
}

// Shared is set (a): 20 images of 10 MiB sharing a 5 MiB base layer.
func Shared() Set {
	s := Set{Name: "a-20x10MiB", About: "20 images of 10 MiB, one 5 MiB base layer shared"}
	base := Layer{Seed: "bench-shared-base", Size: 5 * MiB}
	for i := range 20 {
		s.Images = append(s.Images, Image{
			Path:   fmt.Sprintf("bench/shared:%02d-%s", i, version),
			Layers: []Layer{base, {Seed: fmt.Sprintf("bench-shared-%02d", i), Size: 5 * MiB}},
		})
	}
	return s
}

// Large is set (b): 4 images of 60 MiB, four 15 MiB layers each.
func Large() Set {
	s := Set{Name: "b-4x60MiB", About: "4 images of 60 MiB (4 layers of 15 MiB), nothing shared"}
	for i := range 4 {
		im := Image{Path: fmt.Sprintf("bench/large:%d-%s", i, version)}
		for j := range 4 {
			im.Layers = append(im.Layers, Layer{Seed: fmt.Sprintf("bench-large-%d-%d", i, j), Size: 15 * MiB})
		}
		s.Images = append(s.Images, im)
	}
	return s
}

// Big is set (d): one image of 210 MiB, seven 30 MiB layers (a big image for
// a slow link).
func Big() Set {
	s := Set{Name: "d-1x210MiB", About: "one image of 210 MiB (7 layers of 30 MiB)"}
	im := Image{Path: "bench/big:0-" + version}
	for j := range 7 {
		im.Layers = append(im.Layers, Layer{Seed: fmt.Sprintf("bench-big-0-%d", j), Size: 30 * MiB})
	}
	s.Images = append(s.Images, im)
	return s
}

// Model is set (e): one model of size bytes shipped as an OCI artifact
// (testimage.ModelArtifact), as image volumes mount model weights.
func Model(size int) Set {
	s := Set{Name: fmt.Sprintf("e-artifact-%dMiB", size/MiB),
		About: fmt.Sprintf("a model of %d MiB as an OCI artifact: artifactType %s, empty config, weights and config.json as untarred layers", size/MiB, testimage.ModelArtifactType)}
	s.Images = append(s.Images, Image{
		Path:     fmt.Sprintf("bench/model-artifact:%dMiB-%s", size/MiB, version),
		Layers:   []Layer{{Seed: fmt.Sprintf("bench-model-%dMiB", size/MiB), Size: size}},
		Artifact: true,
	})
	return s
}

// Many is the resource set: 100 images of 64 KiB.
func Many() Set {
	s := Set{Name: "c-100x64KiB", About: "100 images of 64 KiB"}
	for i := range 100 {
		s.Images = append(s.Images, Image{
			Path:   fmt.Sprintf("bench/many:%03d-%s", i, version),
			Layers: []Layer{{Seed: fmt.Sprintf("bench-many-%03d", i), Size: 64 * KiB}},
		})
	}
	return s
}

// Push makes every image of s present on registry host (plain HTTP), building
// only those whose tag is missing. It returns how many it pushed.
func Push(host string, s Set) (int, error) {
	layers := map[string]v1.Layer{} // shared layers are built once
	uses := map[string]int{}
	for _, im := range s.Images {
		for _, l := range im.Layers {
			uses[l.Seed]++
		}
	}
	pushed := 0
	for _, im := range s.Images {
		ref, err := name.ParseReference(host+"/"+im.Path, name.Insecure)
		if err != nil {
			return pushed, fmt.Errorf("image %s: %w", im.Path, err)
		}
		if _, err := remote.Head(ref); err == nil {
			continue
		}
		img, err := build(im, layers)
		if err != nil {
			return pushed, fmt.Errorf("build %s: %w", ref, err)
		}
		if err := remote.Write(ref, img); err != nil {
			return pushed, fmt.Errorf("push %s: %w", ref, err)
		}
		pushed++
		for _, l := range im.Layers { // keep only shared layers in memory
			if uses[l.Seed] == 1 {
				delete(layers, l.Seed)
			}
		}
	}
	return pushed, nil
}

// Size is what a cold pull of im from host fetches, as the registry has it:
// the manifest, the config and every layer. For an artifact it is a little
// more than its Layers say (the safetensors header, config.json).
func Size(host string, im Image) (int64, error) {
	ref, err := name.ParseReference(host+"/"+im.Path, name.Insecure)
	if err != nil {
		return 0, fmt.Errorf("image %s: %w", im.Path, err)
	}
	desc, err := remote.Get(ref)
	if err != nil {
		return 0, fmt.Errorf("manifest of %s: %w", ref, err)
	}
	m, err := v1.ParseManifest(bytes.NewReader(desc.Manifest))
	if err != nil {
		return 0, fmt.Errorf("manifest of %s: %w", ref, err)
	}
	n := int64(len(desc.Manifest)) + m.Config.Size
	for _, l := range m.Layers {
		n += l.Size
	}
	return n, nil
}

func build(im Image, cache map[string]v1.Layer) (v1.Image, error) {
	if im.Artifact {
		if len(im.Layers) != 1 {
			return nil, fmt.Errorf("artifact %s: %d layers, want the weights' one", im.Path, len(im.Layers))
		}
		return testimage.ModelArtifact(im.Layers[0].Seed, im.Layers[0].Size)
	}
	layers := make([]v1.Layer, 0, len(im.Layers))
	for _, l := range im.Layers {
		layer, ok := cache[l.Seed]
		if !ok {
			var err error
			if layer, err = testimage.RandomLayer(l.Seed, l.Size); err != nil {
				return nil, err
			}
			cache[l.Seed] = layer
		}
		layers = append(layers, layer)
	}
	return testimage.Image(v1.Config{}, layers...)
}
