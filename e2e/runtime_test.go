// What differs between the runtimes the harness runs (containerd 2.x, containerd 1.6, CRI-O), found on the
// real runtime and pinned down here: each test holds on every runtime, and logs what the runtime said so the
// per-runtime table in e2e/README.md can be read off a `go test -v` run.
package e2e_test

import (
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// TestRuntimeErrorClassification: the failures the agent must tell apart come back from each runtime with
// other gRPC codes and texts (containerd: NotFound for a missing tag, Unknown + "401 Unauthorized"; CRI-O:
// Unknown for both, "manifest unknown" / "authentication required"), and the agent's classifier gives the
// same reason on every one of them, so permanent failures are not retried blindly anywhere.
func TestRuntimeErrorClassification(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	_, images := env.CRI(t)
	wrong := env.AuthConfig(t)
	wrong.Password += "-wrong"
	cases := []struct {
		name string
		ref  string
		auth *runtimeapi.AuthConfig
		want pull.Reason
	}{
		{"missing tag", env.Registry + "/e2e/random:no-such-tag", nil, pull.ReasonNotFound},
		{"missing repository", env.Registry + "/e2e/no-such-repository:latest", nil, pull.ReasonNotFound},
		{"anonymous pull of a private image", env.AuthRegistry + "/e2e/private:smoke", nil, pull.ReasonUnauthorized},
		{"wrong password", env.AuthRegistry + "/e2e/private:smoke", wrong, pull.ReasonUnauthorized},
		{"refused connection", "127.0.0.1:" + closedPort(t) + "/e2e/random:4mib", nil, pull.ReasonUnavailable},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "-"), func(t *testing.T) {
			ctx := ctxFor(t, time.Minute)
			if c.auth == nil {
				removeImage(ctx, t, images, c.ref)
			}
			_, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: c.ref}, Auth: c.auth})
			if err == nil {
				t.Fatalf("pull %s succeeded; want a %s failure", c.ref, c.want)
			}
			st := status.Convert(err)
			t.Logf("%s %s: code %s, text %q", env.Runtime, env.RuntimeVersion, st.Code(), truncate(st.Message(), 300))
			if got := pull.Classify(err); got != c.want {
				t.Errorf("classified %s, want %s; error: %v", got, c.want, err)
			}
		})
	}
}

// TestRuntimeDigestReferences: after a pull by tag, ImageStatus finds the image by its digest reference, with
// the same image ID, and the repo digests hold that reference; a pull by digest reports the same image.
// The agent's IfNotPresent check and its recorded results rely on this on every runtime.
func TestRuntimeDigestReferences(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	ctx := ctxFor(t, 2*time.Minute)
	_, images := env.CRI(t)
	img := env.Image(t, env.Registry+"/e2e/random:8mib")
	removeImage(ctx, t, images, img.Ref)
	pulled, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: img.Ref}})
	if err != nil {
		t.Fatalf("pull %s: %v", img.Ref, err)
	}
	byTag, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: img.Ref}})
	if err != nil || byTag.GetImage() == nil {
		t.Fatalf("image status %s after its pull: %v", img.Ref, err)
	}
	byDigest, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: img.DigestRef}})
	if err != nil {
		t.Fatalf("image status %s: %v", img.DigestRef, err)
	}
	if byDigest.GetImage() == nil {
		t.Fatalf("image status %s: not found although %s was pulled", img.DigestRef, img.Ref)
	}
	t.Logf("%s %s: PullImage imageRef %q; ImageStatus id %q, repoDigests %v, repoTags %v", env.Runtime, env.RuntimeVersion,
		pulled.GetImageRef(), byTag.Image.GetId(), byTag.Image.GetRepoDigests(), byTag.Image.GetRepoTags())
	if byDigest.Image.GetId() != byTag.Image.GetId() {
		t.Errorf("by digest id %q, by tag id %q", byDigest.Image.GetId(), byTag.Image.GetId())
	}
	if !contains(byTag.Image.GetRepoDigests(), img.DigestRef) {
		t.Errorf("repo digests %v do not hold %s", byTag.Image.GetRepoDigests(), img.DigestRef)
	}
	// containerd answers the image ID (the config digest), CRI-O the same ID without the "sha256:" prefix;
	// both identify the image, and ImageStatus by that reference finds it.
	ref := pulled.GetImageRef()
	if ref == "" {
		t.Fatalf("PullImage of %s reported no imageRef", img.Ref)
	}
	byRef, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil || byRef.GetImage().GetId() != byTag.Image.GetId() {
		t.Errorf("image status by the reported imageRef %q: %v, id %q; want id %q", ref, err, byRef.GetImage().GetId(), byTag.Image.GetId())
	}
}

// closedPort returns a loopback port nothing listens on: a registry that refuses connections at once.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(l.Addr().String())
	l.Close()
	return port
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// TestRuntimeModelImageAndArtifact: what each runtime makes of the two ways a model is shipped for
// an image volume: an OCI image whose layers hold the files (e2e/model:image), and an OCI artifact
// with its own artifactType, an empty config and untarred layers (e2e/model:artifact). A CRI
// PullImage is what the kubelet sends for an image volume and what the agent sends to prefetch it.
// containerd 2.x and CRI-O keep both; containerd 1.6 unpacks every image and refuses the
// artifact, which the agent classifies as ArtifactUnsupported (permanent, saying what is missing).
func TestRuntimeModelImageAndArtifact(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	_, images := env.CRI(t)
	for _, tag := range []string{"image", "artifact"} {
		t.Run(tag, func(t *testing.T) {
			ctx := ctxFor(t, time.Minute)
			ref := env.Image(t, "e2e/model:"+tag).Ref
			removeImage(ctx, t, images, ref)
			t.Cleanup(func() { removeImage(ctxFor(t, time.Minute), t, images, ref) })
			resp, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
			refused := tag == "artifact" && env.Runtime == clusterenv.RuntimeContainerd16
			if err != nil {
				st := status.Convert(err)
				t.Logf("%s %s: pull %s: code %s, text %q, classified %s", env.Runtime, env.RuntimeVersion, ref, st.Code(),
					truncate(st.Message(), 400), pull.Classify(err))
				if !refused {
					t.Fatalf("%s refused %s: %v", env.Runtime, ref, err)
				}
				if got := pull.Classify(err); got != pull.ReasonArtifactUnsupported {
					t.Errorf("classified %s, want %s", got, pull.ReasonArtifactUnsupported)
				}
				return
			}
			if refused {
				t.Fatalf("%s %s pulled the artifact %s: update the table (e2e/README.md, README.md)", env.Runtime, env.RuntimeVersion, ref)
			}
			st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
			if err != nil || st.GetImage() == nil {
				t.Fatalf("ImageStatus %s after its pull: %v, %v", ref, st.GetImage(), err)
			}
			t.Logf("%s %s: pull %s: image %s", env.Runtime, env.RuntimeVersion, ref, resp.ImageRef)
		})
	}
}
