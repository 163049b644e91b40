package progress

import (
	"maps"
	"slices"
	"testing"
	"time"
)

const mib = 1 << 20

// sim drives one attempt's watch with states at made-up times, one a second,
// so the decision is tested without waiting for real time.
type sim struct {
	t     *testing.T
	a     *watch
	t0    time.Time
	now   time.Duration // since t0
	state State
}

const window = 20 * time.Second

func newSim(t *testing.T, start State) *sim {
	w := &Watcher{}
	tr := &transfer{w: w, image: "registry.example/big:1", state: start}
	t0 := time.Unix(1_700_000_000, 0)
	a := &watch{t: tr, number: 1, window: window, start: t0, clock: t0, touched: map[string]bool{}, fresh: true,
		stalled: make(chan struct{})}
	tr.att = a
	return &sim{t: t, a: a, t0: t0, state: clone(start)}
}

func clone(s State) State {
	s.Ingests = maps.Clone(s.Ingests)
	if s.Ingests == nil {
		s.Ingests = map[string]int64{}
	}
	return s
}

// step advances a second; change (may be nil) edits the state first.
func (s *sim) step(nodeMoved bool, change func(*State)) {
	prev := clone(s.state)
	if change != nil {
		change(&s.state)
	}
	s.now += time.Second
	s.a.observe(s.t0.Add(s.now), prev, clone(s.state), nodeMoved)
}

// steps repeats step n times.
func (s *sim) steps(n int, nodeMoved bool, change func(*State)) {
	for range n {
		s.step(nodeMoved, change)
	}
}

func (s *sim) stalled() bool {
	select {
	case <-s.a.stalled:
		return true
	default:
		return false
	}
}

// stallsAt checks that the attempt is not stalled before second at and is
// stalled at it, stepping with the same change.
func (s *sim) stallsAt(at time.Duration, nodeMoved bool, change func(*State)) {
	s.t.Helper()
	for s.t0.Add(s.now).Before(s.t0.Add(at - time.Second)) {
		s.step(nodeMoved, change)
		if s.stalled() {
			s.t.Fatalf("stalled at %s, want at %s", s.now, at)
		}
	}
	s.step(nodeMoved, change)
	if !s.stalled() {
		s.t.Fatalf("not stalled at %s", s.now)
	}
}

func (s *sim) notStalled(what string) {
	s.t.Helper()
	if s.stalled() {
		s.t.Fatalf("%s: stalled at %s", what, s.now)
	}
}

func grow(ref string, n int64) func(*State) {
	return func(st *State) { st.Ingests[ref] += n }
}

func TestAStoppedBlobStallsAfterTheWindowWhateverTheNodeDoes(t *testing.T) {
	s := newSim(t, State{})
	s.steps(2, true, grow("layer-sha256:a", 2*mib)) // 4 MiB by t=2s
	// The connection hangs; other pulls on the node go on.
	s.stallsAt(2*time.Second+window, true, nil)
}

func TestFlowingBytesNeverStall(t *testing.T) {
	s := newSim(t, State{})
	s.steps(600, false, grow("layer-sha256:a", 256<<10)) // ten minutes at 256 KiB/s
	s.notStalled("flowing")
	if s.a.Resolving() {
		t.Error("Resolving after bytes arrived")
	}
}

func TestSlowFlowOneByteAWindowIsProgress(t *testing.T) {
	s := newSim(t, State{})
	for range 30 {
		s.steps(int(window/time.Second)-1, false, nil)
		s.step(false, grow("layer-sha256:a", 1))
	}
	s.notStalled("a byte every window")
}

func TestCommittingABlobIsProgress(t *testing.T) {
	s := newSim(t, State{})
	s.step(false, grow("layer-sha256:a", mib))
	s.steps(int(window/time.Second)-2, false, nil)
	// The last bytes and the commit land between two polls.
	s.step(false, func(st *State) {
		delete(st.Ingests, "layer-sha256:a")
		st.Fetched += mib + 10
		st.Blobs++
		st.Ingests["layer-sha256:b"] = 0 // the next blob opens
	})
	s.notStalled("just committed")
	// b never moves and nothing else on the node does either.
	s.stallsAt(s.now+window, false, nil)
}

