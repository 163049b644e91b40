package testimage

import (
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func digestOf(t *testing.T, seed string, size int) v1.Hash {
	t.Helper()
	l, err := RandomLayer(seed, size)
	if err != nil {
		t.Fatal(err)
	}
	d, err := l.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestRandomLayerIsReproducibleAndSeeded(t *testing.T) {
	a1, a2, b := digestOf(t, "a", 4096), digestOf(t, "a", 4096), digestOf(t, "b", 4096)
	if a1 != a2 {
		t.Errorf("same seed, different digests: %s %s", a1, a2)
	}
	if a1 == b {
		t.Errorf("different seeds, same digest %s", a1)
	}
	l, _ := RandomLayer("size", 1<<20)
	if sz, _ := l.Size(); sz < 1<<20 {
		t.Errorf("1 MiB of random data compressed to %d bytes: not random", sz)
	}
}

func TestImageIsReproducible(t *testing.T) {
	build := func() v1.Hash {
		base, err := Layer([]File{{Name: "etc/", Dir: true, Mode: 0o755}, {Name: "etc/hello", Mode: 0o644, Body: []byte("hi")}, {Name: "bin/sh", Link: "busybox", Mode: 0o777}})
		if err != nil {
			t.Fatal(err)
		}
		img, err := Image(v1.Config{Cmd: []string{"/bin/sh"}}, base, mustRandom(t, "x", 1024))
		if err != nil {
			t.Fatal(err)
		}
		d, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	if d1, d2 := build(), build(); d1 != d2 {
		t.Errorf("same definition, different image digests: %s %s", d1, d2)
	}
}

func mustRandom(t *testing.T, seed string, size int) v1.Layer {
	t.Helper()
	l, err := RandomLayer(seed, size)
	if err != nil {
		t.Fatal(err)
	}
	return l
}
