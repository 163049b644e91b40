// Package pullslots bounds how many nodes of one prefetcher instance pull at
// the same time, cluster-wide. It is a counting semaphore of K slots, each slot
// a coordination.k8s.io/v1 Lease named <instance>-pull-slot-<i> (i < K) in the
// instance's namespace, held by a node name.
//
// A node takes a slot by writing its name as the Lease's holder with an
// optimistic-concurrency Update (or a Create for a slot nobody made yet): of
// two nodes racing for one slot the API server lets exactly one win. The
// holder renews the Lease every third of its duration while it pulls and
// clears the holder right after. A slot whose holder stopped renewing (a dead
// node) is taken over once the Lease has not changed for its whole duration,
// measured on the waiter's own clock, so skewed node clocks cannot steal a
// live slot.
//
// Waiters do not poll: they list the slots once and then follow a watch on
// them. When a slot frees, each waiter delays its claim by a random fraction of
// ClaimJitter and looks again, so the first to wake usually wins alone and the
// others see the slot taken instead of all writing at once.
package pullslots

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/watch"
	coordinationclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/utils/clock"
)

// Labels put on every slot Lease; waiters list and watch by them.
const (
	LabelName      = "app.kubernetes.io/name"
	LabelInstance  = "app.kubernetes.io/instance"
	LabelComponent = "app.kubernetes.io/component"
	nameValue      = "image-prefetcher"
	componentValue = "pull-slot"
)

// Defaults of the Semaphore's optional fields.
const (
	DefaultLeaseDuration  = 30 * time.Second
	DefaultStartJitter    = 2 * time.Second
	DefaultClaimJitter    = 500 * time.Millisecond
	DefaultReleaseTimeout = 5 * time.Second
)

// ErrLost is logged when a held slot was taken over by another node (this
// node's renewals did not reach the API server for a whole lease duration).
var ErrLost = errors.New("pull slot lost to another node")

// Semaphore is the cluster-wide bound. The exported fields are its
// configuration; set them before the first Acquire.
type Semaphore struct {
	Client    coordinationclient.LeasesGetter
	Namespace string
	Instance  string
	// Holder is this node's name, written as the Lease's holderIdentity.
	Holder string
	// Slots is K, how many nodes may pull at once.
	Slots int

	// LeaseDuration is how long a slot stays held without renewal.
	LeaseDuration time.Duration
	// StartJitter spreads the first request of many nodes that start
	// together (a DaemonSet rollout, a new list): a random wait in [0, StartJitter).
	StartJitter time.Duration
	// ClaimJitter spreads the claims of waiters that see the same slot free;
	// it doubles for a waiter with each race it loses, up to 8 times.
	ClaimJitter time.Duration
	// ReleaseTimeout bounds the release, which runs even after shutdown
	// began (on a context detached from the caller's).
	ReleaseTimeout time.Duration
	// Backoff spaces retries after failed lists and watches.
	Backoff wait.Backoff

	Log   *slog.Logger
	Clock clock.WithTicker
	// Rand returns a number in [0, 1); for tests.
	Rand func() float64
}

