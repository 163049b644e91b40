package conformance_test

import (
	"context"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/pin/pintest"
	"github.com/nodeprefetch/image-prefetcher/agent/pin/pintest/conformance"
)

const (
	ref       = "127.0.0.1:5000/e2e/random:8mib"
	digestRef = "127.0.0.1:5000/e2e/random@sha256:8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a"
)

// The fake serves the images API beside a fake CRI on one socket, as the
// agent meets containerd.
func TestFakeConformance(t *testing.T) {
	imgs := pintest.New()
	srv := critest.Start(t, imgs.Register)
	conformance.Run(t, conformance.Target{
		Runtime: conformance.Fake, Conn: pintest.Dial(t, srv.Path()),
		Image: conformance.Image{Ref: ref, DigestRef: digestRef},
		// The records containerd's CRI makes for a pull by tag: the tag's and
		// the digest reference's, with CRI's own label.
		Pull: func(_ context.Context, ref string) error {
			for _, r := range []string{ref, digestRef} {
				name, err := pin.RecordName(r)
				if err != nil {
					return err
				}
				imgs.Add(name, map[string]string{"io.cri-containerd.image": "managed"})
			}
			return nil
		},
	})
}

// A fake CRI alone has no images API, as CRI-O has none.
func TestFakeWithoutImagesAPI(t *testing.T) {
	srv := critest.Start(t)
	conformance.RunUnsupported(t, pintest.Dial(t, srv.Path()))
}
