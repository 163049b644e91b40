package pullslots

import (
	"context"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
)

// waiter is one Acquire waiting for a slot. An informer keeps the slot Leases
// (list, watch, re-list, backoff); the waiter decides from them when and
// which slot to claim.
type waiter struct {
	s     *Semaphore
	slots []slotState
	// losses counts the claims this waiter lost; it widens the claim jitter.
	losses int
	// list is the digest of the list the slot is for (seeding).
	list string
}

// seeding reports whether this waiter's list waits for its seed: only slot 0
// may be taken until the seed slot's Lease names the list seeded.
func (w *waiter) seeding() bool { return w.s.Seed && w.list != "" }

func (w *waiter) seeded(store cache.Store) bool {
	le := w.lease(store, 0)
	return le != nil && le.Annotations[SeededAnnotation] == w.list
}

// slotState is what a waiter knows of one slot beyond the informer's copy.
type slotState struct {
	present bool   // the Lease exists
	rv      string // its resourceVersion
	// observed is when this waiter saw the Lease change last, on its own clock.
	observed time.Time
	// lostRV is the resourceVersion a claim of ours lost on; the slot is not
	// tried again until it changes (the watch brings the winner's write).
	lostRV  string
	lostNil bool // a Create lost: wait for the Lease to appear
}

// wait blocks until this node holds a slot and returns its Lease.
func (w *waiter) wait(ctx context.Context) (*coordinationv1.Lease, error) {
	s := w.s
	ctx, stop := context.WithCancel(ctx)
	defer stop() // ends the informer's watch
	changed := make(chan struct{}, 1)
	failed := make(chan error, 1)
	inf, err := s.informer(changed, failed)
	if err != nil {
		return nil, err
	}
	go inf.RunWithContext(ctx)
	go func() {
		// The initial list may hold no slot at all, so no event says it arrived.
		if cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
			notify(changed)
		}
	}()

	claimNow := true           // right after the start jitter: no extra claim delay
	var claimTimer clock.Timer // set while a claim waits out its jitter
	defer func() {
		if claimTimer != nil {
			claimTimer.Stop()
		}
	}()
	logged := false
	for {
		var expiry clock.Timer
		var expiryC, claimC <-chan time.Time
		if inf.HasSynced() {
			cands, next := w.candidates(inf.GetStore())
			switch {
			case len(cands) == 0:
				if claimTimer != nil {
					claimTimer.Stop()
					claimTimer = nil
				}
				claimNow = false
				if !logged {
					if w.seeding() && !w.seeded(inf.GetStore()) {
						s.Log.Info("waiting for another node to pull the list first (seeding)", "lease", slotName(s.Instance, 0), "namespace", s.Namespace)
					} else {
						s.Log.Info("waiting for a cluster-wide pull slot", "slots", s.Slots, "namespace", s.Namespace)
					}
					logged = true
				}
			case claimNow || s.ClaimJitter == 0:
				claimNow = false
				held, err := w.claim(ctx, cands[0])
				if held != nil || err != nil {
					return held, err
				}
				continue // lost the race: look again
			case claimTimer == nil:
				claimTimer = s.Clock.NewTimer(s.jitter(w.claimWindow()))
			}
			if !next.IsZero() {
				// Wakes the loop when a silent holder's lease runs out.
				expiry = s.Clock.NewTimer(max(next.Sub(s.Clock.Now()), 0) + 10*time.Millisecond)
				expiryC = expiry.C()
			}
			if claimTimer != nil {
				claimC = claimTimer.C()
			}
		}
		select {
		case <-ctx.Done():
		case err := <-failed:
			return nil, err
		case <-changed:
		case <-expiryC:
		case <-claimC:
			claimTimer = nil
			claimNow = true
		}
		if expiry != nil {
			expiry.Stop()
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
}

// informer lists and watches this instance's slot Leases. It sends on changed
// (without blocking) after each change of its store, and on failed the first
// error that waiting cannot cure; it retries the others with its own backoff.
func (s *Semaphore) informer(changed chan<- struct{}, failed chan<- error) (cache.SharedIndexInformer, error) {
	leases := s.Client.Leases(s.Namespace)
	sel := s.selector()
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.LabelSelector = sel
			return leases.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.LabelSelector = sel
			return leases.Watch(ctx, o)
		},
	}
	// List, then watch: the slots are K small objects, and a typed client
	// cannot tell the reflector whether it supports streaming the initial
	// state in a watch (WatchListClient); the fake clientset's do not.
	inf := cache.NewSharedIndexInformer(cache.ToListWatcherWithWatchListSemantics(lw, listThenWatch{}), &coordinationv1.Lease{}, 0, nil)
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { notify(changed) },
		UpdateFunc: func(any, any) { notify(changed) },
		DeleteFunc: func(any) { notify(changed) },
	}); err != nil {
		return nil, fmt.Errorf("pull slots informer: %w", err)
	}
	err := inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		switch {
		case permanent(err):
			select {
			case failed <- fmt.Errorf("list and watch leases in %s: %w", s.Namespace, err):
			default:
			}
		case apierrors.IsResourceExpired(err) || apierrors.IsGone(err):
			s.Log.Debug("pull slot watch expired; listing again", "error", err.Error())
		default:
			s.Log.Warn("list and watch pull slots; retrying", "error", err.Error())
		}
	})
	if err != nil {
		return nil, fmt.Errorf("pull slots informer: %w", err)
	}
	return inf, nil
}

// listThenWatch tells the reflector not to use WatchList streaming.
type listThenWatch struct{}

func (listThenWatch) IsWatchListSemanticsUnSupported() bool { return true }