// New checks the configuration and fills the defaults.
func New(s Semaphore) (*Semaphore, error) {
	if s.Client == nil {
		return nil, errors.New("pull slots: no Kubernetes client")
	}
	if s.Slots <= 0 {
		return nil, fmt.Errorf("pull slots: %d slots, need at least 1", s.Slots)
	}
	if s.Namespace == "" {
		return nil, errors.New("pull slots: no namespace (set --namespace or $POD_NAMESPACE)")
	}
	if s.Holder == "" {
		return nil, errors.New("pull slots: no holder (node name)")
	}
	if errs := validation.IsDNS1123Label(s.Namespace); len(errs) > 0 {
		return nil, fmt.Errorf("pull slots: namespace %q: %s", s.Namespace, strings.Join(errs, "; "))
	}
	// The highest slot's name is the longest.
	if errs := validation.IsDNS1123Subdomain(slotName(s.Instance, s.Slots-1)); len(errs) > 0 || s.Instance == "" {
		return nil, fmt.Errorf("pull slots: instance %q does not make a valid Lease name: %s", s.Instance, strings.Join(errs, "; "))
	}
	if errs := validation.IsValidLabelValue(s.Instance); len(errs) > 0 {
		return nil, fmt.Errorf("pull slots: instance %q is not a label value: %s", s.Instance, strings.Join(errs, "; "))
	}
	if s.LeaseDuration == 0 {
		s.LeaseDuration = DefaultLeaseDuration
	}
	if s.LeaseDuration < 3*time.Second {
		return nil, fmt.Errorf("pull slots: lease duration %s is below 3s", s.LeaseDuration)
	}
	if s.StartJitter < 0 || s.ClaimJitter < 0 {
		return nil, errors.New("pull slots: negative jitter")
	}
	if s.ReleaseTimeout <= 0 {
		s.ReleaseTimeout = DefaultReleaseTimeout
	}
	if s.Backoff.Duration == 0 {
		s.Backoff = wait.Backoff{Duration: 200 * time.Millisecond, Factor: 2, Jitter: 1, Steps: 1 << 30, Cap: 5 * time.Second}
	}
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	if s.Clock == nil {
		s.Clock = clock.RealClock{}
	}
	if s.Rand == nil {
		s.Rand = rand.Float64
	}
	return &s, nil
}

func slotName(instance string, i int) string {
	return instance + "-pull-slot-" + strconv.Itoa(i)
}

// selector matches the slot Leases of this instance.
func (s *Semaphore) selector() string {
	return labels.SelectorFromSet(labels.Set{LabelName: nameValue, LabelInstance: s.Instance, LabelComponent: componentValue}).String()
}

// slotIndex returns i for a Lease named <instance>-pull-slot-<i> with i < K.
func (s *Semaphore) slotIndex(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, s.Instance+"-pull-slot-")
	if !ok {
		return 0, false
	}
	i, err := strconv.Atoi(rest)
	if err != nil || i < 0 || i >= s.Slots || strconv.Itoa(i) != rest {
		return 0, false
	}
	return i, true
}

func (s *Semaphore) jitter(max time.Duration) time.Duration {
	if max <= 0 {
		return 0
	}
	return time.Duration(s.Rand() * float64(max))
}

// sleep waits d on the semaphore's clock, or until ctx is done.
func (s *Semaphore) sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := s.Clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C():
		return nil
	}
}

// Acquire blocks until this node holds a slot, then returns the function that
// gives it back. The slot is renewed in the background until release. release
// is safe to call more than once and after ctx is done: it uses its own
// ReleaseTimeout on a context detached from ctx, so a shutdown still frees the
// slot at once instead of leaving it to expire.
func (s *Semaphore) Acquire(ctx context.Context) (release func(), err error) {
	start := s.Clock.Now()
	if err := s.sleep(ctx, s.jitter(s.StartJitter)); err != nil {
		return nil, err
	}
	w := &waiter{s: s, slots: make([]slotState, s.Slots)}
	held, err := w.run(ctx)
	if err != nil {
		return nil, err
	}
	s.Log.Info("pull slot acquired", "lease", held.Name, "waited", s.Clock.Since(start).Round(time.Millisecond))
	return s.hold(ctx, held), nil
}

// slotState is what a waiter knows of one slot.
type slotState struct {
	lease *coordinationv1.Lease // nil: no such Lease (yet)
	// observed is when this waiter saw the Lease change last, on its own clock.
	observed time.Time
	// lostRV is the resourceVersion a claim of ours lost on; the slot is not
	// tried again until it changes (the watch brings the winner's write).
	lostRV  string
	lostNil bool // a Create lost: wait for the Lease to appear
}

