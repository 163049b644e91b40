package pullslots

import (
	"context"
	"fmt"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// hold renews the held Lease until release is called. seed, when set, is the
// list this node pulls first: release marks it seeded unless ctx is done.
func (s *Semaphore) hold(ctx context.Context, held *coordinationv1.Lease, seed string) func() {
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
			if ctx.Err() != nil {
				seed = "" // cut short: the next holder of the seed slot pulls the list first
			}
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.ReleaseTimeout)
			defer cancel()
			if err := s.release(rctx, le, seed); err != nil {
				s.Log.Error("release pull slot; it frees when its lease expires", "lease", le.Name, "error", err.Error(), "leaseDuration", s.LeaseDuration)
				return
			}
			if seed != "" {
				s.Log.Info("pull slot released; the list is seeded: every slot is open to it", "lease", le.Name, "list", seed)
				return
			}
			s.Log.Info("pull slot released", "lease", le.Name)
		})
	}
}

// release clears the holder, keeping the Lease for the next node (cheaper for
// everybody than delete and create, and its leaseTransitions stay a record).
// A Lease that is no longer ours is left alone. seed, when set, is written as
// the Lease's SeededAnnotation in the same update.
func (s *Semaphore) release(ctx context.Context, le *coordinationv1.Lease, seed string) error {
	leases := s.Client.Leases(s.Namespace)
	for attempt := 0; ; attempt++ {
		cp := le.DeepCopy()
		cp.Spec.HolderIdentity = nil
		delete(cp.Annotations, ProcessAnnotation)
		if seed != "" {
			if cp.Annotations == nil {
				cp.Annotations = map[string]string{}
			}
			cp.Annotations[SeededAnnotation] = seed
		}
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
		if ptr.Deref(fresh.Spec.HolderIdentity, "") != s.Holder || !s.ownProcess(fresh) {
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
	if ptr.Deref(le.Spec.HolderIdentity, "") != s.Holder || !s.ownProcess(le) {
		return
	}
	if err := s.release(rctx, le, ""); err != nil {
		s.Log.Warn("release pull slot after cancelled claim", "lease", name, "error", err.Error())
	}
}
