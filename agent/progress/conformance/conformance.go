// Package conformance holds the behaviour of containerd's leases and content
// API that the progress package's Containerd source relies on, as one suite
// that runs against the fake containerd of the progress unit tests and
// against the e2e harness's real containerds (2.x and 1.6). On CRI-O, which
// has no such API, only the case that the agent sees the API missing runs
// (Run says so in the test log).
package conformance

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	criconformance "github.com/nodeprefetch/image-prefetcher/agent/cri/critest/conformance"
	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// The runtimes a Target can be: the real ones as the CRI suite names them,
// and this suite's fake.
const (
	Containerd   = criconformance.Containerd
	Containerd16 = criconformance.Containerd16
	CRIO         = criconformance.CRIO
	Fake         = "fake containerd"
)

// Image is a pullable single-platform image: its tagged reference and its
// manifest digest.
type Image struct {
	Ref, Digest string
}

// Target is the runtime under test.
type Target struct {
	Runtime string
	// Conn is a connection to the runtime's socket (the agent's one
	// connection, cri.Client.Conn).
	Conn grpc.ClientConnInterface
	// Image is removed and pulled by the suite; nothing else may use it
	// while the suite runs.
	Image Image
	// Remove makes the image absent, as CRI's RemoveImage does.
	Remove func(ctx context.Context, ref string) error
	// Pull pulls ref as CRI's PullImage does, with ctx's outgoing metadata
	// (the lease header progress.Containerd.Bind adds) going along.
	Pull func(ctx context.Context, ref string) error
}

// Run runs the suite against target. On CRI-O only Unsupported runs.
func Run(t *testing.T, target Target) {
	t.Helper()
	switch target.Runtime {
	case CRIO:
		t.Logf("%s serves no containerd leases or content API: only the case that the agent sees them missing runs "+
			"here; the leases and content cases are containerd's and the fake's", target.Runtime)
		t.Run("Unsupported", func(t *testing.T) { RunUnsupported(t, target.Conn) })
		return
	case Containerd, Containerd16, Fake:
	default:
		t.Fatalf("unknown runtime %q", target.Runtime)
	}
	t.Run("NamespaceRequired", func(t *testing.T) { testNamespaceRequired(t, target) })
	t.Run("Leases", func(t *testing.T) { testLeases(t, target) })
	t.Run("MissingBlob", func(t *testing.T) { testMissingBlob(t, target) })
	t.Run("PullUnderALease", func(t *testing.T) { testPullUnderALease(t, target) })
}

// RunUnsupported: on a socket without containerd's leases API (CRI-O, or a
// fake CRI alone) the source says so with progress.ErrUnsupported, so that
// the agent falls back to escalating timeouts instead of failing the pull.
func RunUnsupported(t *testing.T, conn grpc.ClientConnInterface) {
	src := progress.NewContainerd(conn, "conformance")
	_, _, err := src.Open(ctxFor(t), "127.0.0.1:5000/e2e/conformance:1")
	t.Logf("Open without the leases API: %v", err)
	if !errors.Is(err, progress.ErrUnsupported) {
		t.Errorf("Open = %v, want progress.ErrUnsupported", err)
	}
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// namespaced is ctx in the namespace CRI keeps its images in.
func namespaced(t *testing.T) context.Context {
	return metadata.AppendToOutgoingContext(ctxFor(t), pin.NamespaceHeader, pin.Namespace)
}

func testNamespaceRequired(t *testing.T, target Target) {
	_, err := leasesapi.NewLeasesClient(target.Conn).List(ctxFor(t), &leasesapi.ListRequest{})
	t.Logf("%s: leases List without a namespace: %v", target.Runtime, err)
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("leases List without a namespace = %v, want FailedPrecondition", err)
	}
}

