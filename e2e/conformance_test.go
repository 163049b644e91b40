// The conformance suites of the agent's fakes, run against the harness's real runtime: the same code the unit
// tests run against critest, pintest and the progress package's fake containerd. Where the runtimes differ the
// suites say what each answers; a fake that answers unlike every real runtime, or a runtime that changed, fails.
package e2e_test

import (
	"context"
	"fmt"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	criconformance "github.com/nodeprefetch/image-prefetcher/agent/cri/critest/conformance"
	pinconformance "github.com/nodeprefetch/image-prefetcher/agent/pin/pintest/conformance"
	progressconformance "github.com/nodeprefetch/image-prefetcher/agent/progress/conformance"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// TestRuntimeConformanceCRI: the CRI image service as critest serves it (errors per class, tags and digests,
// pulls by digest, ImageFsInfo, Version), on every runtime.
func TestRuntimeConformanceCRI(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	rt, images := env.CRI(t)
	img := env.Image(t, env.Registry+"/e2e/small:17")
	criconformance.Run(t, criconformance.Target{
		Runtime: env.Runtime, Images: images, Version: rt,
		Image:             criconformance.Image{Ref: img.Ref, DigestRef: img.DigestRef},
		MissingTag:        env.Registry + "/e2e/random:no-such-tag",
		MissingRepository: env.Registry + "/e2e/no-such-repository:latest",
		Private:           env.AuthRegistry + "/e2e/private:smoke",
		Auth:              env.AuthConfig(t),
		Refused:           "127.0.0.1:" + closedPort(t) + "/e2e/random:4mib",
	})
}

// TestRuntimeConformancePins: containerd's images API as pintest serves it. On CRI-O only the case that the
// API is missing runs (the suite logs it).
func TestRuntimeConformancePins(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	_, images := env.CRI(t)
	img := env.Image(t, env.Registry+"/e2e/small:18")
	pinconformance.Run(t, pinconformance.Target{
		Runtime: env.Runtime, Conn: runtimeConn(t, env),
		Image: pinconformance.Image{Ref: img.Ref, DigestRef: img.DigestRef},
		// Removed first, so the records are the pull's own, without labels an earlier test left.
		Pull: func(ctx context.Context, ref string) error {
			if err := criRemove(ctx, images, ref); err != nil {
				return err
			}
			return criPull(ctx, images, ref)
		},
	})
}

// TestRuntimeConformanceProgress: containerd's leases and content API as the progress tests' fake containerd
// serves it. On CRI-O only the case that the API is missing runs (the suite logs it).
func TestRuntimeConformanceProgress(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	_, images := env.CRI(t)
	img := env.Image(t, env.Registry+"/e2e/small:19")
	progressconformance.Run(t, progressconformance.Target{
		Runtime: env.Runtime, Conn: runtimeConn(t, env),
		Image:  progressconformance.Image{Ref: img.Ref, Digest: img.Digest},
		Remove: func(ctx context.Context, ref string) error { return criRemove(ctx, images, ref) },
		Pull:   func(ctx context.Context, ref string) error { return criPull(ctx, images, ref) },
	})
}

// runtimeConn is one connection to the runtime's socket, as the agent's (cri.Client.Conn).
func runtimeConn(t *testing.T, env *clusterenv.Env) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+env.CRISocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("connect %s: %v", env.CRISocket, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func criPull(ctx context.Context, images runtimeapi.ImageServiceClient, ref string) error {
	if _, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	return nil
}

func criRemove(ctx context.Context, images runtimeapi.ImageServiceClient, ref string) error {
	st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return fmt.Errorf("image status %s: %w", ref, err)
	}
	if st.GetImage() == nil {
		return nil
	}
	if _, err := images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
		return fmt.Errorf("remove %s: %w", ref, err)
	}
	return nil
}
