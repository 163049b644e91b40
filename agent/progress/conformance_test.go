package progress_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/progress/conformance"
)

// The fake containerd held to the suite the real containerds pass: its pull
// commits a manifest, a config and two layers under the request's lease, as
// containerd's CRI does.
func TestFakeContainerdConformance(t *testing.T) {
	f, path := startFake(t)
	const ref = "127.0.0.1:5000/e2e/random:8mib"
	config := sum("config")
	layers := []struct {
		digest string
		size   int64
	}{{sum("layer-1"), 3 << 20}, {sum("layer-2"), 5 << 20}}
	manifest := fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",`+
		`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":600},`+
		`"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":%q,"size":%d},`+
		`{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":%q,"size":%d}]}`,
		config, layers[0].digest, layers[0].size, layers[1].digest, layers[1].size)
	digest := sum(manifest)
	conformance.Run(t, conformance.Target{
		Runtime: conformance.Fake, Conn: dial(t, path),
		Image:  conformance.Image{Ref: ref, Digest: digest},
		Remove: func(context.Context, string) error { return nil },
		Pull: func(ctx context.Context, _ string) error {
			md, _ := metadata.FromOutgoingContext(ctx)
			lease := md.Get(progress.LeaseHeader)
			if len(lease) != 1 {
				return errors.New("fake pull: no lease header")
			}
			now := time.Now()
			f.commit(lease[0], "manifest-"+digest, digest, []byte(manifest), 0, now)
			f.commit(lease[0], "config-"+config, config, nil, 600, now)
			for i, l := range layers {
				f.ingest(lease[0], "layer-"+l.digest, l.digest, l.size/2, l.size)
				f.commit(lease[0], "layer-"+l.digest, l.digest, nil, l.size, now)
				// The layer unpacked under the lease, as CRI does.
				f.mu.Lock()
				f.res[lease[0]] = append(f.res[lease[0]], &leasesapi.Resource{ID: sum(fmt.Sprint("chain", i)), Type: "snapshots/overlayfs"})
				f.mu.Unlock()
			}
			return nil
		},
	})
}

// A fake CRI socket without containerd's APIs, as CRI-O has none.
func TestWithoutContainerdAPIConformance(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cri.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	go s.Serve(l) //nolint:errcheck // ends with Stop
	t.Cleanup(s.Stop)
	conformance.RunUnsupported(t, dial(t, path))
}

func sum(s string) string {
	h := sha256.Sum256([]byte(s))
	return "sha256:" + hex.EncodeToString(h[:])
}
