// Package collector is the cluster-wide results collector: a gRPC server that
// node agents send every pull attempt to, and an HTTP server that serves the
// collected attempts as JSON (/metrics, in the reference tool's format), a
// per-node and per-image summary (/summary) and its own Prometheus metrics
// (/prometheus).
package collector

import (
	"slices"
	"sync"

	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

// DefaultMaxResults bounds the results held in memory.
const DefaultMaxResults = 100000

// Store holds results in arrival order, at most a fixed number: when it is
// full, the oldest result is evicted (and counted) to make room. Attempt ids
// are unique in the store: a result whose id is held is a duplicate.
type Store struct {
	max int

	mu      sync.Mutex
	ring    []*resultsv1.Result // ring buffer, oldest at head
	head    int
	n       int
	ids     map[string]struct{}
	evicted uint64
}

// NewStore returns a store that holds at most max results (DefaultMaxResults
// when max <= 0).
func NewStore(max int) *Store {
	if max <= 0 {
		max = DefaultMaxResults
	}
	return &Store{max: max, ids: map[string]struct{}{}}
}

// AddStats is the outcome of one Add.
type AddStats struct {
	Added      int
	Duplicates int
	Evicted    int // older results dropped to make room
	Invalid    int // no attempt id
	// Acknowledged lists the ids held after the call (added or duplicates).
	Acknowledged []string
}

// Add stores the results whose attempt ids are new.
func (s *Store) Add(results []*resultsv1.Result) AddStats {
	var st AddStats
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range results {
		id := r.GetAttemptId()
		if id == "" {
			st.Invalid++
			continue
		}
		st.Acknowledged = append(st.Acknowledged, id)
		if _, ok := s.ids[id]; ok {
			st.Duplicates++
			continue
		}
		if s.n == s.max {
			old := s.ring[s.head]
			delete(s.ids, old.GetAttemptId())
			s.ring[s.head] = nil
			s.head = (s.head + 1) % s.max
			s.n--
			s.evicted++
			st.Evicted++
		}
		if len(s.ring) < s.max && s.head == 0 && s.n == len(s.ring) {
			s.ring = append(s.ring, r) // grow lazily: most collectors hold far fewer than max
		} else {
			s.ring[(s.head+s.n)%s.max] = r
		}
		s.n++
		s.ids[id] = struct{}{}
		st.Added++
	}
	return st
}

// Filter selects results; empty fields match everything.
type Filter struct {
	Node, Image, Instance string
}

func (f Filter) match(r *resultsv1.Result) bool {
	return (f.Node == "" || r.GetNode() == f.Node) &&
		(f.Image == "" || r.GetImage() == f.Image) &&
		(f.Instance == "" || r.GetInstance() == f.Instance)
}

// List returns the matching results in arrival order. The results are shared:
// callers must not modify them.
func (s *Store) List(f Filter) []*resultsv1.Result {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*resultsv1.Result, 0, s.n)
	for i := range s.n {
		r := s.ring[(s.head+i)%len(s.ring)]
		if f.match(r) {
			out = append(out, r)
		}
	}
	return out
}

// Len returns the number of results held.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// Evicted returns how many results were dropped to respect the bound.
func (s *Store) Evicted() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.evicted
}

// Has reports whether the store holds a result with this attempt id.
func (s *Store) Has(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.ids[id]
	return ok
}

// percentile returns the nearest-rank p-th percentile (0 < p <= 100) of
// sorted values.
func percentile(sorted []uint64, p int) uint64 {
	if len(sorted) == 0 {
		return 0
	}
	rank := (p*len(sorted) + 99) / 100 // ceil(p/100 * n)
	return sorted[max(rank, 1)-1]
}

// Summary aggregates results of one node or one image.
type Summary struct {
	Attempts      int    `json:"attempts"`
	Failures      int    `json:"failures"`
	P50DurationMs uint64 `json:"p50_duration_ms"`
	MaxDurationMs uint64 `json:"max_duration_ms"`
	// Bytes adds the sizes of the successful attempts.
	Bytes uint64 `json:"bytes"`
	// FetchedBytes adds what every attempt fetched, failed ones included:
	// more than Bytes means bytes fetched twice or for images that failed.
	FetchedBytes uint64 `json:"fetched_bytes"`
}

// Summaries are the /summary document.
type Summaries struct {
	Nodes  map[string]Summary `json:"nodes"`
	Images map[string]Summary `json:"images"`
}

// Summarize aggregates results per node and per image.
func Summarize(results []*resultsv1.Result) Summaries {
	group := func(key func(*resultsv1.Result) string) map[string]Summary {
		durations := map[string][]uint64{}
		out := map[string]Summary{}
		for _, r := range results {
			k := key(r)
			s := out[k]
			s.Attempts++
			if r.GetOutcome() == resultsv1.Outcome_OUTCOME_FAILED || r.GetError() != "" {
				s.Failures++
			} else {
				s.Bytes += r.GetSizeBytes()
			}
			s.FetchedBytes += r.GetFetchedBytes()
			s.MaxDurationMs = max(s.MaxDurationMs, r.GetDurationMs())
			out[k] = s
			durations[k] = append(durations[k], r.GetDurationMs())
		}
		for k, d := range durations {
			slices.Sort(d)
			s := out[k]
			s.P50DurationMs = percentile(d, 50)
			out[k] = s
		}
		return out
	}
	return Summaries{
		Nodes:  group((*resultsv1.Result).GetNode),
		Images: group((*resultsv1.Result).GetImage),
	}
}