type waiter struct {
	s     *Semaphore
	slots []slotState
	rv    string // resourceVersion to watch from
	// losses counts the claims this waiter lost; it widens the claim jitter.
	losses int
	// watched is set when the current watch delivered an event.
	watched bool
}

func (w *waiter) run(ctx context.Context) (*coordinationv1.Lease, error) {
	s := w.s
	backoff := s.Backoff
	claimNow := true // right after the start jitter: no extra claim delay
	for {
		if err := w.list(ctx); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if permanent(err) {
				return nil, err
			}
			d := backoff.Step()
			s.Log.Warn("list pull slots", "error", err.Error(), "retryIn", d.Round(time.Millisecond))
			if err := s.sleep(ctx, d); err != nil {
				return nil, err
			}
			continue
		}
		held, err := w.follow(ctx, claimNow)
		if held != nil || err != nil {
			return held, err
		}
		// The watch ended (server timeout, error, compaction): list again,
		// soon after a watch that worked, backing off after one that did not.
		claimNow = false
		pause := s.jitter(time.Second)
		if w.watched {
			backoff = s.Backoff
		} else {
			pause = backoff.Step()
		}
		w.watched = false
		if err := s.sleep(ctx, pause); err != nil {
			return nil, err
		}
	}
}

func (w *waiter) list(ctx context.Context) error {
	s := w.s
	l, err := s.Client.Leases(s.Namespace).List(ctx, metav1.ListOptions{LabelSelector: s.selector()})
	if err != nil {
		return fmt.Errorf("list leases in %s: %w", s.Namespace, err)
	}
	now := s.Clock.Now()
	seen := make([]bool, s.Slots)
	for i := range l.Items {
		le := &l.Items[i]
		if idx, ok := s.slotIndex(le.Name); ok {
			w.update(idx, le, now)
			seen[idx] = true
		}
	}
	for i, ok := range seen {
		if !ok {
			w.update(i, nil, now)
		}
	}
	w.rv = l.ResourceVersion
	return nil
}

// update records a slot's new state; an unchanged resourceVersion keeps the
// time it was first observed.
func (w *waiter) update(i int, le *coordinationv1.Lease, now time.Time) {
	st := &w.slots[i]
	switch {
	case le == nil && st.lease == nil:
		if st.observed.IsZero() {
			st.observed = now
		}
		return
	case le != nil && st.lease != nil && le.ResourceVersion == st.lease.ResourceVersion:
		return
	}
	st.lease = le
	st.observed = now
	if le != nil {
		st.lostNil = false
		if le.ResourceVersion != st.lostRV {
			st.lostRV = ""
		}
	}
}

// free reports whether slot i can be claimed now and, if it cannot because a
// live holder has it, when its lease would expire.
func (w *waiter) free(i int, now time.Time) (bool, time.Time) {
	st := &w.slots[i]
	if st.lease == nil {
		return !st.lostNil, time.Time{}
	}
	if st.lostRV != "" && st.lostRV == st.lease.ResourceVersion {
		return false, time.Time{}
	}
	holder := ptrString(st.lease.Spec.HolderIdentity)
	if holder == "" || holder == w.s.Holder {
		// Free, or ours from before a restart of this agent.
		return true, time.Time{}
	}
	d := w.s.LeaseDuration
	if st.lease.Spec.LeaseDurationSeconds != nil && *st.lease.Spec.LeaseDurationSeconds > 0 {
		d = time.Duration(*st.lease.Spec.LeaseDurationSeconds) * time.Second
	}
	expiry := st.observed.Add(d)
	return !now.Before(expiry), expiry
}

