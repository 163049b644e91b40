// Package progress follows the bytes of image pulls, so that the pull engine
// can end an attempt for being stuck only when no byte arrived for a while,
// rather than because a fixed time passed while bytes flow, and so that
// people see how far a big pull is.
//
// CRI says nothing about a pull until it ends. containerd's own API, served
// on the same socket, does: each blob a pull fetches is an ingest in its
// content store with the bytes written so far, and the pull runs under a lease
// that holds the ingests and blobs it makes. The Watcher reads those through a
// Source (Containerd, or a fake in tests) every Interval and decides, per
// attempt, whether the pull still moves.
//
// What counts as moving (watch.observe):
//   - a byte written to one of the transfer's ingests, or a blob committed;
//   - while no ingest of the transfer is open but blobs are in (unpacking, or
//     waiting for a blob another pull is fetching): always, so only the
//     attempt's cap bounds that phase;
//   - while none of the transfer's open ingests wrote a byte in this attempt
//     (resolving the reference, or blobs waiting): any ingest on the node
//     moving. containerd 2.x opens a blob's ingest before it waits for a slot
//     of its node-wide download limit, so an untouched ingest may be queued
//     behind other pulls rather than hung; and a pull the runtime did not
//     account to its transfer at all is not cut while the node moves;
//   - before anything moved in the attempt, a hedged call starting: hedging
//     is what gets past a hung resolve.
//
// An ingest that wrote bytes in this attempt and then stops is a stall
// whatever the rest of the node does: it holds its connection and its
// download slot.
//
// Following is lazy, because most pulls are short: an attempt is followed
// (read at the polls, its bytes counted and logged) only from the first poll
// at least one Interval after it started. One poller reads every followed
// attempt of the node at once: one listing of the node's ingests, then each
// followed transfer's resources. An attempt that ends before it is followed
// costs no read at all: it cannot have stalled for a window that is longer
// than the Interval, and its clock runs from its start, so one that is still
// running when it is first read is judged over its whole life. Its bytes are
// not measured (pull.Bytes gives only what it resumed from); the next attempt
// of the image, if any, reads where it starts from.
package progress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// ErrUnsupported is returned by a Source whose runtime cannot show progress at
// all; the Watcher then stops trying.
var ErrUnsupported = errors.New("the runtime does not show pull progress")

// Source reads what the runtime holds of each followed image.
type Source interface {
	// Open prepares following the pulls of image and returns the key its
	// PullImage calls run under (containerd: a lease). fresh says nothing can
	// be held under the key yet (no earlier pass left anything).
	Open(ctx context.Context, image string) (key string, fresh bool, err error)
	// Bind returns ctx for a PullImage call that runs under key.
	Bind(ctx context.Context, key string) context.Context
	// Poll reads the state of the transfers of keys and the node's ingests.
	// With an error, what it could read is still returned: a key missing
	// from Transfers, or a nil Node, was not read.
	Poll(ctx context.Context, keys []string) (Snapshot, error)
	// Release ends following key, whose image's pulls ended as end.
	Release(ctx context.Context, key string, end pull.TransferEnd) error
}

// Snapshot is what a Source read at one moment.
type Snapshot struct {
	// Transfers holds the state of each key asked for.
	Transfers map[string]State
	// Node holds every blob being fetched on the node: bytes written so
	// far, by ingest ref.
	Node map[string]int64
}

// State is what the runtime holds of one image's pulls.
type State struct {
	// Fetched is the size of the blobs the pulls fetched and committed.
	Fetched int64
	// Present is the size of the blobs the pulls found on the node already.
	Present int64
	// Blobs counts the blobs fetched or found.
	Blobs int
	// Ingests are the blobs being fetched: bytes written so far, by ingest
	// ref.
	Ingests map[string]int64
	// Total is the size of the image's content, 0 until its manifest is in.
	Total int64
}

// written is everything the pulls wrote: committed blobs and partial ones.
func (s State) written() int64 {
	n := s.Fetched
	for _, off := range s.Ingests {
		n += off
	}
	return n
}

// Recorder takes the progress metrics (agent/metrics).
type Recorder interface {
	// SetPullBytesInFlight sets the bytes written so far by the pulls in
	// progress.
	SetPullBytesInFlight(n int64)
	// AddFetchedBytes counts bytes that arrived.
	AddFetchedBytes(n int64)
}

