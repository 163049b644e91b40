package progress_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// fakeContainerd serves the part of containerd's leases and content API the
// Containerd source reads: leases with their resources, the node's ingests
// and blobs. Requests outside pin.Namespace are refused, as containerd
// refuses requests without a namespace.
type fakeContainerd struct {
	mu       sync.Mutex
	leases   map[string]*leasesapi.Lease
	res      map[string][]*leasesapi.Resource // by lease
	statuses []*contentapi.Status
	blobs    map[string]blobData // by digest
	deleted  []string
	reads    int
}

// The two services have methods of the same names (List, Delete).
type (
	leasesServer struct {
		leasesapi.UnimplementedLeasesServer
		*fakeContainerd
	}
	contentServer struct {
		contentapi.UnimplementedContentServer
		*fakeContainerd
	}
)

type blobData struct {
	data    []byte
	size    int64
	created time.Time
}

func startFake(t *testing.T) (*fakeContainerd, string) {
	t.Helper()
	f := &fakeContainerd{leases: map[string]*leasesapi.Lease{}, res: map[string][]*leasesapi.Resource{}, blobs: map[string]blobData{}}
	path := filepath.Join(t.TempDir(), "containerd.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	leasesapi.RegisterLeasesServer(s, leasesServer{fakeContainerd: f})
	contentapi.RegisterContentServer(s, contentServer{fakeContainerd: f})
	go s.Serve(l) //nolint:errcheck // ends with Stop
	t.Cleanup(s.Stop)
	return f, path
}

func namespace(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(pin.NamespaceHeader); len(v) != 1 || v[0] != pin.Namespace {
		return status.Errorf(codes.FailedPrecondition, "namespace is required, got %v", v)
	}
	return nil
}

func (f leasesServer) Create(ctx context.Context, r *leasesapi.CreateRequest) (*leasesapi.CreateResponse, error) {
	if err := namespace(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.leases[r.GetID()]; ok {
		return nil, status.Errorf(codes.AlreadyExists, "lease %s exists", r.GetID())
	}
	l := &leasesapi.Lease{ID: r.GetID(), Labels: r.GetLabels(), CreatedAt: timestamppb.Now()}
	f.leases[r.GetID()] = l
	return &leasesapi.CreateResponse{Lease: l}, nil
}

func (f leasesServer) List(ctx context.Context, r *leasesapi.ListRequest) (*leasesapi.ListResponse, error) {
	if err := namespace(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*leasesapi.Lease
	// The two filters the agent sends: by ID, and by one label's value.
	for id, l := range f.leases {
		for _, flt := range r.GetFilters() {
			match := flt == fmt.Sprintf("id==%q", id)
			for k, v := range l.GetLabels() {
				match = match || flt == fmt.Sprintf("labels.%q==%q", k, v)
			}
			if match {
				out = append(out, l)
			}
		}
	}
	return &leasesapi.ListResponse{Leases: out}, nil
}

func (f leasesServer) Delete(ctx context.Context, r *leasesapi.DeleteRequest) (*emptypb.Empty, error) {
	if err := namespace(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.leases[r.GetID()]; !ok {
		return nil, status.Error(codes.NotFound, "no lease")
	}
	delete(f.leases, r.GetID())
	delete(f.res, r.GetID())
	f.deleted = append(f.deleted, r.GetID())
	return &emptypb.Empty{}, nil
}

func (f leasesServer) ListResources(ctx context.Context, r *leasesapi.ListResourcesRequest) (*leasesapi.ListResourcesResponse, error) {
	if err := namespace(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.leases[r.GetID()]; !ok {
		return nil, status.Error(codes.NotFound, "no lease")
	}
	return &leasesapi.ListResourcesResponse{Resources: f.res[r.GetID()]}, nil
}

func (f contentServer) ListStatuses(ctx context.Context, _ *contentapi.ListStatusesRequest) (*contentapi.ListStatusesResponse, error) {
	if err := namespace(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	// Copies: ingest changes a status in place while gRPC may still be
	// marshalling this answer (as real containerd answers with a snapshot).
	out := make([]*contentapi.Status, len(f.statuses))
	for i, st := range f.statuses {
		out[i] = proto.Clone(st).(*contentapi.Status)
	}
	return &contentapi.ListStatusesResponse{Statuses: out}, nil
}

func (f contentServer) Info(ctx context.Context, r *contentapi.InfoRequest) (*contentapi.InfoResponse, error) {
	if err := namespace(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	b, ok := f.blobs[r.GetDigest()]
	if !ok {
		return nil, status.Error(codes.NotFound, "no blob")
	}
	return &contentapi.InfoResponse{Info: &contentapi.Info{Digest: r.GetDigest(), Size: b.size, CreatedAt: timestamppb.New(b.created)}}, nil
}

func (f contentServer) Read(r *contentapi.ReadContentRequest, s contentapi.Content_ReadServer) error {
	if err := namespace(s.Context()); err != nil {
		return err
	}
	f.mu.Lock()
	b, ok := f.blobs[r.GetDigest()]
	f.mu.Unlock()
	if !ok {
		return status.Error(codes.NotFound, "no blob")
	}
	data := b.data[min(int(r.GetOffset()), len(b.data)):]
	if r.GetSize() > 0 {
		data = data[:min(int(r.GetSize()), len(data))]
	}
	f.mu.Lock()
	f.reads++
	f.mu.Unlock()
	// Several messages, as containerd sends big blobs; like containerd's, each
	// one's offset counts from the requested offset, not from the blob's start
	// (the conformance suite reads both).
	for off := 0; off < len(data); off += 7 {
		end := min(off+7, len(data))
		if err := s.Send(&contentapi.ReadContentResponse{Offset: int64(off), Data: data[off:end]}); err != nil {
			return err
		}
	}
	return nil
}

// ingest opens (or moves) an ingest of the node, owned by lease when set.
func (f *fakeContainerd) ingest(lease, ref, digest string, offset, total int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range f.statuses {
		if s.GetRef() == ref {
			s.Offset = offset
			return
		}
	}
	f.statuses = append(f.statuses, &contentapi.Status{Ref: ref, Offset: offset, Total: total, Expected: digest})
	if lease != "" {
		f.res[lease] = append(f.res[lease], &leasesapi.Resource{ID: ref, Type: "ingests"})
	}
}

// commit turns the ingest ref into the blob digest (or adds a blob found on
// the node, with ref ""), held by lease.
func (f *fakeContainerd) commit(lease, ref, digest string, data []byte, size int64, created time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, s := range f.statuses {
		if s.GetRef() == ref {
			f.statuses = append(f.statuses[:i], f.statuses[i+1:]...)
			break
		}
	}
	// Like containerd, the committed ingest leaves the lease: the blob holds
	// its place (the conformance suite lists a real pull's lease).
	f.res[lease] = slices.DeleteFunc(f.res[lease], func(r *leasesapi.Resource) bool {
		return r.GetType() == "ingests" && r.GetID() == ref
	})
	if data != nil {
		size = int64(len(data))
	}
	f.blobs[digest] = blobData{data: data, size: size, created: created}
	f.res[lease] = append(f.res[lease], &leasesapi.Resource{ID: digest, Type: "content"})
}

func TestContainerdSourceFollowsALease(t *testing.T) {
	f, path := startFake(t)
	src := progress.NewContainerd(dial(t, path), "team-a")
	ctx := context.Background()
	const image = "registry.example/app:1"
	key, fresh, err := src.Open(ctx, image)
	if err != nil || !fresh {
		t.Fatalf("Open = %q, fresh %v, %v; want a fresh lease", key, fresh, err)
	}
	if key != progress.LeaseID("team-a", image) {
		t.Errorf("key %q, want the image's lease ID", key)
	}
	f.mu.Lock()
	l := f.leases[key]
	f.mu.Unlock()
	if l == nil {
		t.Fatal("no lease created")
	}
	expire, err := time.Parse(time.RFC3339, l.GetLabels()["containerd.io/gc.expire"])
	if err != nil || time.Until(expire) < 23*time.Hour || l.GetLabels()[progress.LeaseImageLabel] != image || l.GetLabels()[progress.LeaseInstanceLabel] != "team-a" {
		t.Errorf("lease labels %v: want the image, the instance and an expiry a day ahead", l.GetLabels())
	}
	md, _ := metadata.FromOutgoingContext(src.Bind(ctx, key))
	if v := md.Get(progress.LeaseHeader); len(v) != 1 || v[0] != key {
		t.Errorf("bound metadata %v, want %s=%s", md, progress.LeaseHeader, key)
	}

	// The pull: a manifest fetched, a base layer found on the node, a layer
	// half way; another pull's ingest on the node does not count.
	manifest := []byte(`{"schemaVersion":2,"config":{"digest":"sha256:c","size":100},` +
		`"layers":[{"digest":"sha256:base","size":1000},{"digest":"sha256:top","size":4000}]}`)
	f.commit(key, "manifest-sha256:m", "sha256:m", manifest, 0, time.Now())
	f.commit(key, "", "sha256:base", nil, 1000, time.Now().Add(-time.Hour))
	small := []byte("\x1f\x8b\x08\x00 a small gzip layer")
	f.commit(key, "", "sha256:small", small, 0, time.Now())
	f.ingest(key, "layer-sha256:top", "sha256:top", 1500, 4000)
	f.ingest("", "layer-sha256:other", "sha256:other", 7777, 9999)
	snap, err := src.Poll(ctx, []string{key})
	if err != nil {
		t.Fatal(err)
	}
	st := snap.Transfers[key]
	want := progress.State{Fetched: int64(len(manifest)) + int64(len(small)), Present: 1000, Blobs: 3,
		Ingests: map[string]int64{"layer-sha256:top": 1500}, Total: int64(len(manifest)) + 100 + 1000 + 4000}
	if st.Fetched != want.Fetched || st.Present != want.Present || st.Blobs != want.Blobs || st.Total != want.Total ||
		len(st.Ingests) != 1 || st.Ingests["layer-sha256:top"] != 1500 {
		t.Errorf("state %+v, want %+v", st, want)
	}
	if snap.Node["layer-sha256:other"] != 7777 || snap.Node["layer-sha256:top"] != 1500 {
		t.Errorf("node ingests %v", snap.Node)
	}
	// The layer completes: seen being fetched, so it counts as fetched
	// whatever its commit time says.
	f.commit(key, "layer-sha256:top", "sha256:top", nil, 4000, time.Now().Add(-time.Hour))
	snap, err = src.Poll(ctx, []string{key})
	if err != nil {
		t.Fatal(err)
	}
	if st := snap.Transfers[key]; st.Fetched != int64(len(manifest))+int64(len(small))+4000 || len(st.Ingests) != 0 || st.Blobs != 4 {
		t.Errorf("after the commit: %+v", st)
	}
	// Reads: the manifest (a peek, then whole) and a peek of the small blob
	// it does not name; the layers it names are not read.
	f.mu.Lock()
	reads := f.reads
	f.mu.Unlock()
	if reads != 3 {
		t.Errorf("%d reads of blobs, want 3", reads)
	}

	// Not pulled: the lease stays for the next pass, which reuses it.
	if err := src.Release(ctx, key, pull.TransferFailed); err != nil {
		t.Fatal(err)
	}
	if again, fresh, err := src.Open(ctx, image); err != nil || again != key || fresh {
		t.Fatalf("reopen: %q, fresh %v, %v; want the same lease, not fresh", again, fresh, err)
	}
	f.mu.Lock()
	deleted := len(f.deleted)
	f.mu.Unlock()
	if deleted != 0 {
		t.Errorf("a young lease was replaced on reopen")
	}
	// Pulled: the lease goes.
	if err := src.Release(ctx, key, pull.TransferPulled); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	_, still := f.leases[key]
	f.mu.Unlock()
	if still {
		t.Error("the lease of a pulled image was kept")
	}
}

func TestContainerdSourceReplacesAnOldLease(t *testing.T) {
	f, path := startFake(t)
	src := progress.NewContainerd(dial(t, path), "")
	id := progress.LeaseID("", "busybox")
	f.mu.Lock()
	f.leases[id] = &leasesapi.Lease{ID: id, CreatedAt: timestamppb.New(time.Now().Add(-13 * time.Hour))}
	f.mu.Unlock()
	if _, fresh, err := src.Open(context.Background(), "busybox"); err != nil || !fresh {
		t.Fatalf("Open: fresh %v, %v", fresh, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.deleted) != 1 || f.leases[id] == nil || time.Since(f.leases[id].GetCreatedAt().AsTime()) > time.Minute {
		t.Errorf("deleted %v, lease %v: want the half-expired lease replaced by a new one", f.deleted, f.leases[id])
	}
}

func TestContainerdSourceOnARuntimeWithoutTheAPI(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cri.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer() // serves nothing: every call is Unimplemented
	go s.Serve(l)         //nolint:errcheck // ends with Stop
	defer s.Stop()
	src := progress.NewContainerd(dial(t, path), "")
	_, _, err = src.Open(context.Background(), "busybox")
	if err == nil || !strings.Contains(err.Error(), "lease") || !errors.Is(err, progress.ErrUnsupported) {
		t.Errorf("Open = %v, want ErrUnsupported", err)
	}
}

// A failed image's lease that holds nothing (the tag is missing) goes; one
// that holds partial blobs stays for the next pass.
func TestContainerdSourceReleasesAnEmptyLeaseOfAFailedImage(t *testing.T) {
	f, path := startFake(t)
	src := progress.NewContainerd(dial(t, path), "")
	ctx := context.Background()
	empty, _, err := src.Open(ctx, "registry.example/missing:1")
	if err != nil {
		t.Fatal(err)
	}
	partial, _, err := src.Open(ctx, "registry.example/big:1")
	if err != nil {
		t.Fatal(err)
	}
	f.ingest(partial, "layer-sha256:a", "sha256:a", 5<<20, 60<<20)
	for _, key := range []string{empty, partial} {
		if err := src.Release(ctx, key, pull.TransferFailed); err != nil {
			t.Fatal(err)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.leases[empty]; ok {
		t.Error("the empty lease of a failed image was kept")
	}
	if _, ok := f.leases[partial]; !ok {
		t.Error("the lease holding a partial blob was deleted")
	}
}

// dial connects to the fake's socket as the agent's one runtime connection
// (cri.Client.Conn) would.
func dial(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// Prune deletes this instance's leases of images no longer in the list, and
// only those: not a listed image's, not one being followed, not another
// instance's, not a lease of someone else's naming.
func TestContainerdSourcePrunesLeasesOfImagesThatLeftTheList(t *testing.T) {
	f, path := startFake(t)
	src := progress.NewContainerd(dial(t, path), "team-a")
	other := progress.NewContainerd(dial(t, path), "team-b")
	ctx := context.Background()
	const kept, gone, following = "registry.example/kept:1", "registry.example/gone:1", "registry.example/following:1"
	for _, img := range []string{kept, gone, following} {
		if _, _, err := src.Open(ctx, img); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := other.Open(ctx, gone); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.leases["foreign"] = &leasesapi.Lease{ID: "foreign", Labels: map[string]string{
		progress.LeaseInstanceLabel: "team-a", progress.LeaseImageLabel: gone}}
	for _, img := range []string{kept, gone} {
		id := progress.LeaseID("team-a", img)
		f.res[id] = []*leasesapi.Resource{{ID: "sha256:partial", Type: "content"}}
	}
	f.mu.Unlock()
	// kept and gone failed in an earlier pass (their leases stay for a
	// resume); following is being pulled now.
	for _, img := range []string{kept, gone} {
		if err := src.Release(ctx, progress.LeaseID("team-a", img), pull.TransferFailed); err != nil {
			t.Fatal(err)
		}
	}

	pruned, err := src.Prune(ctx, []string{kept})
	if err != nil {
		t.Fatal(err)
	}
	if len(pruned) != 1 || pruned[0] != gone {
		t.Errorf("pruned %v, want [%s]", pruned, gone)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, want := range map[string]bool{
		progress.LeaseID("team-a", kept): true, progress.LeaseID("team-a", gone): false,
		progress.LeaseID("team-a", following): true, progress.LeaseID("team-b", gone): true, "foreign": true,
	} {
		if _, ok := f.leases[id]; ok != want {
			t.Errorf("lease %s there: %v, want %v", id, ok, want)
		}
	}
}

// An image that failed for good (done, not pulled) loses its lease even when
// it holds partial blobs: they would only hold disk space.
func TestContainerdSourceReleasesWhatAFailureForGoodKept(t *testing.T) {
	f, path := startFake(t)
	src := progress.NewContainerd(dial(t, path), "")
	ctx := context.Background()
	key, _, err := src.Open(ctx, "busybox")
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.res[key] = []*leasesapi.Resource{{ID: "sha256:partial", Type: "content"}}
	f.mu.Unlock()
	if err := src.Release(ctx, key, pull.TransferFailedForGood); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.leases[key]; ok {
		t.Errorf("lease %s kept after a failure for good", key)
	}
}

// Two processes of one instance on a node (run, and a fetch beside it) share
// the lease of an image both pull. The one that did not make it never deletes
// it while the image is not present, whether its own pull failed for good,
// failed leaving nothing, or the image is not in its list; once the image is
// present, either deletes it.
func TestContainerdSourceLeavesAnotherProcesssLease(t *testing.T) {
	f, path := startFake(t)
	run := progress.NewContainerd(dial(t, path), "team-a")
	fetch := progress.NewContainerd(dial(t, path), "team-a")
	run.Owner, fetch.Owner = "agent-pod/1", "init-container/1"
	ctx := context.Background()
	const img = "registry.example/app:1"
	key, fresh, err := run.Open(ctx, img)
	if err != nil || !fresh {
		t.Fatalf("run's Open: fresh %v, %v", fresh, err)
	}
	for _, end := range []pull.TransferEnd{pull.TransferFailedForGood, pull.TransferFailed} {
		if k, fresh, err := fetch.Open(ctx, img); err != nil || fresh || k != key {
			t.Fatalf("fetch's Open: %s fresh %v, %v; want run's lease reused", k, fresh, err)
		}
		if err := fetch.Release(ctx, key, end); err != nil {
			t.Fatal(err)
		}
	}
	if pruned, err := fetch.Prune(ctx, []string{"registry.example/other:1"}); err != nil || len(pruned) != 0 {
		t.Errorf("fetch's Prune deleted %v (%v): run made that lease a moment ago", pruned, err)
	}
	f.mu.Lock()
	_, kept := f.leases[key]
	owner := f.leases[key].GetLabels()[progress.LeaseOwnerLabel]
	f.mu.Unlock()
	if !kept || owner != run.Owner {
		t.Fatalf("run's lease there %v with owner %q: deleted by the fetch beside it", kept, owner)
	}
	if _, _, err := fetch.Open(ctx, img); err != nil {
		t.Fatal(err)
	}
	if err := fetch.Release(ctx, key, pull.TransferPulled); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.leases[key]; ok {
		t.Errorf("the lease of a pulled image was kept")
	}
}

// Held sums this instance's leases: committed blobs by their size, partial
// downloads by their offset, a blob two leases hold once, another instance's
// leases not at all.
func TestContainerdSourceHeldBytes(t *testing.T) {
	f, path := startFake(t)
	src := progress.NewContainerd(dial(t, path), "team-a")
	other := progress.NewContainerd(dial(t, path), "team-b")
	ctx := context.Background()
	if n, err := src.Held(ctx); err != nil || n != 0 {
		t.Fatalf("Held with no lease = %d, %v; want 0", n, err)
	}
	a, _, err := src.Open(ctx, "registry.example/a:1")
	if err != nil {
		t.Fatal(err)
	}
	b, _, err := src.Open(ctx, "registry.example/b:1")
	if err != nil {
		t.Fatal(err)
	}
	o, _, err := other.Open(ctx, "registry.example/a:1")
	if err != nil {
		t.Fatal(err)
	}
	f.commit(a, "ref-1", "sha256:one", nil, 1000, time.Now())
	f.commit(b, "ref-1", "sha256:one", nil, 1000, time.Now())
	f.ingest(b, "ref-2", "sha256:two", 300, 5000)
	f.commit(o, "ref-3", "sha256:three", nil, 7000, time.Now())
	n, err := src.Held(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1300 {
		t.Errorf("Held = %d, want 1300 (one shared 1000-byte blob, 300 bytes of a partial one)", n)
	}
}

// Trim bounds what the leases of failed images keep: oldest first until what
// is left is within the limit; a lease this process follows is never cut.
func TestContainerdSourceTrimsHeldBytesOldestFirst(t *testing.T) {
	f, path := startFake(t)
	src := progress.NewContainerd(dial(t, path), "team-a")
	ctx := context.Background()
	made := time.Now().Add(-time.Hour)
	open := func(img string) string {
		t.Helper()
		key, _, err := src.Open(ctx, img)
		if err != nil {
			t.Fatal(err)
		}
		made = made.Add(time.Minute) // in the order opened
		f.mu.Lock()
		f.leases[key].CreatedAt = timestamppb.New(made)
		f.mu.Unlock()
		return key
	}
	a, b, c := open("registry.example/a:1"), open("registry.example/b:1"), open("registry.example/c:1")
	f.commit(a, "ref-a", "sha256:a", nil, 1000, time.Now())
	f.commit(b, "ref-b", "sha256:b", nil, 2000, time.Now())
	f.ingest(b, "ref-b2", "sha256:b2", 300, 5000)
	f.commit(c, "ref-c", "sha256:c", nil, 500, time.Now())
	for _, k := range []string{a, b, c} { // failed, kept for a resume
		if err := src.Release(ctx, k, pull.TransferFailed); err != nil {
			t.Fatal(err)
		}
	}
	followed := open("registry.example/d:1")
	f.commit(followed, "ref-d", "sha256:d", nil, 100, time.Now())

	trimmed, left, err := src.Trim(ctx, 3000)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(trimmed, []string{"registry.example/a:1"}) || left != 2900 {
		t.Errorf("Trim(3000) let go of %v, %d bytes left; want the oldest, a, and 2900 left of 3900", trimmed, left)
	}
	trimmed, left, err = src.Trim(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(trimmed, []string{"registry.example/b:1", "registry.example/c:1"}) || left != 100 {
		t.Errorf("Trim(0) let go of %v, %d bytes left; want b and c, and the followed d's 100 bytes kept", trimmed, left)
	}
	if n, err := src.Held(ctx); err != nil || n != 100 {
		t.Errorf("Held after trimming = %d, %v; want 100", n, err)
	}
}