// candidates returns the claimable slots in random order (so that waiters do
// not all go for slot 0) and the earliest expiry of the held ones.
func (w *waiter) candidates() ([]int, time.Time) {
	now := w.s.Clock.Now()
	var out []int
	var next time.Time
	for i := range w.slots {
		ok, exp := w.free(i, now)
		if ok {
			out = append(out, i)
		} else if !exp.IsZero() && (next.IsZero() || exp.Before(next)) {
			next = exp
		}
	}
	for i := len(out) - 1; i > 0; i-- {
		j := int(w.s.Rand() * float64(i+1))
		out[i], out[j] = out[j], out[i]
	}
	return out, next
}

// follow claims a free slot if there is one, else watches the slots until
// one frees or expires. It returns (nil, nil) when the watch ends.
func (w *waiter) follow(ctx context.Context, claimNow bool) (*coordinationv1.Lease, error) {
	s := w.s
	var events <-chan watch.Event
	var stopWatch func()
	defer func() {
		if stopWatch != nil {
			stopWatch()
		}
	}()
	var claimTimer clock.Timer // set while a claim waits out its jitter
	stopClaimTimer := func() {
		if claimTimer != nil {
			claimTimer.Stop()
			claimTimer = nil
		}
	}
	defer stopClaimTimer()
	logged := false
	for {
		cands, next := w.candidates()
		if len(cands) == 0 {
			stopClaimTimer()
			claimNow = false
		}
		if len(cands) > 0 && (claimNow || s.ClaimJitter == 0) {
			claimNow = false
			held, err := w.claim(ctx, cands[0])
			if held != nil || err != nil {
				return held, err
			}
			continue // lost the race: look again
		}
		if len(cands) > 0 && claimTimer == nil {
			claimTimer = s.Clock.NewTimer(s.jitter(w.claimWindow()))
		}
		if !logged && len(cands) == 0 {
			s.Log.Info("waiting for a cluster-wide pull slot", "slots", s.Slots, "namespace", s.Namespace)
			logged = true
		}
		if events == nil {
			wi, err := s.Client.Leases(s.Namespace).Watch(ctx, metav1.ListOptions{
				LabelSelector:       s.selector(),
				ResourceVersion:     w.rv,
				AllowWatchBookmarks: true,
			})
			if err != nil {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				s.Log.Warn("watch pull slots", "error", err.Error())
				return nil, nil
			}
			events, stopWatch = wi.ResultChan(), wi.Stop
		}
		var expiry clock.Timer
		var expiryC, claimC <-chan time.Time
		if !next.IsZero() {
			// Wakes the loop when a silent holder's lease runs out.
			expiry = s.Clock.NewTimer(max(next.Sub(s.Clock.Now()), 0) + 10*time.Millisecond)
			expiryC = expiry.C()
		}
		if claimTimer != nil {
			claimC = claimTimer.C()
		}
		restart := false
		select {
		case <-ctx.Done():
		case <-expiryC:
		case <-claimC:
			claimTimer = nil
			claimNow = true
		case ev, ok := <-events:
			restart = !ok || !w.apply(ev)
			w.watched = w.watched || (ok && ev.Type != watch.Error)
		}
		if expiry != nil {
			expiry.Stop()
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if restart {
			return nil, nil
		}
	}
}

// apply folds a watch event into the state; false means the watch must be
// restarted from a fresh list.
func (w *waiter) apply(ev watch.Event) bool {
	switch ev.Type {
	case watch.Error:
		w.s.Log.Debug("pull slot watch error", "status", apierrors.FromObject(ev.Object).Error())
		return false
	case watch.Bookmark:
		if le, ok := ev.Object.(*coordinationv1.Lease); ok {
			w.rv = le.ResourceVersion
		}
		return true
	}
	le, ok := ev.Object.(*coordinationv1.Lease)
	if !ok {
		return true
	}
	w.rv = le.ResourceVersion
	i, ok := w.s.slotIndex(le.Name)
	if !ok {
		return true
	}
	if ev.Type == watch.Deleted {
		w.update(i, nil, w.s.Clock.Now())
		w.slots[i].lostNil = false
		return true
	}
	w.update(i, le, w.s.Clock.Now())
	return true
}

// claim tries one slot. A waiter that lost goes back to waiting (with a
// wider claim jitter) instead of trying the next free slot at once: when many
// slots free together, that is what keeps the losers from writing again and
// again.
func (w *waiter) claim(ctx context.Context, i int) (*coordinationv1.Lease, error) {
	s := w.s
	got, err := w.claimOne(ctx, i)
	switch {
	case got != nil:
		return got, nil
	case ctx.Err() != nil:
		// The write may have reached the server before the cancellation:
		// make sure no slot stays held in our name.
		s.releaseByName(ctx, slotName(s.Instance, i))
		return nil, ctx.Err()
	case permanent(err):
		return nil, err
	case err != nil:
		s.Log.Warn("claim pull slot", "lease", slotName(s.Instance, i), "error", err.Error())
	}
	w.losses++
	return nil, nil
}

// claimWindow is the claim jitter after this waiter lost `losses` races: it
// doubles with each loss up to 8 x ClaimJitter, so the more waiters compete,
// the more they spread out (a lost race means others were quicker).
func (w *waiter) claimWindow() time.Duration {
	return w.s.ClaimJitter << min(w.losses, 3)
}

// claimOne writes this node as slot i's holder. A lost race returns (nil,
// nil) and marks the slot until the watch shows the winner.
func (w *waiter) claimOne(ctx context.Context, i int) (*coordinationv1.Lease, error) {
	s := w.s
	st := &w.slots[i]
	now := metav1.NewMicroTime(s.Clock.Now())
	secs := int32(s.LeaseDuration / time.Second)
	holder := s.Holder
	leases := s.Client.Leases(s.Namespace)
	if st.lease == nil {
		le := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name:      slotName(s.Instance, i),
				Namespace: s.Namespace,
				Labels:    map[string]string{LabelName: nameValue, LabelInstance: s.Instance, LabelComponent: componentValue},
			},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       &holder,
				LeaseDurationSeconds: &secs,
				AcquireTime:          &now,
				RenewTime:            &now,
			},
		}
		got, err := leases.Create(ctx, le, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			st.lostNil = true
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("create lease %s: %w", le.Name, err)
		}
		return got, nil
	}
	le := st.lease.DeepCopy()
	if ptrString(le.Spec.HolderIdentity) != holder {
		le.Spec.LeaseTransitions = ptrInt32(ptrInt32Value(le.Spec.LeaseTransitions) + 1)
	}
	le.Spec.HolderIdentity = &holder
	le.Spec.LeaseDurationSeconds = &secs
	le.Spec.AcquireTime = &now
	le.Spec.RenewTime = &now
	got, err := leases.Update(ctx, le, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) {
		st.lostRV = st.lease.ResourceVersion
		return nil, nil
	}
	if apierrors.IsNotFound(err) {
		// Deleted meanwhile (by hand): the watch says so, then we create it.
		st.lostRV = st.lease.ResourceVersion
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("update lease %s: %w", le.Name, err)
	}
	return got, nil
}