func TestBlobsWaitingForADownloadSlotWhileTheNodeMoves(t *testing.T) {
	// containerd 2.x: the ingests are open, and wait for the node-wide
	// download limit that other pulls hold.
	s := newSim(t, State{Blobs: 2, Fetched: 4 << 10, Ingests: map[string]int64{"layer-sha256:a": 0, "layer-sha256:b": 0}})
	s.steps(300, true, nil)
	s.notStalled("queued while the node moves")
	// The node goes silent too: nothing anywhere moves.
	s.stallsAt(s.now+window, false, nil)
}

func TestAResumedBlobWaitingCountsTheNode(t *testing.T) {
	// An earlier attempt left 30 MiB of a; this attempt has not touched it.
	s := newSim(t, State{Blobs: 2, Ingests: map[string]int64{"layer-sha256:a": 30 * mib}})
	s.steps(100, true, nil)
	s.notStalled("resumed blob waiting while the node moves")
	// It resumes, then its connection hangs: the node no longer matters.
	s.step(true, grow("layer-sha256:a", mib))
	s.stallsAt(s.now+window, true, nil)
}

func TestUnpackingNeverStalls(t *testing.T) {
	s := newSim(t, State{})
	s.step(false, func(st *State) { st.Blobs, st.Fetched = 3, 300*mib })
	s.steps(600, false, nil) // every blob in, a long unpack, nothing on the node moves
	s.notStalled("blobs in, no ingest open")
}

func TestAHungResolveStallsWhenTheNodeIsSilent(t *testing.T) {
	s := newSim(t, State{})
	if !s.a.Resolving() {
		t.Fatal("a new attempt is not Resolving")
	}
	s.stallsAt(window, false, nil)
}

func TestAHungResolveWaitsWhileTheNodeMoves(t *testing.T) {
	// A pull the runtime did not account to the lease looks like a resolve
	// that never ends: the node's bytes keep it alive.
	s := newSim(t, State{})
	s.steps(200, true, nil)
	s.notStalled("resolving while the node moves")
}

func TestAHedgeRestartsTheWindowOfAHungResolve(t *testing.T) {
	s := newSim(t, State{})
	s.steps(10, false, nil)
	s.a.callStarted(s.t0.Add(s.now)) // hedge at 10s
	s.stallsAt(10*time.Second+window, false, nil)
}

func TestAHedgeDoesNotRestartTheWindowOnceBytesMoved(t *testing.T) {
	s := newSim(t, State{})
	s.step(false, grow("layer-sha256:a", mib))
	s.steps(10, false, nil)
	s.a.callStarted(s.t0.Add(s.now))
	s.stallsAt(time.Second+window, false, nil)
}

func TestStallIsReportedOnce(t *testing.T) {
	s := newSim(t, State{})
	s.stallsAt(window, false, nil)
	s.steps(5, false, nil) // a second close would panic
}

func TestMoved(t *testing.T) {
	tests := []struct {
		name      string
		prev, cur map[string]int64
		want      bool
	}{
		{"nothing", nil, nil, false},
		{"same", map[string]int64{"a": 5}, map[string]int64{"a": 5}, false},
		{"grew", map[string]int64{"a": 5}, map[string]int64{"a": 6}, true},
		{"new with bytes", nil, map[string]int64{"a": 1}, true},
		{"new and empty", nil, map[string]int64{"a": 0}, false},
		{"committed", map[string]int64{"a": 5}, nil, true},
	}
	for _, tt := range tests {
		if got := moved(tt.prev, tt.cur); got != tt.want {
			t.Errorf("%s: moved = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// Only attempts that have run for an interval are read at a poll; a
// transfer between attempts is not read at all.
func TestOnlyAttemptsOlderThanTheIntervalAreDue(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	w := &Watcher{transfers: map[string]*transfer{}}
	for key, age := range map[string]time.Duration{"old": 3 * time.Second, "just": time.Second, "young": 999 * time.Millisecond} {
		tr := &transfer{w: w, key: key}
		tr.att = &watch{t: tr, start: now.Add(-age)}
		w.transfers[key] = tr
	}
	w.transfers["between"] = &transfer{w: w, key: "between"}
	var got []string
	for _, t := range w.dueLocked(now, time.Second, nil) {
		got = append(got, t.key)
	}
	slices.Sort(got)
	if want := []string{"just", "old"}; !slices.Equal(got, want) {
		t.Errorf("due %v, want %v", got, want)
	}
}
