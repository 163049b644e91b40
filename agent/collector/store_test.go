package collector

import (
	"fmt"
	"runtime"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

func r(id, node, image string, ms uint64, failed bool) *resultsv1.Result {
	out := &resultsv1.Result{AttemptId: id, Node: node, Image: image, DurationMs: ms, SizeBytes: 100,
		Outcome: resultsv1.Outcome_OUTCOME_SUCCEEDED, Instance: "inst"}
	if failed {
		out.Outcome, out.Error, out.Reason, out.SizeBytes = resultsv1.Outcome_OUTCOME_FAILED, "boom", "Timeout", 0
	}
	return out
}

func TestStoreIgnoresDuplicatesAndRejectsEmptyIDs(t *testing.T) {
	t.Parallel()
	s := NewStore(10)
	st := s.Add([]*resultsv1.Result{r("a", "n1", "i1", 1, false), r("b", "n1", "i1", 1, true), r("", "n1", "i1", 1, false)})
	if st.Added != 2 || st.Invalid != 1 || len(st.Acknowledged) != 2 {
		t.Fatalf("first add = %+v", st)
	}
	st = s.Add([]*resultsv1.Result{r("a", "n1", "i1", 1, false), r("c", "n2", "i1", 1, false)})
	if st.Added != 1 || st.Duplicates != 1 || len(st.Acknowledged) != 2 {
		t.Fatalf("second add = %+v", st)
	}
	if s.Len() != 3 {
		t.Errorf("len = %d, want 3", s.Len())
	}
}

func TestStoreEvictsOldestAtItsBound(t *testing.T) {
	t.Parallel()
	s := NewStore(3)
	for i := range 7 {
		s.Add([]*resultsv1.Result{r(fmt.Sprint(i), "n", "i", 1, false)})
	}
	var got []string
	for _, x := range s.List(Filter{}) {
		got = append(got, x.GetAttemptId())
	}
	if fmt.Sprint(got) != "[4 5 6]" || s.Evicted() != 4 || s.Len() != 3 {
		t.Errorf("held %v, evicted %d; want [4 5 6], 4", got, s.Evicted())
	}
	if s.Has("0") || !s.Has("6") {
		t.Error("evicted ids are still indexed or held ids are not")
	}
}

func TestFilterAndSummary(t *testing.T) {
	t.Parallel()
	s := NewStore(0)
	s.Add([]*resultsv1.Result{
		r("1", "n1", "a", 10, false), r("2", "n1", "a", 30, true), r("3", "n1", "b", 20, false),
		r("4", "n2", "a", 40, false),
	})
	if got := len(s.List(Filter{Node: "n1"})); got != 3 {
		t.Errorf("node=n1: %d results, want 3", got)
	}
	if got := len(s.List(Filter{Node: "n1", Image: "a"})); got != 2 {
		t.Errorf("node=n1&image=a: %d results, want 2", got)
	}
	if got := len(s.List(Filter{Instance: "other"})); got != 0 {
		t.Errorf("instance=other: %d results, want 0", got)
	}
	sum := Summarize(s.List(Filter{}))
	want := Summary{Attempts: 3, Failures: 1, P50DurationMs: 20, MaxDurationMs: 30, Bytes: 200}
	if sum.Nodes["n1"] != want {
		t.Errorf("node n1 = %+v, want %+v", sum.Nodes["n1"], want)
	}
	want = Summary{Attempts: 3, Failures: 1, P50DurationMs: 30, MaxDurationMs: 40, Bytes: 200}
	if sum.Images["a"] != want {
		t.Errorf("image a = %+v, want %+v", sum.Images["a"], want)
	}
}

func TestPercentile(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		in   []uint64
		p    int
		want uint64
	}{{nil, 50, 0}, {[]uint64{5}, 50, 5}, {[]uint64{1, 2}, 50, 1}, {[]uint64{1, 2, 3}, 50, 2}, {[]uint64{1, 2, 3, 4}, 100, 4}} {
		if got := percentile(c.in, c.p); got != c.want {
			t.Errorf("percentile(%v, %d) = %d, want %d", c.in, c.p, got, c.want)
		}
	}
}

// sized is a result whose accounted size is exactly size bytes.
func sized(id, node string, size int64) *resultsv1.Result {
	out := &resultsv1.Result{AttemptId: id, Node: node}
	out.Image = strings.Repeat("x", int(size-Size(out)))
	for Size(out) > size { // the image's length prefix grew
		out.Image = out.Image[1:]
	}
	return out
}

