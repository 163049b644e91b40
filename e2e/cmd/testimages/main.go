// Command testimages builds the e2e test images without Docker and pushes them to the local test registries.
//
// Every image is built from seeded, deterministic content (fixed file times, a PRNG seeded by the image name),
// so the digests are the same on every run and a second run pushes nothing. The catalogue of what was pushed,
// with digests and sizes, is written as JSON for the tests (see e2e/README.md for the list).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"sort"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/nodeprefetch/image-prefetcher/e2e/testimage"
)

const mib = 1 << 20

type spec struct {
	repo, tag   string
	private     bool
	runnable    bool
	layers      []v1.Layer
	config      v1.Config
	description string
	// image, when set, is the whole image (or artifact) instead of layers and config.
	image v1.Image
	// artifactType is the artifact's, for the catalogue.
	artifactType string
}

func main() {
	registry := flag.String("registry", "127.0.0.1:5000", "plain registry (host:port)")
	authRegistry := flag.String("auth-registry", "127.0.0.1:5001", "registry with basic auth (host:port)")
	authUser := flag.String("auth-user", "e2e", "user on the auth registry")
	authPasswordFile := flag.String("auth-password-file", "", "file holding the auth registry's password")
	busybox := flag.String("busybox", "/bin/busybox", "statically linked busybox binary to pack into the runnable images")
	out := flag.String("out", "images.json", "where to write the catalogue of pushed images")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("testimages: ")

	password, err := os.ReadFile(*authPasswordFile)
	if err != nil {
		log.Fatalf("read auth password: %v", err)
	}
	auth := &authn.Basic{Username: *authUser, Password: strings.TrimSpace(string(password))}

	specs, err := catalogue(*busybox)
	if err != nil {
		log.Fatal(err)
	}
	var images []testimage.CatalogueEntry
	pushed := 0
	for _, s := range specs {
		host, opts := *registry, []remote.Option{remote.WithAuth(authn.Anonymous)}
		if s.private {
			host, opts = *authRegistry, []remote.Option{remote.WithAuth(auth)}
		}
		img, changed, err := push(host, s, opts)
		if err != nil {
			log.Fatal(err)
		}
		if changed {
			pushed++
		}
		images = append(images, img)
	}
	data, err := json.MarshalIndent(images, "", "  ")
	if err != nil {
		log.Fatal(err)
	}
	if err := os.WriteFile(*out, append(data, '\n'), 0o644); err != nil {
		log.Fatalf("write catalogue: %v", err)
	}
	log.Printf("%d images, %d pushed, %d already up to date; catalogue in %s", len(images), pushed, len(images)-pushed, *out)
}

// catalogue lists every test image. Names and tags are a contract with the tests and e2e/README.md.
func catalogue(busyboxPath string) ([]spec, error) {
	bb, err := busyboxLayer(busyboxPath)
	if err != nil {
		return nil, err
	}
	shell := v1.Config{Env: []string{"PATH=/bin"}, Cmd: []string{"/bin/sh"}}
	specs := []spec{
		{repo: "e2e/busybox", tag: "latest", runnable: true, layers: []v1.Layer{bb}, config: shell,
			description: "Debian's busybox-static; runs /bin/sh"},
		// The sandbox ("pause") image containerd starts for every pod: sleep forever; containerd stops
		// sandboxes with SIGKILL, so no signal handling is needed.
		{repo: "e2e/pause", tag: "latest", runnable: true, layers: []v1.Layer{bb},
			config:      v1.Config{Env: []string{"PATH=/bin"}, Entrypoint: []string{"/bin/sleep"}, Cmd: []string{"inf"}},
			description: "pod sandbox image (busybox sleep inf)"},
	}
	for _, size := range []int{4, 8, 12, 16, 20} {
		tag := fmt.Sprintf("%dmib", size)
		specs = append(specs, spec{repo: "e2e/random", tag: tag, layers: []v1.Layer{randomLayer("random-"+tag, size*mib)},
			description: fmt.Sprintf("one layer of %d MiB seeded random data (not runnable)", size)})
	}
	for i := 0; i < 20; i++ {
		tag := fmt.Sprintf("%02d", i)
		specs = append(specs, spec{repo: "e2e/small", tag: tag, layers: []v1.Layer{randomLayer("small-"+tag, 256<<10)},
			description: "one layer of 256 KiB seeded random data, for long lists"})
	}
	base := randomLayer("family-base", 10*mib)
	for _, member := range []string{"a", "b", "c"} {
		specs = append(specs, spec{repo: "e2e/family", tag: member, runnable: true,
			layers: []v1.Layer{bb, base, randomLayer("family-"+member, 1*mib)}, config: shell,
			description: "busybox + a shared 10 MiB base layer + its own 1 MiB layer"})
	}
	specs = append(specs, spec{repo: "e2e/private", tag: "latest", private: true, runnable: true,
		layers: []v1.Layer{bb, randomLayer("private", 3*mib)}, config: shell,
		description: "only on the auth registry: busybox + 3 MiB"})
	// Reserved for the harness' own smoke tests (e2e/cluster_test.go), which remove and pull them: other
	// tests running at the same time never see their images disappear.
	specs = append(specs,
		spec{repo: "e2e/smoke", tag: "latest", layers: []v1.Layer{randomLayer("smoke", 1*mib)},
			description: "reserved for the harness smoke test: 1 MiB"},
		spec{repo: "e2e/private", tag: "smoke", private: true, layers: []v1.Layer{randomLayer("private-smoke", 1*mib)},
			description: "reserved for the harness smoke test: only on the auth registry, 1 MiB"})
	models, err := modelSpecs()
	if err != nil {
		return nil, err
	}
	return append(specs, models...), nil
}

