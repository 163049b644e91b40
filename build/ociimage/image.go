package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The same contents as the Dockerfile's final stage.
const (
	binDir     = "/usr/local/bin"
	entrypoint = binDir + "/image-prefetcher"
	caPath     = "/etc/ssl/certs/ca-certificates.crt"
	// The image runs as nonroot by default (the KRM function needs nothing more); the
	// DaemonSet asks for uid 0 only because CRI sockets are root-only.
	user = "65532:65532"
)

const passwd = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
const group = "root:x:0:\nnonroot:x:65532:\n"

// spec is what goes into the image.
type spec struct {
	// binaries per platform ("linux/amd64"): file name -> path on the build machine.
	binaries  map[string]map[string]string
	caBundle  string
	labels    map[string]string
	createdAt time.Time
}

type file struct {
	path string
	mode int64
	data []byte
}

// buildIndex assembles one image per platform under an OCI index. Everything is fixed but the
// file contents, so unchanged binaries give the same digests.
func buildIndex(s spec) (v1.ImageIndex, error) {
	ca, err := os.ReadFile(s.caBundle)
	if err != nil {
		return nil, fmt.Errorf("read CA bundle: %w", err)
	}
	platforms := make([]string, 0, len(s.binaries))
	for p := range s.binaries {
		platforms = append(platforms, p)
	}
	sort.Strings(platforms)
	var idx v1.ImageIndex = mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range platforms {
		osName, arch, ok := strings.Cut(p, "/")
		if !ok {
			return nil, fmt.Errorf("platform %q: want os/arch", p)
		}
		bins := s.binaries[p]
		if _, ok := bins[filepath.Base(entrypoint)]; !ok {
			return nil, fmt.Errorf("platform %s: no %s binary", p, filepath.Base(entrypoint))
		}
		files := []file{
			{path: "/etc/passwd", mode: 0o644, data: []byte(passwd)},
			{path: "/etc/group", mode: 0o644, data: []byte(group)},
			{path: caPath, mode: 0o644, data: ca},
		}
		for name, src := range bins {
			data, err := os.ReadFile(src)
			if err != nil {
				return nil, fmt.Errorf("platform %s: read %s: %w", p, src, err)
			}
			files = append(files, file{path: binDir + "/" + name, mode: 0o755, data: data})
		}
		layerTar, err := tarFiles(files, s.createdAt)
		if err != nil {
			return nil, err
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(layerTar)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return nil, fmt.Errorf("platform %s: layer: %w", p, err)
		}
		base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
		img, err := mutate.Append(base, mutate.Addendum{Layer: layer, History: v1.History{
			CreatedBy: "image-prefetcher build/ociimage", Created: v1.Time{Time: s.createdAt},
		}})
		if err != nil {
			return nil, fmt.Errorf("platform %s: append layer: %w", p, err)
		}
		cfg, err := img.ConfigFile()
		if err != nil {
			return nil, fmt.Errorf("platform %s: config: %w", p, err)
		}
		cfg = cfg.DeepCopy()
		cfg.OS, cfg.Architecture = osName, arch
		cfg.Config.Entrypoint = []string{entrypoint}
		cfg.Config.User = user
		cfg.Config.Env = []string{"PATH=" + binDir + ":/usr/bin:/bin"}
		cfg.Config.Labels = s.labels
		img, err = mutate.ConfigFile(img, cfg)
		if err != nil {
			return nil, fmt.Errorf("platform %s: set config: %w", p, err)
		}
		img, err = mutate.CreatedAt(img, v1.Time{Time: s.createdAt})
		if err != nil {
			return nil, fmt.Errorf("platform %s: created: %w", p, err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: osName, Architecture: arch},
		}})
	}
	return idx, nil
}

// tarFiles writes files and their parent directories in sorted order with fixed owners and times.
func tarFiles(files []file, mtime time.Time) ([]byte, error) {
	dirs := map[string]bool{}
	for _, f := range files {
		for d := filepath.Dir(f.path); d != "/"; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	type entry struct {
		hdr  *tar.Header
		data []byte
	}
	var entries []entry
	for d := range dirs {
		entries = append(entries, entry{hdr: &tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(d, "/") + "/", Mode: 0o755, ModTime: mtime}})
	}
	for _, f := range files {
		entries = append(entries, entry{hdr: &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(f.path, "/"), Mode: f.mode, Size: int64(len(f.data)), ModTime: mtime}, data: f.data})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].hdr.Name < entries[j].hdr.Name })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		e.hdr.Format = tar.FormatPAX
		e.hdr.Uname, e.hdr.Gname = "root", "root"
		if err := tw.WriteHeader(e.hdr); err != nil {
			return nil, fmt.Errorf("tar %s: %w", e.hdr.Name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, fmt.Errorf("tar %s: %w", e.hdr.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("tar: %w", err)
	}
	return buf.Bytes(), nil
}