// hold renews the held Lease until release is called.
func (s *Semaphore) hold(ctx context.Context, held *coordinationv1.Lease) func() {
	renewCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	var mu sync.Mutex
	current := held
	done := make(chan struct{})
	go func() {
		defer close(done)
		lastOK := s.Clock.Now()
		for {
			if err := s.sleep(renewCtx, s.LeaseDuration/3); err != nil {
				return
			}
			mu.Lock()
			le := current.DeepCopy()
			mu.Unlock()
			now := metav1.NewMicroTime(s.Clock.Now())
			le.Spec.RenewTime = &now
			got, err := s.Client.Leases(s.Namespace).Update(renewCtx, le, metav1.UpdateOptions{})
			if renewCtx.Err() != nil {
				return
			}
			switch {
			case err == nil:
				mu.Lock()
				current = got
				mu.Unlock()
				lastOK = s.Clock.Now()
			case apierrors.IsConflict(err) || apierrors.IsNotFound(err):
				// Someone else wrote the slot: it expired in their eyes and
				// was taken. The pulls go on (aborting them would waste the
				// work done); the bound is exceeded by one node until this
				// pass ends.
				s.Log.Error("pull slot renewal", "lease", le.Name, "error", fmt.Errorf("%w: %w", ErrLost, err).Error())
				mu.Lock()
				current = nil
				mu.Unlock()
				return
			default:
				s.Log.Warn("pull slot renewal failed; retrying", "lease", le.Name, "error", err.Error(),
					"sinceLastRenewal", s.Clock.Since(lastOK).Round(time.Millisecond), "leaseDuration", s.LeaseDuration)
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			stop()
			<-done
			mu.Lock()
			le := current
			mu.Unlock()
			if le == nil {
				return
			}
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.ReleaseTimeout)
			defer cancel()
			if err := s.release(rctx, le); err != nil {
				s.Log.Error("release pull slot; it frees when its lease expires", "lease", le.Name, "error", err.Error(), "leaseDuration", s.LeaseDuration)
				return
			}
			s.Log.Info("pull slot released", "lease", le.Name)
		})
	}
}

