package main

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func testSpec(t *testing.T, binary string) spec {
	t.Helper()
	dir := t.TempDir()
	write := func(name, data string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return spec{
		binaries: map[string]map[string]string{
			"linux/amd64": {"image-prefetcher": write("agent-amd64", binary), "image-prefetcher-fn": write("fn", "fn")},
			"linux/arm64": {"image-prefetcher": write("agent-arm64", binary+"arm")},
		},
		caBundle:  write("ca.crt", "CA"),
		labels:    map[string]string{"org.opencontainers.image.title": "image-prefetcher"},
		createdAt: time.Unix(0, 0).UTC(),
	}
}

func TestSameInputsSameDigest(t *testing.T) {
	t.Parallel()
	a, err := buildIndex(testSpec(t, "agent"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := buildIndex(testSpec(t, "agent")) // other temp paths, same contents
	if err != nil {
		t.Fatal(err)
	}
	c, err := buildIndex(testSpec(t, "agent v2"))
	if err != nil {
		t.Fatal(err)
	}
	da, _ := a.Digest()
	db, _ := b.Digest()
	dc, _ := c.Digest()
	if da != db {
		t.Errorf("same contents, different digests: %s %s", da, db)
	}
	if da == dc {
		t.Errorf("changed binary, same digest %s", da)
	}
}

func TestImageContents(t *testing.T) {
	t.Parallel()
	idx, err := buildIndex(testSpec(t, "agent"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Manifests) != 2 {
		t.Fatalf("%d manifests, want one per platform", len(m.Manifests))
	}
	for _, d := range m.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if d.Platform == nil || cfg.Architecture != d.Platform.Architecture || cfg.OS != "linux" {
			t.Errorf("platform %+v, config %s/%s", d.Platform, cfg.OS, cfg.Architecture)
		}
		if len(cfg.Config.Entrypoint) != 1 || cfg.Config.Entrypoint[0] != entrypoint || cfg.Config.User != user {
			t.Errorf("entrypoint %v user %q", cfg.Config.Entrypoint, cfg.Config.User)
		}
		layers, err := img.Layers()
		if err != nil || len(layers) != 1 {
			t.Fatalf("layers %d: %v", len(layers), err)
		}
		rc, err := layers[0].Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		files := map[string]int64{}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if !h.ModTime.Equal(time.Unix(0, 0)) || h.Uid != 0 {
				t.Errorf("%s: mtime %v uid %d, want fixed", h.Name, h.ModTime, h.Uid)
			}
			files[h.Name] = h.Mode
		}
		rc.Close()
		for _, want := range []string{"usr/local/bin/image-prefetcher", "etc/passwd", "etc/ssl/certs/ca-certificates.crt"} {
			if _, ok := files[want]; !ok {
				t.Errorf("%s: no %s in %v", d.Platform.Architecture, want, files)
			}
		}
		if files["usr/local/bin/image-prefetcher"] != 0o755 {
			t.Errorf("agent mode %o", files["usr/local/bin/image-prefetcher"])
		}
	}
}

func TestMissingAgentFails(t *testing.T) {
	t.Parallel()
	s := testSpec(t, "agent")
	delete(s.binaries["linux/arm64"], "image-prefetcher")
	if _, err := buildIndex(s); err == nil {
		t.Error("an image without the agent was built")
	}
}