// modelSpecs are what image volumes mount: one model (4 MiB of weights and a config.json) as
// an image and as an OCI artifact.
func modelSpecs() ([]spec, error) {
	model, err := testimage.ModelImage("model", 4*mib)
	if err != nil {
		return nil, fmt.Errorf("model image: %w", err)
	}
	artifact, err := testimage.ModelArtifact("model", 4*mib)
	if err != nil {
		return nil, fmt.Errorf("model artifact: %w", err)
	}
	return []spec{
		{repo: "e2e/model", tag: "image", image: model,
			description: "an image volume's image: /model/weights.safetensors (4 MiB) and /model/config.json (not runnable)"},
		{repo: "e2e/model", tag: "artifact", image: artifact, artifactType: testimage.ModelArtifactType,
			description: "the same model as an OCI artifact: empty config, a safetensors and a config layer (no tar)"},
	}, nil
}

func push(host string, s spec, opts []remote.Option) (testimage.CatalogueEntry, bool, error) {
	refText := fmt.Sprintf("%s/%s:%s", host, s.repo, s.tag)
	ref, err := name.ParseReference(refText, name.Insecure)
	if err != nil {
		return testimage.CatalogueEntry{}, false, fmt.Errorf("parse %s: %w", refText, err)
	}
	img := s.image
	if img == nil {
		if img, err = testimage.Image(s.config, s.layers...); err != nil {
			return testimage.CatalogueEntry{}, false, fmt.Errorf("build %s: %w", refText, err)
		}
	}
	layers, err := img.Layers()
	if err != nil {
		return testimage.CatalogueEntry{}, false, fmt.Errorf("layers %s: %w", refText, err)
	}
	digest, err := img.Digest()
	if err != nil {
		return testimage.CatalogueEntry{}, false, fmt.Errorf("digest %s: %w", refText, err)
	}
	entry := testimage.CatalogueEntry{Ref: refText, DigestRef: fmt.Sprintf("%s/%s@%s", host, s.repo, digest), Digest: digest.String(),
		Private: s.private, Runnable: s.runnable, ArtifactType: s.artifactType, Description: s.description}
	for _, l := range layers {
		size, err := l.Size()
		if err != nil {
			return testimage.CatalogueEntry{}, false, fmt.Errorf("layer size %s: %w", refText, err)
		}
		d, err := l.Digest()
		if err != nil {
			return testimage.CatalogueEntry{}, false, fmt.Errorf("layer digest %s: %w", refText, err)
		}
		entry.LayersBytes += size
		entry.Layers = append(entry.Layers, d.String())
	}
	// Deterministic content: when the tag already names this digest there is nothing to push.
	if desc, err := remote.Head(ref, opts...); err == nil && desc.Digest == digest {
		return entry, false, nil
	}
	if err := remote.Write(ref, img, opts...); err != nil {
		return testimage.CatalogueEntry{}, false, fmt.Errorf("push %s: %w", refText, err)
	}
	log.Printf("pushed %s (%s)", refText, digest)
	return entry, true, nil
}

// randomLayer is testimage.RandomLayer for a catalogue literal: building in
// memory cannot fail but for a bug.
func randomLayer(seed string, size int) v1.Layer {
	l, err := testimage.RandomLayer(seed, size)
	if err != nil {
		panic(err)
	}
	return l
}

// busyboxLayer packs a static busybox with a symlink per applet, /etc/passwd and /tmp.
func busyboxLayer(path string) (v1.Layer, error) {
	body, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read busybox (install Debian's busybox-static): %w", err)
	}
	listing, err := exec.Command(path, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", path, err)
	}
	applets := strings.Fields(string(listing))
	sort.Strings(applets)
	files := []testimage.File{
		{Name: "bin/", Dir: true, Mode: 0o755},
		{Name: "bin/busybox", Mode: 0o755, Body: body},
		{Name: "etc/", Dir: true, Mode: 0o755},
		{Name: "etc/passwd", Mode: 0o644, Body: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")},
		{Name: "etc/group", Mode: 0o644, Body: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{Name: "tmp/", Dir: true, Mode: 0o1777},
		{Name: "root/", Dir: true, Mode: 0o700},
	}
	for _, a := range applets {
		if a != "busybox" && !strings.Contains(a, "/") {
			files = append(files, testimage.File{Name: "bin/" + a, Link: "busybox", Mode: 0o777})
		}
	}
	return testimage.Layer(files)
}