// testLeases: the lease calls as the source makes them: create with labels
// (the answer and the listing carry them and a creation time), AlreadyExists
// for an ID taken (Open reuses the lease then), the two filters it lists by
// (id==, and one label's value), NotFound for a deleted lease's delete and
// resources (Release and Held treat it as done).
func testLeases(t *testing.T, target Target) {
	ctx := namespaced(t)
	leases := leasesapi.NewLeasesClient(target.Conn)
	const key = progress.LeaseInstanceLabel
	a, b := progress.LeasePrefix+"conformance-a", progress.LeasePrefix+"conformance-b"
	labels := map[string]string{key: "conformance", progress.LeaseImageLabel: target.Image.Ref,
		"containerd.io/gc.expire": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)}
	t.Cleanup(func() {
		for _, id := range []string{a, b} {
			leases.Delete(namespaced(t), &leasesapi.DeleteRequest{ID: id}) //nolint:errcheck // gone already when the test passed
		}
	})
	created, err := leases.Create(ctx, &leasesapi.CreateRequest{ID: a, Labels: labels})
	if err != nil {
		t.Fatalf("create lease %s: %v", a, err)
	}
	l := created.GetLease()
	t.Logf("%s: created lease %s, labels %v, created at %v", target.Runtime, l.GetID(), l.GetLabels(), l.GetCreatedAt().AsTime())
	if l.GetID() != a || !mapsEqual(l.GetLabels(), labels) || l.GetCreatedAt().AsTime().IsZero() || l.GetCreatedAt() == nil {
		t.Errorf("created lease %v, want ID %s, labels %v and a creation time", l, a, labels)
	}
	if _, err := leases.Create(ctx, &leasesapi.CreateRequest{ID: b, Labels: map[string]string{key: "another instance"}}); err != nil {
		t.Fatalf("create lease %s: %v", b, err)
	}
	_, err = leases.Create(ctx, &leasesapi.CreateRequest{ID: a})
	t.Logf("%s: create of an existing lease: %v", target.Runtime, err)
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("create of existing lease %s = %v, want AlreadyExists", a, err)
	}
	list := func(filter string) []*leasesapi.Lease {
		t.Helper()
		resp, err := leases.List(ctx, &leasesapi.ListRequest{Filters: []string{filter}})
		if err != nil {
			t.Fatalf("list leases %s: %v", filter, err)
		}
		return resp.GetLeases()
	}
	byID := list(fmt.Sprintf("id==%q", a))
	if len(byID) != 1 || byID[0].GetID() != a || !mapsEqual(byID[0].GetLabels(), labels) || !byID[0].GetCreatedAt().AsTime().Equal(l.GetCreatedAt().AsTime()) {
		t.Errorf("list by id %s = %v, want the lease as created", a, byID)
	}
	var ids []string
	for _, l := range list(fmt.Sprintf("labels.%q==%q", key, "conformance")) {
		ids = append(ids, l.GetID())
	}
	if !slices.Equal(ids, []string{a}) {
		t.Errorf("list by label %s=conformance = %v, want [%s]", key, ids, a)
	}
	res, err := leases.ListResources(ctx, &leasesapi.ListResourcesRequest{ID: a})
	if err != nil || len(res.GetResources()) != 0 {
		t.Errorf("resources of the new lease %s = %v, %v; want none", a, res.GetResources(), err)
	}
	if _, err := leases.Delete(ctx, &leasesapi.DeleteRequest{ID: a}); err != nil {
		t.Fatalf("delete lease %s: %v", a, err)
	}
	if got := list(fmt.Sprintf("id==%q", a)); len(got) != 0 {
		t.Errorf("lease %s listed after its delete: %v", a, got)
	}
	_, err = leases.Delete(ctx, &leasesapi.DeleteRequest{ID: a})
	t.Logf("%s: delete of a deleted lease: %v", target.Runtime, err)
	if status.Code(err) != codes.NotFound {
		t.Errorf("delete of deleted lease %s = %v, want NotFound", a, err)
	}
	_, err = leases.ListResources(ctx, &leasesapi.ListResourcesRequest{ID: a})
	t.Logf("%s: resources of a deleted lease: %v", target.Runtime, err)
	if status.Code(err) != codes.NotFound {
		t.Errorf("resources of deleted lease %s = %v, want NotFound", a, err)
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// testMissingBlob: Info and Read of a blob the node does not have are
// NotFound (the source skips a blob deleted since its lease listed it).
func testMissingBlob(t *testing.T, target Target) {
	ctx := namespaced(t)
	content := contentapi.NewContentClient(target.Conn)
	sum := sha256.Sum256([]byte("image-prefetcher conformance: no such blob"))
	missing := "sha256:" + hex.EncodeToString(sum[:])
	_, err := content.Info(ctx, &contentapi.InfoRequest{Digest: missing})
	t.Logf("%s: Info of a missing blob: %v", target.Runtime, err)
	if status.Code(err) != codes.NotFound {
		t.Errorf("Info of missing blob %s = %v, want NotFound", missing, err)
	}
	_, err = read(ctx, content, missing, 0, 0)
	if status.Code(err) != codes.NotFound {
		t.Errorf("Read of missing blob %s = %v, want NotFound", missing, err)
	}
	if _, err := content.ListStatuses(ctx, &contentapi.ListStatusesRequest{}); err != nil {
		t.Errorf("ListStatuses: %v", err)
	}
}

// read reads size bytes of digest from offset (0: to the end).
func read(ctx context.Context, content contentapi.ContentClient, digest string, offset, size int64) ([]byte, error) {
	stream, err := content.Read(ctx, &contentapi.ReadContentRequest{Digest: digest, Offset: offset, Size: size})
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", digest, err)
	}
	var data []byte
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return data, nil
		}
		if err != nil {
			return data, fmt.Errorf("read %s: %w", digest, err)
		}
		// containerd (1.6 and 2.x) counts each message's offset from the
		// requested one, not from the blob's start.
		if msg.GetOffset() != int64(len(data)) {
			return data, fmt.Errorf("read %s: a message at offset %d after %d bytes read from %d", digest, msg.GetOffset(), len(data), offset)
		}
		data = append(data, msg.GetData()...)
	}
}

