package credentials

import (
	"strings"
	"testing"
)

func TestPatternMatches(t *testing.T) {
	tests := []struct {
		key, image string
		want       bool
	}{
		// host, scheme, trailing slash
		{"quay.io", "quay.io/x/y:1", true},
		{"https://quay.io", "quay.io/x/y:1", true},
		{"http://quay.io/", "quay.io/x/y:1", true},
		{"QUAY.IO", "quay.io/x/y:1", true},
		{"quay.io", "quay.io/x/y@sha256:" + strings.Repeat("a", 64), true},
		{"quay.io", "gcr.io/x/y:1", false},
		{"quay.io", "sub.quay.io/x/y:1", false},
		// globs: one label each, counts must match
		{"*.example.com", "a.example.com/x:1", true},
		{"*.example.com", "a.b.example.com/x:1", false},
		{"*.example.com", "example.com/x:1", false},
		{"*.*.example.com", "a.b.example.com/x:1", true},
		{"a.*.com", "a.example.com/x:1", true},
		{"*-docker.pkg.dev", "europe-docker.pkg.dev/p/r/i:1", true},
		{"*.gcr.io", "eu.gcr.io/p/i:1", true},
		{"*.gcr.io", "gcr.io/p/i:1", false},
		{"r?g.io", "reg.io/x:1", true},
		{"*", "localhost/x:1", true},
		{"*", "quay.io/x:1", false},
		// ports
		{"127.0.0.1:5001", "127.0.0.1:5001/private/rand:img-0", true},
		{"127.0.0.1:5001", "127.0.0.1:5000/private/rand:img-0", false},
		{"127.0.0.1", "127.0.0.1:5001/private/rand:img-0", false},
		{"127.0.0.1:5001", "127.0.0.1/private/rand:img-0", false},
		{"http://localhost:5000/", "localhost:5000/x:1", true},
		{"*.example.com:443", "a.example.com:443/x:1", true},
		{"[::1]:5000", "[::1]:5000/x:1", true},
		{"[::1]", "[::1]:5000/x:1", false},
		// path prefix on segment boundaries
		{"quay.io/x", "quay.io/x/y:1", true},
		{"quay.io/x/", "quay.io/x/y:1", true},
		{"quay.io/x/y", "quay.io/x/y:1", true},
		{"quay.io/x/y", "quay.io/x/yz:1", false},
		{"quay.io/x", "quay.io/xy/z:1", false},
		{"quay.io/x/y/z", "quay.io/x/y:1", false},
		{"127.0.0.1:5001/private", "127.0.0.1:5001/private/rand:img-0", true},
		{"127.0.0.1:5001/public", "127.0.0.1:5001/private/rand:img-0", false},
		// Docker Hub aliases
		{"docker.io", "docker.io/library/busybox:latest", true},
		{"index.docker.io", "docker.io/library/busybox:latest", true},
		{"registry-1.docker.io", "docker.io/library/busybox:latest", true},
		{"https://index.docker.io/v1/", "docker.io/library/busybox:latest", true},
		{"https://index.docker.io/v1/", "busybox", true},
		{"docker.io", "index.docker.io/library/busybox:1", true},
		{"docker.io", "registry-1.docker.io/library/busybox:1", true},
		{"index.docker.io/library", "docker.io/library/busybox:latest", true},
		{"docker.io/someone", "docker.io/library/busybox:latest", false},
		{"docker.io", "quay.io/library/busybox:latest", false},
		{"registry-1.docker.io:5000", "docker.io/library/busybox:latest", false},
	}
	for _, tc := range tests {
		p, err := parsePattern(tc.key)
		if err != nil {
			t.Errorf("parsePattern(%q): %v", tc.key, err)
			continue
		}
		tg, err := parseTarget(tc.image)
		if err != nil {
			t.Errorf("parseTarget(%q): %v", tc.image, err)
			continue
		}
		if got := p.matches(tg); got != tc.want {
			t.Errorf("key %q image %q: matches = %v, want %v", tc.key, tc.image, got, tc.want)
		}
	}
}

func TestParsePatternErrors(t *testing.T) {
	for _, key := range []string{"", "https://", "/path", "a..b", "[bad.io", "host:port", "host:12:34x", "reg.io:", ":5000", "a b.io", "a\tb.io"} {
		if _, err := parsePattern(key); err == nil && key != "reg.io:" {
			t.Errorf("parsePattern(%q): no error", key)
		}
	}
	// "reg.io:" has an empty port, which means no port.
	p, err := parsePattern("reg.io:")
	if err != nil || p.port != "" || p.canonical != "reg.io" {
		t.Errorf("parsePattern(reg.io:) = %+v, %v", p, err)
	}
}

func TestParseTargetErrors(t *testing.T) {
	for _, img := range []string{"", "upper/CASE", "a b", "quay.io/x:bad tag"} {
		if _, err := parseTarget(img); err == nil {
			t.Errorf("parseTarget(%q): no error", img)
		}
	}
}

func TestMoreSpecific(t *testing.T) {
	keys := []string{"*.example.com", "a.example.com", "a.example.com/x", "a.example.com/x/y"}
	var ms []matched
	for _, k := range keys {
		p, err := parsePattern(k)
		if err != nil {
			t.Fatal(err)
		}
		ms = append(ms, matched{pat: p, cred: Credential{Source: k}})
	}
	got := sortMatched(ms)
	want := []string{"a.example.com/x/y", "a.example.com/x", "a.example.com", "*.example.com"}
	for i := range want {
		if got[i].Source != want[i] {
			t.Fatalf("order = %v, want %v", got, want)
		}
	}
}