// Defaults of the Watcher's fields.
const (
	DefaultInterval = time.Second
	// callTimeout bounds each Source call, so a runtime that hangs cannot
	// hang a watch.
	callTimeout = 5 * time.Second
)

// Watcher follows pulls through a Source. It implements pull.Progress. Set
// the fields, then use it; it polls only while some attempt has run for an
// Interval (see the package comment).
type Watcher struct {
	Source Source
	// Interval between polls, and how long an attempt runs before it is
	// followed; 0 means DefaultInterval.
	Interval time.Duration
	// LogInterval is how often each image in progress gets a log line; 0
	// means none.
	LogInterval time.Duration
	Log         *slog.Logger // nil: no logs
	Recorder    Recorder     // nil: no metrics

	mu        sync.Mutex
	transfers map[string]*transfer // by key
	node      map[string]int64     // the node's ingests at the last poll
	polling   bool
	// broken is set when the source cannot follow at all (e.g. a runtime
	// that does not serve the API): Follow then stops trying.
	broken bool
}

var _ pull.Progress = (*Watcher)(nil)

// Follow implements pull.Progress. It returns nil, after logging why, when
// the source cannot follow the image.
func (w *Watcher) Follow(ctx context.Context, image string) pull.Transfer {
	w.mu.Lock()
	broken := w.broken
	w.mu.Unlock()
	if broken {
		return nil
	}
	octx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	key, fresh, err := w.Source.Open(octx, image)
	if err != nil {
		if errors.Is(err, ErrUnsupported) {
			w.mu.Lock()
			w.broken = true
			w.mu.Unlock()
		}
		w.log().Warn("cannot follow pull progress; its attempts use the escalating timeouts alone", "image", image, "error", err.Error())
		return nil
	}
	t := &transfer{w: w, key: key, image: image}
	if !fresh {
		// What an earlier pass left under the key is resumed, not fetched
		// now.
		snap, _ := w.Source.Poll(octx, []string{key})
		t.state = snap.Transfers[key]
	}
	t.lastLog = time.Now()
	t.lastLogBytes = t.state.written()
	t.counted = t.state.written()
	w.mu.Lock()
	if w.transfers == nil {
		w.transfers = map[string]*transfer{}
	}
	w.transfers[key] = t
	if !w.polling {
		w.polling = true
		go w.poll()
	}
	w.recordLocked()
	w.mu.Unlock()
	return t
}

func (w *Watcher) log() *slog.Logger {
	if w.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return w.Log
}

func (w *Watcher) interval() time.Duration {
	if w.Interval > 0 {
		return w.Interval
	}
	return DefaultInterval
}

// poll runs while some image is open. At each tick it reads only the
// transfers whose attempt has run for an Interval: a pull that ends sooner is
// never read.
func (w *Watcher) poll() {
	iv := w.interval()
	t := time.NewTicker(iv)
	defer t.Stop()
	var due []*transfer
	for now := range t.C {
		w.mu.Lock()
		if len(w.transfers) == 0 {
			w.polling = false
			w.mu.Unlock()
			return
		}
		due = w.dueLocked(now, iv, due[:0])
		w.mu.Unlock()
		if len(due) > 0 {
			w.pollOnce(due)
		}
	}
}

// dueLocked appends to due the transfers to read at now: those whose attempt
// has run for iv. w.mu is held.
func (w *Watcher) dueLocked(now time.Time, iv time.Duration, due []*transfer) []*transfer {
	for _, t := range w.transfers {
		if a := t.att; a != nil && now.Sub(a.start) >= iv {
			due = append(due, t)
		}
	}
	return due
}