// manifest is the part of an image manifest the suite reads.
type manifest struct {
	Config struct {
		Digest string `json:"digest"`
		Size   int64  `json:"size"`
	} `json:"config"`
	Layers []struct {
		Digest string `json:"digest"`
		Size   int64  `json:"size"`
	} `json:"layers"`
}

// testPullUnderALease: a pull whose request carries the lease header (Bind)
// puts the manifest, the config and every layer into the lease as
// "content" resources named by digest; Info gives each one's size and Read
// its bytes (from an offset, a given size); the source's Poll sees every
// blob and the image's total; Held counts them; the lease of a pulled image
// goes at Release, and the image stays.
func testPullUnderALease(t *testing.T, target Target) {
	ctx := ctxFor(t)
	img := target.Image
	if err := target.Remove(ctx, img.Ref); err != nil {
		t.Fatalf("remove %s: %v", img.Ref, err)
	}
	src := progress.NewContainerd(target.Conn, "conformance")
	src.Owner = "conformance"
	if _, err := src.Prune(ctx, nil); err != nil { // an earlier run's lease
		t.Fatalf("prune: %v", err)
	}
	key, fresh, err := src.Open(ctx, img.Ref)
	if err != nil || !fresh {
		t.Fatalf("open the lease of %s: %s fresh %v, %v", img.Ref, key, fresh, err)
	}
	t.Cleanup(func() { src.Release(ctxFor(t), key, pull.TransferFailedForGood) }) //nolint:errcheck // gone already when the test passed
	if err := target.Pull(src.Bind(ctx, key), img.Ref); err != nil {
		t.Fatalf("pull %s under lease %s: %v", img.Ref, key, err)
	}

	nctx := namespaced(t)
	res, err := leasesapi.NewLeasesClient(target.Conn).ListResources(nctx, &leasesapi.ListResourcesRequest{ID: key})
	if err != nil {
		t.Fatalf("resources of lease %s: %v", key, err)
	}
	held := map[string]bool{}
	var snapshots, others []string
	for _, r := range res.GetResources() {
		switch {
		case r.GetType() == "content":
			held[r.GetID()] = true
		case strings.HasPrefix(r.GetType(), "snapshots/"):
			snapshots = append(snapshots, r.GetType()+" "+r.GetID())
		default:
			others = append(others, r.GetType()+" "+r.GetID())
		}
	}
	t.Logf("%s: lease %s holds %d blobs, snapshots %v, other resources %v", target.Runtime, key, len(held), snapshots, others)
	content := contentapi.NewContentClient(target.Conn)
	data, err := read(nctx, content, img.Digest, 0, 0)
	if err != nil {
		t.Fatalf("the manifest: %v", err)
	}
	if sum := sha256.Sum256(data); "sha256:"+hex.EncodeToString(sum[:]) != img.Digest {
		t.Errorf("the manifest's bytes do not have its digest %s", img.Digest)
	}
	var m manifest
	if err := json.Unmarshal(data, &m); err != nil || m.Config.Digest == "" || len(m.Layers) == 0 {
		t.Fatalf("manifest %s: %v (%s)", img.Digest, err, truncate(string(data), 200))
	}
	want := map[string]int64{img.Digest: int64(len(data)), m.Config.Digest: m.Config.Size}
	for _, l := range m.Layers {
		want[l.Digest] = l.Size
	}
	var total int64
	for d, size := range want {
		total += size
		if !held[d] {
			t.Errorf("lease %s does not hold blob %s", key, d)
		}
		info, err := content.Info(nctx, &contentapi.InfoRequest{Digest: d})
		if err != nil {
			t.Errorf("info %s: %v", d, err)
		} else if info.GetInfo().GetSize() != size || info.GetInfo().GetCreatedAt().AsTime().IsZero() {
			t.Errorf("info %s: size %d, created %v; want %d and a creation time", d, info.GetInfo().GetSize(), info.GetInfo().GetCreatedAt(), size)
		}
	}
	if len(held) != len(want) {
		t.Errorf("lease %s holds %d blobs, the image has %d", key, len(held), len(want))
	}
	// CRI unpacks the layers under the pull's lease too: one snapshot per
	// layer, which the source must pass over (it counts blobs and ingests).
	if len(snapshots) != len(m.Layers) || len(others) != 0 {
		t.Errorf("lease %s holds snapshots %v and other resources %v; want one snapshot per layer (%d) and nothing else",
			key, snapshots, others, len(m.Layers))
	}
	if part, err := read(nctx, content, img.Digest, 10, 20); err != nil || string(part) != string(data[10:30]) {
		t.Errorf("read of 20 bytes at 10: %q, %v; want %q", part, err, data[10:30])
	}

	snap, err := src.Poll(ctx, []string{key})
	if err != nil {
		t.Fatalf("poll: %v", err)
	}
	st := snap.Transfers[key]
	t.Logf("%s: poll after the pull: %+v", target.Runtime, st)
	if st.Blobs != len(want) || st.Total != total || st.Fetched+st.Present != total || len(st.Ingests) != 0 {
		t.Errorf("poll after the pull: %+v; want %d blobs, total %d bytes, all of them fetched or present, no ingest", st, len(want), total)
	}
	if n, err := src.Held(ctx); err != nil || n != total {
		t.Errorf("held = %d, %v; want the image's %d bytes", n, err, total)
	}
	if err := src.Release(ctx, key, pull.TransferPulled); err != nil {
		t.Fatalf("release: %v", err)
	}
	resp, err := leasesapi.NewLeasesClient(target.Conn).List(nctx, &leasesapi.ListRequest{Filters: []string{fmt.Sprintf("id==%q", key)}})
	if err != nil || len(resp.GetLeases()) != 0 {
		t.Errorf("lease %s after the release of a pulled image: %v, %v; want it gone", key, resp.GetLeases(), err)
	}
	if _, err := content.Info(nctx, &contentapi.InfoRequest{Digest: img.Digest}); err != nil {
		t.Errorf("the manifest after the lease went: %v; the image's own record holds it", err)
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
