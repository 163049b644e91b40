package cri_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func TestCandidates(t *testing.T) {
	t.Parallel()
	plain := cri.Candidates("")
	if len(plain) == 0 || plain[0] != "/run/containerd/containerd.sock" {
		t.Fatalf("Candidates(\"\") = %v", plain)
	}
	slash := cri.Candidates("/")
	rooted := cri.Candidates("/host")
	for i := range plain {
		if slash[i] != plain[i] {
			t.Errorf("Candidates(\"/\")[%d] = %s, want %s", i, slash[i], plain[i])
		}
		if rooted[i] != "/host"+plain[i] {
			t.Errorf("Candidates(\"/host\")[%d] = %s", i, rooted[i])
		}
	}
	for _, want := range []string{"/run/crio/crio.sock", "/run/k3s/containerd/containerd.sock", "/run/cri-dockerd.sock"} {
		if !strings.Contains(strings.Join(plain, " "), want) {
			t.Errorf("candidates lack %s", want)
		}
	}
}

// listen creates a unix socket at path (with parents) that stays until the test ends.
func listen(t *testing.T, path string) net.Listener {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func TestDetect(t *testing.T) {
	t.Parallel()
	t.Run("nothing there", func(t *testing.T) {
		root := t.TempDir()
		_, err := cri.Detect(root)
		if err == nil {
			t.Fatal("no error")
		}
		for _, p := range cri.Candidates(root) {
			if !strings.Contains(err.Error(), p) {
				t.Errorf("error %q does not name %s", err, p)
			}
		}
	})
	t.Run("regular file is skipped", func(t *testing.T) {
		root := t.TempDir()
		file := filepath.Join(root, "run/containerd/containerd.sock")
		os.MkdirAll(filepath.Dir(file), 0o755)
		if err := os.WriteFile(file, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(root, "run/crio/crio.sock")
		listen(t, sock)
		got, err := cri.Detect(root)
		if err != nil || got != sock {
			t.Fatalf("Detect = %q, %v; want %s", got, err, sock)
		}
	})
	t.Run("only a file", func(t *testing.T) {
		root := t.TempDir()
		file := filepath.Join(root, "run/cri-dockerd.sock")
		os.MkdirAll(filepath.Dir(file), 0o755)
		os.WriteFile(file, nil, 0o600)
		_, err := cri.Detect(root)
		if err == nil || !strings.Contains(err.Error(), file+" (not a socket)") {
			t.Fatalf("err = %v", err)
		}
	})
	// The default DaemonSet mounts containerd's and CRI-O's socket directories on every node,
	// and the kubelet creates the absent runtime's, empty: that one must never be taken.
	for _, tc := range []struct{ name, empty, socket string }{
		{"empty containerd directory beside CRI-O's socket", "run/containerd", "run/crio/crio.sock"},
		{"empty CRI-O directory beside containerd's socket", "run/crio", "run/containerd/containerd.sock"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if err := os.MkdirAll(filepath.Join(root, tc.empty), 0o755); err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(root, tc.socket)
			listen(t, sock)
			got, err := cri.Detect(root)
			if err != nil || got != sock {
				t.Fatalf("Detect = %q, %v; want %s", got, err, sock)
			}
		})
	}
	t.Run("both directories empty", func(t *testing.T) {
		root := t.TempDir()
		for _, d := range []string{"run/containerd", "run/crio"} {
			if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		_, err := cri.Detect(root)
		for _, p := range []string{"run/containerd/containerd.sock", "run/crio/crio.sock"} {
			if want := filepath.Join(root, p) + " (missing)"; err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("err = %v; want it to name %s", err, want)
			}
		}
	})
	t.Run("first in order wins", func(t *testing.T) {
		root := t.TempDir()
		k3s := filepath.Join(root, "run/k3s/containerd/containerd.sock")
		listen(t, filepath.Join(root, "var/run/cri-dockerd.sock"))
		listen(t, k3s)
		got, err := cri.Detect(root)
		if err != nil || got != k3s {
			t.Fatalf("Detect = %q, %v; want %s", got, err, k3s)
		}
	})
}

func TestDial(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	srv := critest.Start(t)
	srv.AddImage("docker.io/library/busybox:latest", critest.Image{Size: 42})
	for _, endpoint := range []string{srv.Path(), srv.Endpoint()} {
		c, err := cri.Dial(ctx, endpoint, time.Second)
		if err != nil {
			t.Fatalf("Dial(%s): %v", endpoint, err)
		}
		if c.RuntimeName != critest.RuntimeName || c.RuntimeVersion != critest.RuntimeVersion || c.Path != srv.Path() {
			t.Errorf("client = %+v", c)
		}
		resp, err := c.Images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: "docker.io/library/busybox:latest"}})
		if err != nil || resp.GetImage().GetSize() != 42 {
			t.Errorf("ImageStatus = %v, %v", resp, err)
		}
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	}
}

func TestDialLargeListImages(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	// About 7 MB of answer: more than grpc's 4 MB default limit.
	repo := "registry.example.com/big/" + strings.Repeat("x", 100)
	for i := range 15000 {
		srv.AddImage(fmt.Sprintf("%s:%d", repo, i), critest.Image{ID: fmt.Sprintf("sha256:%064d", i)})
	}
	c, err := cri.Dial(context.Background(), srv.Path(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	resp, err := c.Images.ListImages(context.Background(), &runtimeapi.ListImagesRequest{})
	if err != nil {
		t.Fatalf("ListImages: %v", err)
	}
	if len(resp.Images) != 15000 {
		t.Errorf("got %d images", len(resp.Images))
	}
}

func TestDialFailsFast(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	l := listen(t, stale)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()

	silent := filepath.Join(dir, "silent.sock")
	sl := listen(t, silent)
	go func() { // accepts connections and never answers
		for {
			c, err := sl.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()

	// A socket whose server drops every connection at once (a non-CRI
	// server, a runtime shutting down): refused, not "did not answer".
	closing := filepath.Join(dir, "closing.sock")
	cl := listen(t, closing)
	go func() {
		for {
			c, err := cl.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()

	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)

	tests := []struct {
		name, endpoint, want string
	}{
		{"missing", filepath.Join(dir, "missing.sock"), "no such file"},
		{"not a socket", file, "not a unix socket"},
		{"nobody listens", "unix://" + stale, "nobody listens"},
		{"no answer", silent, "did not answer"},
		{"refused at once", closing, "refused"},
		{"tcp", "tcp://127.0.0.1:1", "only unix sockets"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			c, err := cri.Dial(context.Background(), tt.endpoint, 300*time.Millisecond)
			if err == nil {
				c.Close()
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not say %q", err, tt.want)
			}
			if p := strings.TrimPrefix(tt.endpoint, "unix://"); tt.name != "tcp" && !strings.Contains(err.Error(), p) {
				t.Errorf("error %q does not name %s", err, p)
			}
			d := time.Since(start)
			if d > 10*time.Second {
				t.Errorf("took %s", d)
			}
			if tt.name != "no answer" && strings.Contains(err.Error(), "did not answer") {
				t.Errorf("error %q says the runtime did not answer in time; it failed at once (%s)", err, d)
			}
		})
	}
}