// pollOnce reads the due transfers and lets every watched attempt judge the
// change.
func (w *Watcher) pollOnce(due []*transfer) {
	keys := make([]string, len(due))
	for i, t := range due {
		keys[i] = t.key
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	snap, err := w.Source.Poll(ctx, keys)
	cancel()
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	if err != nil {
		// What the runtime did not answer for counts as not moving: a
		// runtime that stopped answering is a stall like any other.
		w.log().Debug("pull progress poll failed", "error", err.Error())
	}
	nodeMoved := false
	if snap.Node != nil {
		nodeMoved = moved(w.node, snap.Node)
		w.node = snap.Node
	}
	for _, t := range due {
		if t.closed {
			// Closed meanwhile: its key may be lent to another image by now.
			continue
		}
		k := t.key
		cur, ok := snap.Transfers[k]
		if !ok {
			cur = t.state
		}
		t.update(now, cur, nodeMoved)
	}
	w.recordLocked()
}

// recordLocked sets the in-flight gauge and counts the bytes that arrived.
func (w *Watcher) recordLocked() {
	if w.Recorder == nil {
		return
	}
	var inFlight int64
	for _, t := range w.transfers {
		inFlight += t.state.written()
		if n := t.state.written(); n > t.counted {
			w.Recorder.AddFetchedBytes(n - t.counted)
			t.counted = n
		}
	}
	w.Recorder.SetPullBytesInFlight(inFlight)
}

// moved reports whether any ingest of cur wrote bytes since prev, or was
// committed (it left the list).
func moved(prev, cur map[string]int64) bool {
	for ref, off := range cur {
		if p, ok := prev[ref]; ok && off > p || !ok && off > 0 {
			return true
		}
	}
	for ref := range prev {
		if _, ok := cur[ref]; !ok {
			return true
		}
	}
	return false
}

// transfer is one followed image. Its fields are guarded by w.mu.
type transfer struct {
	w            *Watcher
	key, image   string
	state        State
	att          *watch // the attempt being watched, nil between attempts
	lastLog      time.Time
	lastLogBytes int64
	counted      int64 // bytes already added to the Recorder's counter
	closed       bool
	// stale: state was not read since an attempt that was not followed
	// ended; the next attempt reads it to know where it starts from.
	stale bool
}

var _ pull.Transfer = (*transfer)(nil)

func (t *transfer) Bind(ctx context.Context) context.Context { return t.w.Source.Bind(ctx, t.key) }

func (t *transfer) Watch(number int, window time.Duration) pull.AttemptWatch {
	t.w.mu.Lock()
	stale := t.stale
	t.w.mu.Unlock()
	if stale {
		// An attempt that was not followed may have left bytes this one
		// resumes from (a retry: rare, so one read is cheap).
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		snap, _ := t.w.Source.Poll(ctx, []string{t.key})
		cancel()
		t.w.mu.Lock()
		if cur, ok := snap.Transfers[t.key]; ok && !t.closed {
			t.state, t.stale = cur, false
			t.w.recordLocked()
		}
		t.w.mu.Unlock()
	}
	now := time.Now()
	a := &watch{t: t, number: number, window: window, start: now, clock: now,
		startBytes: t.current().written(), touched: map[string]bool{}, fresh: true, stalled: make(chan struct{})}
	t.w.mu.Lock()
	t.att = a
	t.w.mu.Unlock()
	return a
}

func (t *transfer) current() State {
	t.w.mu.Lock()
	defer t.w.mu.Unlock()
	return t.state
}

func (t *transfer) Close(end pull.TransferEnd) {
	w := t.w
	w.mu.Lock()
	if t.closed {
		w.mu.Unlock()
		return
	}
	t.closed = true
	delete(w.transfers, t.key)
	w.recordLocked()
	w.mu.Unlock()
	// Not the pass's context: it may be over, and a lease of a pulled image
	// must still go.
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if err := w.Source.Release(ctx, t.key, end); err != nil {
		w.log().Warn("pull progress: release", "image", t.image, "error", err.Error())
	}
}

// update takes a new state of the transfer; w.mu is held.
func (t *transfer) update(now time.Time, cur State, nodeMoved bool) {
	prev := t.state
	t.state = cur
	a := t.att
	if a == nil {
		return
	}
	a.followed = true
	a.observe(now, prev, cur, nodeMoved)
	if iv := t.w.LogInterval; iv > 0 && now.Sub(t.lastLog) >= iv {
		t.logProgress(now, a)
	}
}

// logProgress writes the line people follow a pull by; w.mu is held.
func (t *transfer) logProgress(now time.Time, a *watch) {
	n := t.state.written()
	rate := float64(n-t.lastLogBytes) / now.Sub(t.lastLog).Seconds()
	t.lastLog, t.lastLogBytes = now, n
	attrs := []any{"image", t.image, "attempt", a.number, "bytes", n}
	have := n + t.state.Present
	if t.state.Total > 0 {
		attrs = append(attrs, "total", t.state.Total, "percent", fmt.Sprintf("%.1f", 100*float64(min(have, t.state.Total))/float64(t.state.Total)))
	}
	attrs = append(attrs, "rate", fmt.Sprintf("%.2f MiB/s", max(rate, 0)/(1<<20)))
	if idle := now.Sub(a.clock); idle >= t.w.interval()*2 {
		attrs = append(attrs, "noProgressFor", idle.Round(time.Second).String())
	}
	t.w.log().Info("pull progress", attrs...)
}

// watch is one attempt. Its fields are guarded by t.w.mu.
type watch struct {
	t      *transfer
	number int
	window time.Duration
	start  time.Time
	// clock is when the current stretch without progress began.
	clock      time.Time
	startBytes int64
	// touched holds the ingests that wrote bytes during this attempt.
	touched map[string]bool
	// fresh: nothing has moved in this attempt yet. The call may be hung
	// resolving the reference, which a hedged call can get past.
	fresh   bool
	stalled chan struct{}
	done    bool // stalled is closed
	stopped bool
	// followed: a poll read the transfer during this attempt.
	followed bool
}

var _ pull.AttemptWatch = (*watch)(nil)

func (a *watch) Stalled() <-chan struct{} { return a.stalled }

func (a *watch) Resolving() bool {
	a.t.w.mu.Lock()
	defer a.t.w.mu.Unlock()
	return a.fresh
}

func (a *watch) CallStarted() {
	a.t.w.mu.Lock()
	defer a.t.w.mu.Unlock()
	a.callStarted(time.Now())
}

// callStarted restarts the window of a hung resolve; t.w.mu is held.
func (a *watch) callStarted(now time.Time) {
	if a.fresh {
		a.clock = now
	}
}

// Stop ends the watch. A followed attempt, or one that resumed bytes (its
// bytes tell whether the resume worked), gets a last read so the blobs
// committed since the last poll count; an attempt that started from nothing
// and ended before it was followed gets none (see the package comment) and
// reports no fetched bytes.
func (a *watch) Stop() pull.Bytes {
	t := a.t
	t.w.mu.Lock()
	read := a.followed || a.startBytes > 0
	a.stopped = true
	if t.att == a {
		t.att = nil
	}
	if !read {
		t.stale = true
		defer t.w.mu.Unlock()
		return pull.Bytes{Total: t.state.Total}
	}
	t.w.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	snap, _ := t.w.Source.Poll(ctx, []string{t.key})
	cancel()
	t.w.mu.Lock()
	defer t.w.mu.Unlock()
	if cur, ok := snap.Transfers[t.key]; ok && !t.closed {
		t.state = cur
		t.w.recordLocked()
	}
	return pull.Bytes{Fetched: max(t.state.written()-a.startBytes, 0), Resumed: a.startBytes, Total: t.state.Total}
}

// observe judges one change of the transfer's state (see the package
// comment); t.w.mu is held.
func (a *watch) observe(now time.Time, prev, cur State, nodeMoved bool) {
	if a.stopped || a.done {
		return
	}
	grew := cur.Blobs > prev.Blobs || cur.Fetched > prev.Fetched
	for ref, off := range cur.Ingests {
		if p, ok := prev.Ingests[ref]; ok && off > p || !ok && off > 0 {
			a.touched[ref] = true
			grew = true
		}
	}
	touched := false
	for ref := range cur.Ingests {
		touched = touched || a.touched[ref]
	}
	switch {
	case grew:
		a.clock, a.fresh = now, false
	case len(cur.Ingests) == 0 && cur.Blobs > 0:
		// Unpacking, or waiting for a blob another pull is fetching.
		a.clock = now
	case !touched && nodeMoved:
		// Resolving, or blobs waiting for a download slot.
		a.clock = now
	}
	if now.Sub(a.clock) >= a.window {
		a.done = true
		close(a.stalled)
		a.t.w.log().Warn("pull made no progress: ending the attempt", "image", a.t.image, "attempt", a.number,
			"window", a.window.String(), "bytes", cur.written(), "openIngests", len(cur.Ingests), "blobs", cur.Blobs)
	}
}
