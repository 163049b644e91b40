package conformance_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest/conformance"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The fake scripted the way the e2e harness's registries make a real runtime
// fail: the same suite then holds it to what the real runtimes answer.
func TestFakeConformance(t *testing.T) {
	srv := critest.Start(t)
	const (
		ref        = "127.0.0.1:5000/e2e/random:8mib"
		missingTag = "127.0.0.1:5000/e2e/random:no-such-tag"
		missingRep = "127.0.0.1:5000/e2e/no-such-repository:latest"
		private    = "127.0.0.1:5001/e2e/private:smoke"
		refused    = "127.0.0.1:1/e2e/random:4mib"
	)
	// What the registry serves: one image, whichever form names it.
	digestRef := "127.0.0.1:5000/e2e/random@sha256:" + strings.Repeat("8a", 32)
	image := critest.Image{ID: "sha256:" + strings.Repeat("c0", 32), RepoDigests: []string{digestRef}}
	srv.SetPulledImage(ref, image)
	srv.SetPulledImage(digestRef, image)
	srv.OnPull(missingTag, critest.NotFound(missingTag))
	srv.OnPull(missingRep, critest.NotFound(missingRep))
	srv.OnPull(refused, critest.Refused(refused))
	auth := &runtimeapi.AuthConfig{Username: "e2e", Password: "secret"}
	srv.RequireAuth(private, critest.Credential{Username: auth.Username, Password: auth.Password})

	c, err := cri.Dial(context.Background(), srv.Path(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	conformance.Run(t, conformance.Target{
		Runtime: conformance.Fake, Images: c.Images, Version: c.Runtime,
		Image:      conformance.Image{Ref: ref, DigestRef: digestRef},
		MissingTag: missingTag, MissingRepository: missingRep, Private: private, Auth: auth, Refused: refused,
	})
}

func TestTables(t *testing.T) {
	if err := conformance.CheckTables(); err != nil {
		t.Fatal(err)
	}
}