// The store is bounded in bytes, in total and per node: a node over its share
// evicts its own oldest, never another node's; over the total, the oldest of
// all go.
func TestStoreIsBoundedInBytes(t *testing.T) {
	t.Parallel()
	const rec = 10 << 10
	s := NewBoundedStore(Limits{MaxBytes: 10 * rec, MaxNodeBytes: 4 * rec})
	for i := range 3 {
		s.Add([]*resultsv1.Result{sized(fmt.Sprint("quiet-", i), "quiet", rec)})
	}
	for i := range 20 {
		s.Add([]*resultsv1.Result{sized(fmt.Sprint("loud-", i), "loud", rec)})
	}
	if got := s.NodeBytes("loud"); got != 4*rec {
		t.Errorf("loud node holds %d bytes, want its share %d", got, 4*rec)
	}
	for i := range 3 {
		if !s.Has(fmt.Sprint("quiet-", i)) {
			t.Errorf("quiet-%d was evicted by another node's results", i)
		}
	}
	if !s.Has("loud-19") || s.Has("loud-15") {
		t.Error("the loud node's newest 4 should be held, the older ones not")
	}
	for n := range 5 {
		for i := range 4 {
			s.Add([]*resultsv1.Result{sized(fmt.Sprint("n", n, "-", i), fmt.Sprint("n", n), rec)})
		}
	}
	if s.Bytes() > 10*rec || s.Len() != 10 {
		t.Errorf("store holds %d results, %d bytes; want 10 and at most %d", s.Len(), s.Bytes(), 10*rec)
	}
	if s.Has("quiet-0") || !s.Has("n4-3") {
		t.Error("over the total, the oldest results should go first")
	}
	if st := s.Add([]*resultsv1.Result{sized("huge", "n9", 5*rec)}); st.Invalid != 1 || s.Has("huge") {
		t.Errorf("a result larger than a node's share: %+v, want it refused", st)
	}
	// What the store forgot is forgotten everywhere: no node without results.
	if len(s.nodes) > 10 {
		t.Errorf("store tracks %d nodes for 10 results", len(s.nodes))
	}
}

// Pages follow each other by token: every result once, in arrival order,
// with a filter too, also when results are evicted between two pages.
func TestPages(t *testing.T) {
	t.Parallel()
	s := NewStore(0)
	for i := range 25 {
		node := "even"
		if i%2 == 1 {
			node = "odd"
		}
		s.Add([]*resultsv1.Result{r(fmt.Sprint(i), node, "img", 1, false)})
	}
	var got []string
	var after uint64
	for pages := 0; ; pages++ {
		page, next := s.Page(Filter{Node: "odd"}, after, 5)
		for _, x := range page {
			got = append(got, x.GetAttemptId())
		}
		if next == 0 {
			if pages != 2 {
				t.Errorf("%d pages of 5 for 12 results, want 3", pages+1)
			}
			break
		}
		after = next
	}
	if fmt.Sprint(got) != "[1 3 5 7 9 11 13 15 17 19 21 23]" {
		t.Errorf("pages gave %v", got)
	}
	page, next := s.Page(Filter{}, 0, 25)
	if len(page) != 25 || next != 0 {
		t.Errorf("one page of exactly all: %d results, next %d; want 25 and no next", len(page), next)
	}

	small := NewStore(4)
	for i := range 4 {
		small.Add([]*resultsv1.Result{r(fmt.Sprint(i), "n", "img", 1, false)})
	}
	page, next = small.Page(Filter{}, 0, 2)
	for i := 4; i < 7; i++ { // evicts 0, 1 and 2 while the reader is on page two
		small.Add([]*resultsv1.Result{r(fmt.Sprint(i), "n", "img", 1, false)})
	}
	rest, _ := small.Page(Filter{}, next, 10)
	var ids []string
	for _, x := range append(page, rest...) {
		ids = append(ids, x.GetAttemptId())
	}
	if fmt.Sprint(ids) != "[0 1 3 4 5 6]" {
		t.Errorf("pages across evictions gave %v, want [0 1 3 4 5 6]", ids)
	}
}

// recordOverhead covers what the heap really holds per result beyond its
// wire size (decoded from the wire, as the gRPC server holds them). Not
// parallel: the heap is the process's, and parallel tests allocating during
// the measurement doubled it once (672 bytes per result against 340 alone).
func TestRecordOverheadCoversTheHeap(t *testing.T) {
	const n = 20000
	s := NewBoundedStore(Limits{MaxResults: n, MaxBytes: 1 << 40, MaxNodeBytes: 1 << 40})
	var wireBytes int64
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range n {
		x := r(fmt.Sprintf("%08d-0000-4000-8000-000000000000", i), fmt.Sprint("node-", i%50), fmt.Sprintf("registry.example/team/app-%d:1.%d", i%300, i), uint64(i), i%7 == 0)
		x.ImageRef, x.StartedAt, x.StartedAtUnixNano, x.TimeoutMs = "sha256:"+strings.Repeat("ab", 32), 1700000000, 1700000000123456789, 30000
		b, err := proto.Marshal(x)
		if err != nil {
			t.Fatal(err)
		}
		wireBytes += int64(len(b))
		var decoded resultsv1.Result
		if err := proto.Unmarshal(b, &decoded); err != nil {
			t.Fatal(err)
		}
		s.Add([]*resultsv1.Result{&decoded})
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	heap := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d results: %d bytes on the wire, %d accounted, %d on the heap (%d per result beyond the wire)",
		n, wireBytes, s.Bytes(), heap, (heap-wireBytes)/n)
	if heap > s.Bytes() {
		t.Errorf("the heap holds %d bytes for results accounted as %d: raise recordOverhead", heap, s.Bytes())
	}
	runtime.KeepAlive(s)
}
