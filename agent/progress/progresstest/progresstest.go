// Package progresstest is a scripted progress.Source for tests: the state of
// each image's transfer and of the node's ingests is whatever the test sets,
// read by the Watcher at its polls.
//
//	src := progresstest.New()
//	w := &progress.Watcher{Source: src, Interval: 10 * time.Millisecond}
//	src.Grow("busybox", "layer-a", 1<<20) // a byte arrived
package progresstest

import (
	"context"
	"maps"
	"sync"

	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Source is the fake. Keys are the image references.
type Source struct {
	mu       sync.Mutex
	states   map[string]progress.State
	node     map[string]int64
	opened   []string
	released map[string]pull.TransferEnd
	polls    int
	// OpenErr, when set, is returned by Open.
	OpenErr error
}

var _ progress.Source = (*Source)(nil)

// New returns a Source where every image starts with nothing fetched.
func New() *Source {
	return &Source{states: map[string]progress.State{}, node: map[string]int64{}, released: map[string]pull.TransferEnd{}}
}

type boundKey struct{}

// Open records the call and uses the image as its key; an image whose state
// a test set before is not fresh.
func (s *Source) Open(_ context.Context, image string) (string, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.opened = append(s.opened, image)
	if s.OpenErr != nil {
		return "", false, s.OpenErr
	}
	_, known := s.states[image]
	return image, !known, nil
}

// Bind puts the key in ctx, where Bound finds it.
func (s *Source) Bind(ctx context.Context, key string) context.Context {
	return context.WithValue(ctx, boundKey{}, key)
}

// Bound returns the key ctx was bound to.
func Bound(ctx context.Context) string {
	k, _ := ctx.Value(boundKey{}).(string)
	return k
}

// Poll returns the states set for keys.
func (s *Source) Poll(_ context.Context, keys []string) (progress.Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.polls++
	snap := progress.Snapshot{Transfers: map[string]progress.State{}, Node: maps.Clone(s.node)}
	for _, k := range keys {
		st := s.states[k]
		st.Ingests = maps.Clone(st.Ingests)
		snap.Transfers[k] = st
	}
	return snap, nil
}

// Release records how the transfer ended.
func (s *Source) Release(_ context.Context, key string, end pull.TransferEnd) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.released[key] = end
	return nil
}

// Update changes the state of image's transfer.
func (s *Source) Update(image string, f func(*progress.State)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.states[image]
	if st.Ingests == nil {
		st.Ingests = map[string]int64{}
	}
	f(&st)
	s.states[image] = st
}

// Grow writes n more bytes to image's ingest ref (opening it), and to the
// node's ingest of the same ref.
func (s *Source) Grow(image, ref string, n int64) {
	s.Update(image, func(st *progress.State) { st.Ingests[ref] += n })
	s.GrowNode(ref, n)
}

// GrowNode writes n more bytes to an ingest of the node that no followed
// image owns (another pull).
func (s *Source) GrowNode(ref string, n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.node[ref] += n
}

// Commit turns image's ingest ref into a fetched blob.
func (s *Source) Commit(image, ref string) {
	var n int64
	s.Update(image, func(st *progress.State) {
		n = st.Ingests[ref]
		delete(st.Ingests, ref)
		st.Fetched += n
		st.Blobs++
	})
	s.mu.Lock()
	delete(s.node, ref)
	s.mu.Unlock()
}

// Opened returns the images of every Open call, in order.
func (s *Source) Opened() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.opened...)
}

// Released returns whether image was released and how its transfer ended.
func (s *Source) Released(image string) (released bool, end pull.TransferEnd) {
	s.mu.Lock()
	defer s.mu.Unlock()
	end, released = s.released[image]
	return released, end
}

// Polls counts the Poll calls.
func (s *Source) Polls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.polls
}
