package collector

import (
	"fmt"
	"testing"

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
