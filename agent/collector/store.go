// Package collector is the cluster-wide results collector: a gRPC server that
// node agents send every pull attempt to, and an HTTP server that serves the
// collected attempts as JSON (/metrics, in the reference tool's format), a
// per-node and per-image summary (/summary) and its own Prometheus metrics
// (/prometheus).
package collector

import (
	"slices"
	"sort"
	"sync"

	"google.golang.org/protobuf/proto"

	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

// Defaults of Limits.
const (
	DefaultMaxResults = 100000
	// DefaultMaxBytes keeps the results' heap well inside the Deployment's
	// 256 MiB limit: the garbage collector lets the heap grow to about twice
	// what is live, and a page being read adds its own.
	DefaultMaxBytes = 64 << 20
	// DefaultMaxNodeBytes is one node's share: about 12000 typical attempts,
	// and at most an eighth of DefaultMaxBytes, so a node that sends too much
	// (or forges from a stolen agent token) evicts its own records first.
	DefaultMaxNodeBytes = 8 << 20
)

// recordOverhead is what the heap holds for a result beyond its wire size:
// the decoded message struct, string headers, the store's entry and its id
// index: about 330 bytes measured in TestRecordOverheadCoversTheHeap, with
// room for the maps growing in steps.
const recordOverhead = 512

// Limits bound a Store. Zero fields take their defaults.
type Limits struct {
	// MaxResults bounds how many results are held.
	MaxResults int
	// MaxBytes bounds the accounted size of all results held; MaxNodeBytes
	// that of one node's. A result's accounted size is its wire size plus a
	// fixed overhead for its in-memory representation.
	MaxBytes, MaxNodeBytes int64
}

func (l *Limits) setDefaults() {
	if l.MaxResults <= 0 {
		l.MaxResults = DefaultMaxResults
	}
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxNodeBytes <= 0 {
		l.MaxNodeBytes = DefaultMaxNodeBytes
	}
	l.MaxNodeBytes = min(l.MaxNodeBytes, l.MaxBytes)
}

// Size is a result's accounted size.
func Size(r *resultsv1.Result) int64 { return int64(proto.Size(r)) + recordOverhead }

type entry struct {
	seq  uint64 // arrival order; the continue token of pages
	r    *resultsv1.Result
	size int64
	dead bool // evicted; still in the slices until they are compacted
}

// fifo is entries in arrival order with the dead ones removed lazily.
type fifo struct {
	items []*entry
	dead  int
}

func (f *fifo) push(e *entry) { f.items = append(f.items, e) }

// oldest returns the oldest live entry, dropping dead ones from the front.
func (f *fifo) oldest() *entry {
	for len(f.items) > 0 && f.items[0].dead {
		f.items[0] = nil
		f.items = f.items[1:]
		f.dead--
	}
	if len(f.items) == 0 {
		return nil
	}
	return f.items[0]
}

// killed records that one of the entries died; the slice is compacted when
// most of it is dead, so memory follows the live entries.
func (f *fifo) killed() {
	f.dead++
	if f.dead > len(f.items)/2 {
		f.items = slices.DeleteFunc(slices.Clone(f.items), func(e *entry) bool { return e.dead })
		f.dead = 0
	}
}

type nodeShare struct {
	fifo
	bytes int64
}

// Store holds results in arrival order within Limits: when a bound would be
// passed, the oldest results (of the sending node first, for its share) are
// evicted and counted. Attempt ids are unique in the store: a result whose
// id is held is a duplicate.
type Store struct {
	lim Limits

	mu      sync.Mutex
	seq     uint64
	all     fifo
	nodes   map[string]*nodeShare
	ids     map[string]*entry
	n       int
	bytes   int64
	evicted uint64
}

// NewStore returns a store that holds at most max results (DefaultMaxResults
// when max <= 0) and the default byte bounds.
func NewStore(max int) *Store { return NewBoundedStore(Limits{MaxResults: max}) }

// NewBoundedStore returns a store within lim.
func NewBoundedStore(lim Limits) *Store {
	lim.setDefaults()
	return &Store{lim: lim, nodes: map[string]*nodeShare{}, ids: map[string]*entry{}}
}

// Limits returns the store's bounds, defaults applied.
func (s *Store) Limits() Limits { return s.lim }

// AddStats is the outcome of one Add.
type AddStats struct {
	Added      int
	Duplicates int
	Evicted    int // older results dropped to make room
	Invalid    int // no attempt id, or larger than a node's share
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
		size := Size(r)
		if id == "" || size > s.lim.MaxNodeBytes {
			st.Invalid++
			continue
		}
		st.Acknowledged = append(st.Acknowledged, id)
		if _, ok := s.ids[id]; ok {
			st.Duplicates++
			continue
		}
		// The node's own oldest go first, then the store's: a node that sends
		// more than its share never pushes the other nodes' results out.
		for n := s.nodes[r.GetNode()]; n != nil && n.bytes+size > s.lim.MaxNodeBytes; n = s.nodes[r.GetNode()] {
			s.evict(n.oldest())
			st.Evicted++
		}
		for s.n+1 > s.lim.MaxResults || s.bytes+size > s.lim.MaxBytes {
			s.evict(s.all.oldest())
			st.Evicted++
		}
		node := s.nodes[r.GetNode()]
		if node == nil {
			node = &nodeShare{}
			s.nodes[r.GetNode()] = node
		}
		s.seq++
		e := &entry{seq: s.seq, r: r, size: size}
		s.all.push(e)
		node.push(e)
		node.bytes += size
		s.ids[id] = e
		s.n++
		s.bytes += size
		st.Added++
	}
	return st
}

// evict removes e, which is live, from every index.
func (s *Store) evict(e *entry) {
	e.dead = true
	s.n--
	s.bytes -= e.size
	s.evicted++
	delete(s.ids, e.r.GetAttemptId())
	s.all.killed()
	node := s.nodes[e.r.GetNode()]
	node.bytes -= e.size
	node.killed()
	if node.oldest() == nil {
		delete(s.nodes, e.r.GetNode())
	}
	e.r = nil
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

// List returns every matching result in arrival order. The results are
// shared: callers must not modify them.
func (s *Store) List(f Filter) []*resultsv1.Result {
	page, _ := s.Page(f, 0, s.lim.MaxResults)
	return page
}

// Page returns up to limit matching results that arrived after the one of
// token after (0: from the oldest), in arrival order, and the token of the
// next page (0 when there is none). Results evicted between two pages are
// not seen; none is seen twice. The results are shared: callers must not
// modify them.
func (s *Store) Page(f Filter, after uint64, limit int) (page []*resultsv1.Result, next uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	items := s.all.items
	var last uint64
	for i := sort.Search(len(items), func(i int) bool { return items[i].seq > after }); i < len(items); i++ {
		e := items[i]
		if e.dead || !f.match(e.r) {
			continue
		}
		if len(page) == limit {
			return page, last // another one matches: there is a next page
		}
		page = append(page, e.r)
		last = e.seq
	}
	return page, 0
}

// Len returns the number of results held.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// Bytes returns the accounted size of the results held.
func (s *Store) Bytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bytes
}

// NodeBytes returns the accounted size of one node's results.
func (s *Store) NodeBytes(node string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.nodes[node]; n != nil {
		return n.bytes
	}
	return 0
}

// Evicted returns how many results were dropped to respect the bounds.
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