func notify(c chan<- struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// lease returns slot i's Lease from the informer's store (read-only) or nil.
func (w *waiter) lease(store cache.Store, i int) *coordinationv1.Lease {
	obj, ok, err := store.GetByKey(w.s.Namespace + "/" + slotName(w.s.Instance, i))
	if err != nil || !ok {
		return nil
	}
	le, _ := obj.(*coordinationv1.Lease)
	return le
}

// observe records slot i's current Lease: a new resourceVersion (or the
// Lease appearing or going) restarts its expiry clock and clears a lost claim.
func (w *waiter) observe(i int, le *coordinationv1.Lease, now time.Time) {
	st := &w.slots[i]
	present, rv := le != nil, ""
	if le != nil {
		rv = le.ResourceVersion
	}
	if !st.observed.IsZero() && present == st.present && rv == st.rv {
		return
	}
	if !st.observed.IsZero() {
		st.lostNil = false
	}
	st.present, st.rv, st.observed = present, rv, now
	if st.lostRV != rv {
		st.lostRV = ""
	}
}

// free reports whether slot i can be claimed now and, if it cannot because a
// live holder has it, when its lease would expire.
func (w *waiter) free(i int, le *coordinationv1.Lease, now time.Time) (bool, time.Time) {
	st := &w.slots[i]
	if le == nil {
		return !st.lostNil, time.Time{}
	}
	if st.lostRV != "" && st.lostRV == le.ResourceVersion {
		return false, time.Time{}
	}
	holder := ptr.Deref(le.Spec.HolderIdentity, "")
	if holder == "" || (holder == w.s.Holder && w.s.ownProcess(le)) {
		// Free, or ours from before a restart of this agent (a process
		// that did not name itself, or this one).
		return true, time.Time{}
	}
	// Another node's, or another live process's of this node (a fetch
	// beside run): it frees the slot or stops renewing it.
	// The holder's own duration, but never longer than ours: all agents of
	// an instance run with the same flag, and a larger value in a Lease is a
	// misbehaving or malicious holder that would otherwise keep the slot
	// from everyone for as long as it likes.
	d := w.s.LeaseDuration
	if secs := ptr.Deref(le.Spec.LeaseDurationSeconds, 0); secs > 0 {
		d = min(d, time.Duration(secs)*time.Second)
	}
	expiry := st.observed.Add(d)
	return !now.Before(expiry), expiry
}

// candidate is a slot judged claimable and the version of its Lease the
// judgement was made on (nil: no Lease yet). The claim writes over exactly
// that version: the informer may have brought another node's claim since, and
// an Update carrying that newer resourceVersion would succeed over it.
type candidate struct {
	slot  int
	lease *coordinationv1.Lease
}

// candidates returns the claimable slots in random order (so that waiters do
// not all go for slot 0) and the earliest expiry of the held ones.
func (w *waiter) candidates(store cache.Store) ([]candidate, time.Time) {
	now := w.s.Clock.Now()
	var out []candidate
	var next time.Time
	slots := len(w.slots)
	if w.seeding() && !w.seeded(store) {
		slots = 1 // the seed slot alone until the list is seeded
	}
	for i := range slots {
		le := w.lease(store, i)
		w.observe(i, le, now)
		ok, exp := w.free(i, le, now)
		if ok {
			out = append(out, candidate{slot: i, lease: le})
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

// claim tries one slot. A waiter that lost goes back to waiting (with a
// wider claim jitter) instead of trying the next free slot at once: when many
// slots free together, that is what keeps the losers from writing again and
// again.
func (w *waiter) claim(ctx context.Context, c candidate) (*coordinationv1.Lease, error) {
	s, i := w.s, c.slot
	got, err := w.claimOne(ctx, c.lease, i)
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

// claimOne writes this node as slot i's holder: current is the slot's Lease
// as the informer had it when the slot was judged free (nil: none yet). A
// lost race returns (nil, nil) and marks the slot until the watch shows the
// winner.
func (w *waiter) claimOne(ctx context.Context, current *coordinationv1.Lease, i int) (*coordinationv1.Lease, error) {
	s := w.s
	st := &w.slots[i]
	now := metav1.NewMicroTime(s.Clock.Now())
	secs := int32(s.LeaseDuration / time.Second)
	leases := s.Client.Leases(s.Namespace)
	if current == nil {
		le := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name:        slotName(s.Instance, i),
				Namespace:   s.Namespace,
				Labels:      map[string]string{LabelName: nameValue, LabelInstance: s.Instance, LabelComponent: componentValue},
				Annotations: map[string]string{ProcessAnnotation: s.Process},
			},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(s.Holder),
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
	le := current.DeepCopy() // the informer's copy is shared
	if ptr.Deref(le.Spec.HolderIdentity, "") != s.Holder {
		le.Spec.LeaseTransitions = ptr.To(ptr.Deref(le.Spec.LeaseTransitions, 0) + 1)
	}
	le.Spec.HolderIdentity = ptr.To(s.Holder)
	if le.Annotations == nil {
		le.Annotations = map[string]string{}
	}
	le.Annotations[ProcessAnnotation] = s.Process
	le.Spec.LeaseDurationSeconds = &secs
	le.Spec.AcquireTime = &now
	le.Spec.RenewTime = &now
	got, err := leases.Update(ctx, le, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		// Taken meanwhile, or deleted by hand: the watch brings the news.
		st.lostRV = current.ResourceVersion
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("update lease %s: %w", le.Name, err)
	}
	return got, nil
}

// ownProcess reports whether le, held by this node, is held by this process
// or by one that did not name itself.
func (s *Semaphore) ownProcess(le *coordinationv1.Lease) bool {
	p := le.Annotations[ProcessAnnotation]
	return p == "" || p == s.Process
}
