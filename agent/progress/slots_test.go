package progress_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// AddResource adds a resource to a lease, as containerd does (the promotion
// of a failed image's part of a slot uses it).
func (f leasesServer) AddResource(ctx context.Context, r *leasesapi.AddResourceRequest) (*emptypb.Empty, error) {
	if err := namespace(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.leases[r.GetID()]; !ok {
		return nil, status.Error(codes.NotFound, "no lease")
	}
	for _, have := range f.res[r.GetID()] {
		if have.GetID() == r.GetResource().GetID() && have.GetType() == r.GetResource().GetType() {
			return &emptypb.Empty{}, nil
		}
	}
	f.res[r.GetID()] = append(f.res[r.GetID()], r.GetResource())
	return &emptypb.Empty{}, nil
}

// slotLeases returns the IDs of the fake's slot leases.
func (f *fakeContainerd) slotLeases() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []string
	for id, l := range f.leases {
		if l.GetLabels()[progress.LeaseSlotLabel] != "" {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

func (f *fakeContainerd) resources(lease string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, r := range f.res[lease] {
		out = append(out, r.GetType()+" "+r.GetID())
	}
	slices.Sort(out)
	return out
}

func slotSource(t *testing.T, instance string) (*fakeContainerd, *progress.Containerd, *callLog) {
	t.Helper()
	f, sock := startFake(t)
	conn, calls := countingDial(t, sock)
	src := progress.NewContainerd(conn, instance)
	src.Owner = "me"
	src.Slots = true
	return f, src, calls
}

// Small images pulled one after another through the Watcher share one slot
// lease: the pass lists the leases once and makes the slot once; the images
// cost no call of their own, and Drain deletes the slot at the end.
func TestSlotsSmallImagesCostNoCallOfTheirOwn(t *testing.T) {
	f, src, calls := slotSource(t, "team-a")
	w := &progress.Watcher{Source: src, Interval: time.Hour}
	for i := range 5 {
		image := "registry.example/small:" + string(rune('a'+i))
		tr := w.Follow(context.Background(), image)
		if tr == nil {
			t.Fatalf("Follow(%s) returned nil", image)
		}
		a := tr.Watch(1, 20*time.Second)
		a.Stop()
		tr.Close(pull.TransferPulled)
	}
	if want := []string{"Leases.List", "Leases.Create"}; !slices.Equal(calls.get(), want) {
		t.Errorf("calls for 5 small images %v, want %v", calls.get(), want)
	}
	if n := len(f.slotLeases()); n != 1 {
		t.Errorf("%d slot leases, want 1", n)
	}
	if err := src.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if l := f.slotLeases(); len(l) != 0 {
		t.Errorf("slot leases %v after Drain", l)
	}
}

// Concurrent images each get a slot of their own; a slot is lent again only
// once given back.
func TestSlotsConcurrentImagesGetTheirOwnSlot(t *testing.T) {
	_, src, _ := slotSource(t, "team-a")
	ctx := context.Background()
	a, _, err := src.Open(ctx, "a:1")
	if err != nil {
		t.Fatal(err)
	}
	b, _, err := src.Open(ctx, "b:1")
	if err != nil {
		t.Fatal(err)
	}
	if a == b || !strings.HasPrefix(a, progress.LeasePrefix) {
		t.Fatalf("slots %q and %q, want two of the agent's leases", a, b)
	}
	if err := src.Release(ctx, a, pull.TransferPulled); err != nil {
		t.Fatal(err)
	}
	if c, _, err := src.Open(ctx, "c:1"); err != nil || c != a {
		t.Errorf("Open after a slot was given back = %q, %v; want that slot %q", c, err, a)
	}
}

// A failed image's part of a slot moves to its own lease, labelled as Open
// would label it: its open ingest and the blobs committed since it took the
// slot, not the blobs an earlier image left. The slot goes; the next pass
// resumes from the image's lease (Open reuses it, not fresh).
func TestSlotsFailedImageMovesWhatItFetchedToItsOwnLease(t *testing.T) {
	f, src, _ := slotSource(t, "team-a")
	ctx := context.Background()
	slot, fresh, err := src.Open(ctx, "first:1")
	if err != nil || !fresh {
		t.Fatalf("Open = %q, %v, %v", slot, fresh, err)
	}
	f.commit(slot, "layer-sha256:old", "sha256:old", nil, 1000, time.Now())
	if err := src.Release(ctx, slot, pull.TransferPulled); err != nil {
		t.Fatal(err)
	}
	const image = "registry.example/big:1"
	again, _, err := src.Open(ctx, image)
	if err != nil || again != slot {
		t.Fatalf("Open = %q, %v; want the slot %q again", again, err, slot)
	}
	time.Sleep(time.Millisecond) // commits below are after the loan began
	f.commit(slot, "manifest-sha256:m", "sha256:m", []byte(`{"config":{"size":1},"layers":[{"size":9000}]}`), 0, time.Now())
	f.ingest(slot, "layer-sha256:big", "sha256:big", 5*mib, 20*mib)
	snap, err := src.Poll(ctx, []string{slot})
	if err != nil {
		t.Fatal(err)
	}
	if st := snap.Transfers[slot]; st.Blobs != 1 || st.Ingests["layer-sha256:big"] != 5*mib || st.Present != 0 {
		t.Errorf("state %+v: want the manifest and the ingest, not the earlier image's blob", st)
	}
	if err := src.Release(ctx, slot, pull.TransferFailed); err != nil {
		t.Fatal(err)
	}
	own := progress.LeaseID("team-a", image)
	want := []string{"content sha256:m", "ingests layer-sha256:big"}
	if got := f.resources(own); !slices.Equal(got, want) {
		t.Errorf("the image's own lease holds %v, want %v", got, want)
	}
	f.mu.Lock()
	l := f.leases[own]
	f.mu.Unlock()
	if l.GetLabels()[progress.LeaseImageLabel] != image || l.GetLabels()[progress.LeaseInstanceLabel] != "team-a" ||
		l.GetLabels()[progress.LeaseOwnerLabel] != "me" || l.GetLabels()["containerd.io/gc.expire"] == "" {
		t.Errorf("labels of the image's own lease %v", l.GetLabels())
	}
	if s := f.slotLeases(); len(s) != 0 {
		t.Errorf("slot leases %v left after the promotion", s)
	}
	key, fresh, err := src.Open(ctx, image)
	if err != nil || key != own || fresh {
		t.Errorf("reopen = %q, fresh %v, %v; want the image's own lease, not fresh", key, fresh, err)
	}
}

// An image that failed for good deletes its slot (what it fetched would only
// hold disk); one that failed having fetched nothing gives it back.
func TestSlotsFailedImagesWithoutAResume(t *testing.T) {
	f, src, _ := slotSource(t, "team-a")
	ctx := context.Background()
	slot, _, err := src.Open(ctx, "gone:1")
	if err != nil {
		t.Fatal(err)
	}
	f.ingest(slot, "layer-sha256:x", "sha256:x", 100, 1000)
	if err := src.Release(ctx, slot, pull.TransferFailedForGood); err != nil {
		t.Fatal(err)
	}
	if s := f.slotLeases(); len(s) != 0 {
		t.Errorf("slot leases %v after a failure for good", s)
	}
	empty, _, err := src.Open(ctx, "flaky:1")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Release(ctx, empty, pull.TransferFailed); err != nil {
		t.Fatal(err)
	}
	if s := f.slotLeases(); !slices.Equal(s, []string{empty}) {
		t.Errorf("slot leases %v, want the empty one kept for the next image", s)
	}
	f.mu.Lock()
	_, own := f.leases[progress.LeaseID("team-a", "flaky:1")]
	f.mu.Unlock()
	if own {
		t.Error("an image that fetched nothing got a lease of its own")
	}
}

// Prune deletes a slot nobody can be using (its maker made it more than
// StaleAfter ago and ended without draining it), not a young slot of another
// process (a fetch beside run may be pulling under it), nor one lent here.
func TestSlotsPruneDeletesStaleSlots(t *testing.T) {
	f, src, _ := slotSource(t, "team-a")
	ctx := context.Background()
	lent, _, err := src.Open(ctx, "a:1")
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	for id, age := range map[string]time.Duration{"image-prefetcher-slot-stale": 2 * time.Hour, "image-prefetcher-slot-young": time.Minute} {
		f.leases[id] = &leasesapi.Lease{ID: id, CreatedAt: timestamppb.New(time.Now().Add(-age)),
			Labels: map[string]string{progress.LeaseSlotLabel: "true", progress.LeaseInstanceLabel: "team-a", progress.LeaseOwnerLabel: "other"}}
	}
	f.mu.Unlock()
	if _, err := src.Prune(ctx, []string{"a:1"}); err != nil {
		t.Fatal(err)
	}
	want := []string{"image-prefetcher-slot-young", lent}
	slices.Sort(want)
	if got := f.slotLeases(); !slices.Equal(got, want) {
		t.Errorf("slot leases after Prune %v, want %v", got, want)
	}
}
