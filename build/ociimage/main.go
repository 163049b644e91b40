// Command ociimage builds the image-prefetcher container image without a Docker engine: the
// same contents as the Dockerfile (static binaries in /usr/local/bin, /etc/passwd, CA
// certificates, entrypoint, nonroot user), as an OCI index with one image per platform. It
// writes an OCI layout tarball or pushes to a registry.
//
//	ociimage -bin-dir _output/bin -platform linux/amd64 -push 127.0.0.1:5000/image-prefetcher:dev
//
// Binaries are taken from <bin-dir>/<os>_<arch>/: every file there goes to /usr/local/bin.
package main

import (
	"archive/tar"
	"context"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "ociimage:", err)
		os.Exit(1)
	}
}

func run() error {
	var platforms, labels listFlag
	binDir := flag.String("bin-dir", "_output/bin", "directory holding <os>_<arch>/ with the binaries")
	caBundle := flag.String("ca-bundle", "/etc/ssl/certs/ca-certificates.crt", "CA certificates to ship (credential provider plugins call cloud APIs over TLS)")
	out := flag.String("layout", "", "write an OCI layout tarball to this file")
	push := flag.String("push", "", "push to this reference, e.g. 127.0.0.1:5000/image-prefetcher:dev")
	insecure := flag.Bool("insecure", false, "allow plain HTTP to the registry (loopback registries are plain HTTP anyway)")
	flag.Var(&platforms, "platform", "os/arch to include (repeatable; default linux/amd64)")
	flag.Var(&labels, "label", "image label key=value (repeatable)")
	flag.Parse()
	if (*out == "") == (*push == "") {
		return fmt.Errorf("give exactly one of -layout and -push")
	}
	if len(platforms) == 0 {
		platforms = listFlag{"linux/amd64"}
	}
	s := spec{binaries: map[string]map[string]string{}, caBundle: *caBundle, labels: map[string]string{}, createdAt: time.Unix(0, 0).UTC()}
	// SOURCE_DATE_EPOCH: the reproducible-builds convention for a fixed timestamp.
	if epoch := os.Getenv("SOURCE_DATE_EPOCH"); epoch != "" {
		sec, err := strconv.ParseInt(epoch, 10, 64)
		if err != nil {
			return fmt.Errorf("SOURCE_DATE_EPOCH: %w", err)
		}
		s.createdAt = time.Unix(sec, 0).UTC()
	}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return fmt.Errorf("label %q: want key=value", l)
		}
		s.labels[k] = v
	}
	for _, p := range platforms {
		dir := filepath.Join(*binDir, strings.ReplaceAll(p, "/", "_"))
		entries, err := os.ReadDir(dir)
		if err != nil {
			return fmt.Errorf("platform %s: %w", p, err)
		}
		s.binaries[p] = map[string]string{}
		for _, e := range entries {
			if e.Type().IsRegular() {
				s.binaries[p][e.Name()] = filepath.Join(dir, e.Name())
			}
		}
	}
	idx, err := buildIndex(s)
	if err != nil {
		return err
	}
	digest, err := idx.Digest()
	if err != nil {
		return fmt.Errorf("index digest: %w", err)
	}
	if *out != "" {
		if err := writeLayoutTar(idx, *out); err != nil {
			return err
		}
		fmt.Printf("%s@%s\n", *out, digest)
		return nil
	}
	var opts []name.Option
	if *insecure {
		opts = append(opts, name.Insecure)
	}
	ref, err := name.ParseReference(*push, opts...)
	if err != nil {
		return fmt.Errorf("parse %s: %w", *push, err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := remote.WriteIndex(ref, idx, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	fmt.Printf("%s@%s\n", ref.Context(), digest)
	return nil
}

// writeLayoutTar writes an OCI image layout into a tarball, entries sorted and times fixed.
func writeLayoutTar(idx v1.ImageIndex, path string) error {
	dir, err := os.MkdirTemp("", "ociimage-layout-")
	if err != nil {
		return fmt.Errorf("layout dir: %w", err)
	}
	defer os.RemoveAll(dir)
	if _, err := layout.Write(dir, idx); err != nil {
		return fmt.Errorf("write layout: %w", err)
	}
	var paths []string
	if err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && p != dir {
			paths = append(paths, p)
		}
		return err
	}); err != nil {
		return fmt.Errorf("walk layout: %w", err)
	}
	sort.Strings(paths)
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	tw := tar.NewWriter(f)
	for _, p := range paths {
		rel, _ := filepath.Rel(dir, p)
		st, err := os.Stat(p)
		if err != nil {
			f.Close()
			return err
		}
		hdr := &tar.Header{Name: filepath.ToSlash(rel), Mode: 0o644, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		if st.IsDir() {
			hdr.Typeflag, hdr.Name, hdr.Mode = tar.TypeDir, hdr.Name+"/", 0o755
		} else {
			hdr.Typeflag, hdr.Size = tar.TypeReg, st.Size()
		}
		if err := tw.WriteHeader(hdr); err != nil {
			f.Close()
			return fmt.Errorf("tar %s: %w", rel, err)
		}
		if !st.IsDir() {
			data, err := os.ReadFile(p)
			if err != nil {
				f.Close()
				return err
			}
			if _, err := tw.Write(data); err != nil {
				f.Close()
				return fmt.Errorf("tar %s: %w", rel, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		f.Close()
		return fmt.Errorf("close tar: %w", err)
	}
	return f.Close()
}