// release clears the holder, keeping the Lease for the next node (cheaper for
// everybody than delete and create, and its leaseTransitions stay a record).
// A Lease that is no longer ours is left alone.
func (s *Semaphore) release(ctx context.Context, le *coordinationv1.Lease) error {
	leases := s.Client.Leases(s.Namespace)
	for attempt := 0; ; attempt++ {
		cp := le.DeepCopy()
		cp.Spec.HolderIdentity = nil
		cp.Spec.AcquireTime = nil
		cp.Spec.RenewTime = nil
		_, err := leases.Update(ctx, cp, metav1.UpdateOptions{})
		if err == nil || apierrors.IsNotFound(err) {
			return nil
		}
		if !apierrors.IsConflict(err) || attempt > 0 {
			return fmt.Errorf("clear holder of lease %s: %w", le.Name, err)
		}
		// Changed since our last write: release only if it is still ours.
		fresh, gerr := leases.Get(ctx, le.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(gerr) {
			return nil
		}
		if gerr != nil {
			return fmt.Errorf("read lease %s: %w", le.Name, gerr)
		}
		if ptrString(fresh.Spec.HolderIdentity) != s.Holder {
			return nil
		}
		le = fresh
	}
}

// releaseByName frees slot name if it is held by this node; for claims whose
// outcome is unknown because the caller gave up.
func (s *Semaphore) releaseByName(ctx context.Context, name string) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.ReleaseTimeout)
	defer cancel()
	le, err := s.Client.Leases(s.Namespace).Get(rctx, name, metav1.GetOptions{})
	if err != nil {
		if !apierrors.IsNotFound(err) {
			s.Log.Warn("check pull slot after cancelled claim", "lease", name, "error", err.Error())
		}
		return
	}
	if ptrString(le.Spec.HolderIdentity) != s.Holder {
		return
	}
	if err := s.release(rctx, le); err != nil {
		s.Log.Warn("release pull slot after cancelled claim", "lease", name, "error", err.Error())
	}
}

// permanent reports errors that waiting does not cure (missing RBAC, a
// missing namespace, a rejected object): the pass fails and says why instead
// of waiting for a slot forever.
func permanent(err error) bool {
	return apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err) || apierrors.IsInvalid(err) ||
		apierrors.IsBadRequest(err) || apierrors.IsMethodNotSupported(err) ||
		apierrors.IsNotFound(err) // from Create: the namespace does not exist
}

func ptrString(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

func ptrInt32(v int32) *int32 { return &v }

func ptrInt32Value(p *int32) int32 {
	if p == nil {
		return 0
	}
	return *p
}
