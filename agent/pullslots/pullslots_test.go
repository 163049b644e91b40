package pullslots

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"
)

const ns = "prefetch"

var leasesGVR = coordinationv1.SchemeGroupVersion.WithResource("leases")

// newClient is a fake clientset whose Lease writes behave like the API
// server's: resourceVersions are set and an Update with a stale one is a
// Conflict (the stock fake tracker accepts any write).
func newClient(t *testing.T, objs ...runtime.Object) *fake.Clientset {
	t.Helper()
	c := fake.NewClientset(objs...)
	var rv atomic.Int64
	rv.Store(100)
	tracker := c.Tracker()
	c.PrependReactor("create", "leases", func(a k8stesting.Action) (bool, runtime.Object, error) {
		le := a.(k8stesting.CreateAction).GetObject().(*coordinationv1.Lease).DeepCopy()
		le.ResourceVersion = strconv.FormatInt(rv.Add(1), 10)
		if err := tracker.Create(leasesGVR, le, a.GetNamespace()); err != nil {
			return true, nil, err
		}
		return true, le, nil
	})
	c.PrependReactor("update", "leases", func(a k8stesting.Action) (bool, runtime.Object, error) {
		le := a.(k8stesting.UpdateAction).GetObject().(*coordinationv1.Lease).DeepCopy()
		cur, err := tracker.Get(leasesGVR, a.GetNamespace(), le.Name)
		if err != nil {
			return true, nil, err
		}
		if cur.(*coordinationv1.Lease).ResourceVersion != le.ResourceVersion {
			return true, nil, apierrors.NewConflict(leasesGVR.GroupResource(), le.Name, errors.New("the object has been modified"))
		}
		le.ResourceVersion = strconv.FormatInt(rv.Add(1), 10)
		if err := tracker.Update(leasesGVR, le, a.GetNamespace()); err != nil {
			return true, nil, err
		}
		return true, le, nil
	})
	return c
}

func newSem(t *testing.T, c *fake.Clientset, holder string, slots int, clk *clocktesting.FakeClock) *Semaphore {
	t.Helper()
	cfg := Semaphore{
		Client:        c.CoordinationV1(),
		Namespace:     ns,
		Instance:      "my-images",
		Holder:        holder,
		Slots:         slots,
		LeaseDuration: 30 * time.Second,
		Log:           slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", holder),
	}
	if clk != nil {
		cfg.Clock = clk
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}

func getLease(t *testing.T, c *fake.Clientset, name string) *coordinationv1.Lease {
	t.Helper()
	le, err := c.CoordinationV1().Leases(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return le
}

func holderOf(le *coordinationv1.Lease) string { return ptr.Deref(le.Spec.HolderIdentity, "") }

// holders maps each slot Lease to its holder.
func holders(t *testing.T, c *fake.Clientset) map[string]string {
	t.Helper()
	l, err := c.CoordinationV1().Leases(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, le := range l.Items {
		out[le.Name] = holderOf(&le)
	}
	return out
}

func countActions(c *fake.Clientset, verb string) int {
	n := 0
	for _, a := range c.Actions() {
		if a.GetVerb() == verb && a.GetResource().Resource == "leases" {
			n++
		}
	}
	return n
}

// eventually polls cond (real time) for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// countWatches makes c count the Lease watches it has registered. The fake
// tracker does not replay what changed between a list and the watch after it,
// so a test that changes a Lease for a waiter to see waits for its watch first.
func countWatches(c *fake.Clientset) *atomic.Int32 {
	var n atomic.Int32
	c.PrependWatchReactor("leases", func(a k8stesting.Action) (bool, watch.Interface, error) {
		var opts metav1.ListOptions
		if wa, ok := a.(k8stesting.WatchActionImpl); ok {
			opts = wa.ListOptions
		}
		w, err := c.Tracker().Watch(a.GetResource(), a.GetNamespace(), opts)
		if err != nil {
			return true, nil, err
		}
		n.Add(1)
		return true, w, nil
	})
	return &n
}

type result struct {
	release func()
	err     error
}

func acquireAsync(ctx context.Context, s *Semaphore, list string) <-chan result {
	ch := make(chan result, 1)
	go func() {
		r, err := s.Acquire(ctx, list)
		ch <- result{r, err}
	}()
	return ch
}

func TestAcquireCreatesLabelledSlotsAndReleaseClearsHolder(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	a, b := newSem(t, c, "node-a", 2, nil), newSem(t, c, "node-b", 2, nil)
	ctx := context.Background()
	ra, err := a.Acquire(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	rb, err := b.Acquire(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	h := holders(t, c)
	if len(h) != 2 || h["my-images-pull-slot-0"] == h["my-images-pull-slot-1"] {
		t.Fatalf("two holders of two slots, got %v", h)
	}
	le := getLease(t, c, "my-images-pull-slot-0")
	if le.Labels[LabelInstance] != "my-images" || le.Labels[LabelComponent] != "pull-slot" || le.Labels[LabelName] != "image-prefetcher" {
		t.Errorf("labels %v", le.Labels)
	}
	if le.Spec.LeaseDurationSeconds == nil || *le.Spec.LeaseDurationSeconds != 30 || le.Spec.RenewTime == nil || le.Spec.AcquireTime == nil {
		t.Errorf("spec %+v", le.Spec)
	}
	ra()
	ra() // twice is harmless
	rb()
	for name, holder := range holders(t, c) {
		if holder != "" {
			t.Errorf("%s still held by %q after release", name, holder)
		}
	}
	// The Leases stay for the next node: a release is an update, not a delete.
	if n := countActions(c, "delete"); n != 0 {
		t.Errorf("%d deletes", n)
	}
}

func TestContentionWaitsForRelease(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	a, b := newSem(t, c, "node-a", 1, nil), newSem(t, c, "node-b", 1, nil)
	ctx := context.Background()
	ra, err := a.Acquire(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	ch := acquireAsync(ctx, b, "")
	eventually(t, "b to watch", func() bool { return countActions(c, "watch") >= 1 })
	select {
	case r := <-ch:
		t.Fatalf("b acquired a held slot (err %v)", r.err)
	case <-time.After(50 * time.Millisecond):
	}
	writesBefore := countActions(c, "update") + countActions(c, "create")
	ra()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	if h := holderOf(getLease(t, c, "my-images-pull-slot-0")); h != "node-b" {
		t.Fatalf("holder %q, want node-b", h)
	}
	// a's release and b's claim: a waiter does not poll.
	if n := countActions(c, "update") + countActions(c, "create") - writesBefore; n != 2 {
		t.Errorf("%d writes for one hand-over, want 2", n)
	}
	if n := countActions(c, "list"); n != 2 {
		t.Errorf("%d lists, want one per Acquire", n)
	}
	r.release()
}

func TestBoundHoldsUnderContention(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	const k, n = 3, 24
	var inside, peak atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		s := newSem(t, c, fmt.Sprintf("node-%02d", i), k, nil)
		s.ClaimJitter = 5 * time.Millisecond
		s.StartJitter = 20 * time.Millisecond
		wg.Add(1)
		go func() {
			defer wg.Done()
			release, err := s.Acquire(context.Background(), "")
			if err != nil {
				errs <- err
				return
			}
			now := inside.Add(1)
			for {
				p := peak.Load()
				if now <= p || peak.CompareAndSwap(p, now) {
					break
				}
			}
			time.Sleep(5 * time.Millisecond)
			inside.Add(-1)
			release()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if p := peak.Load(); p > k {
		t.Errorf("%d holders at once, bound %d", p, k)
	}
	for name, holder := range holders(t, c) {
		if holder != "" {
			t.Errorf("%s still held by %q", name, holder)
		}
	}
}

func TestExpiredSlotOfDeadNodeIsReclaimed(t *testing.T) {
	t.Parallel()
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 1, 10, 0, 0, 0, time.UTC))
	dead, secs, renew := "dead-node", int32(30), metav1.NewMicroTime(clk.Now().Add(-time.Hour))
	c := newClient(t, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "my-images-pull-slot-0", Namespace: ns, ResourceVersion: "7",
			Labels: map[string]string{LabelName: "image-prefetcher", LabelInstance: "my-images", LabelComponent: "pull-slot"}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &dead, LeaseDurationSeconds: &secs, RenewTime: &renew, LeaseTransitions: ptr.To[int32](4)},
	})
	b := newSem(t, c, "node-b", 1, clk)
	ch := acquireAsync(context.Background(), b, "")
	// The renewTime written by the dead node's clock is not trusted: b waits a
	// whole duration on its own clock from when it first saw the Lease.
	eventually(t, "b to wait on the expiry timer", func() bool { return countActions(c, "watch") >= 1 && clk.HasWaiters() })
	clk.Step(29 * time.Second)
	select {
	case r := <-ch:
		t.Fatalf("reclaimed before the lease duration passed (err %v)", r.err)
	case <-time.After(50 * time.Millisecond):
	}
	clk.Step(2 * time.Second)
	var r result
	select {
	case r = <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("expired slot not reclaimed")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	le := getLease(t, c, "my-images-pull-slot-0")
	if holderOf(le) != "node-b" || ptr.Deref(le.Spec.LeaseTransitions, 0) != 5 {
		t.Errorf("holder %q transitions %d, want node-b 5", holderOf(le), ptr.Deref(le.Spec.LeaseTransitions, 0))
	}
	r.release()
}

// A holder that wrote an hour-long lease and stopped renewing (a bad or
// broken agent) keeps the slot no longer than the waiter's own duration: it
// cannot stall every other node's pulls.
func TestHolderCannotStretchItsLease(t *testing.T) {
	t.Parallel()
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 1, 10, 0, 0, 0, time.UTC))
	bad, secs := "bad-node", int32(3600)
	c := newClient(t, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "my-images-pull-slot-0", Namespace: ns, ResourceVersion: "7",
			Labels: map[string]string{LabelName: "image-prefetcher", LabelInstance: "my-images", LabelComponent: "pull-slot"}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &bad, LeaseDurationSeconds: &secs},
	})
	b := newSem(t, c, "node-b", 1, clk)
	ch := acquireAsync(context.Background(), b, "")
	eventually(t, "b to wait on the expiry timer", func() bool { return countActions(c, "watch") >= 1 && clk.HasWaiters() })
	clk.Step(31 * time.Second)
	var r result
	select {
	case r = <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("a slot held with an hour-long lease was not taken over after the waiter's 30s")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	if h := holderOf(getLease(t, c, "my-images-pull-slot-0")); h != "node-b" {
		t.Errorf("holder %q, want node-b", h)
	}
	r.release()
}

func TestRenewedWhileHeld(t *testing.T) {
	t.Parallel()
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 1, 10, 0, 0, 0, time.UTC))
	c := newClient(t)
	a := newSem(t, c, "node-a", 1, clk)
	release, err := a.Acquire(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	first := getLease(t, c, "my-images-pull-slot-0").Spec.RenewTime.Time
	for i := 1; i <= 3; i++ {
		eventually(t, "the renewal timer", clk.HasWaiters)
		clk.Step(10 * time.Second)
		want := first.Add(time.Duration(i) * 10 * time.Second)
		eventually(t, "a renewal", func() bool {
			return getLease(t, c, "my-images-pull-slot-0").Spec.RenewTime.Time.Equal(want)
		})
	}
	release()
	if h := holderOf(getLease(t, c, "my-images-pull-slot-0")); h != "" {
		t.Errorf("held by %q after release", h)
	}
}

func TestOwnSlotFromBeforeRestartIsTakenBack(t *testing.T) {
	t.Parallel()
	me, secs, renew := "node-a", int32(30), metav1.NewMicroTime(time.Now())
	c := newClient(t, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "my-images-pull-slot-0", Namespace: ns, ResourceVersion: "7",
			Labels: map[string]string{LabelName: "image-prefetcher", LabelInstance: "my-images", LabelComponent: "pull-slot"}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &me, LeaseDurationSeconds: &secs, RenewTime: &renew},
	})
	a := newSem(t, c, me, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	release, err := a.Acquire(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	release()
}

func TestCancelWhileWaitingHoldsNothing(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	a, b := newSem(t, c, "node-a", 1, nil), newSem(t, c, "node-b", 1, nil)
	ra, err := a.Acquire(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer ra()
	ctx, cancel := context.WithCancel(context.Background())
	ch := acquireAsync(ctx, b, "")
	eventually(t, "b to watch", func() bool { return countActions(c, "watch") >= 1 })
	cancel()
	r := <-ch
	if !errors.Is(r.err, context.Canceled) || r.release != nil {
		t.Fatalf("Acquire after cancel: %v", r.err)
	}
	if h := holderOf(getLease(t, c, "my-images-pull-slot-0")); h != "node-a" {
		t.Errorf("holder %q, want node-a", h)
	}
}

// A shutdown cancels the pass's context before release runs: release must
// still clear the holder (its own detached context).
func TestReleaseAfterCancelStillFreesTheSlot(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	a := newSem(t, c, "node-a", 1, nil)
	ctx, cancel := context.WithCancel(context.Background())
	release, err := a.Acquire(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	release()
	if h := holderOf(getLease(t, c, "my-images-pull-slot-0")); h != "" {
		t.Errorf("held by %q after release on a cancelled context", h)
	}
}

// A holder whose slot was taken over (its renewals failed for a whole
// duration) must not clear the new holder's claim.
func TestLostSlotIsNotReleasedOverTheNewHolder(t *testing.T) {
	t.Parallel()
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 1, 10, 0, 0, 0, time.UTC))
	c := newClient(t)
	a := newSem(t, c, "node-a", 1, clk)
	release, err := a.Acquire(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	le := getLease(t, c, "my-images-pull-slot-0")
	other := "node-b"
	le.Spec.HolderIdentity = &other
	if _, err := c.CoordinationV1().Leases(ns).Update(context.Background(), le, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the renewal timer", clk.HasWaiters)
	clk.Step(10 * time.Second) // the renewal conflicts: the slot is lost
	eventually(t, "the renewal attempt", func() bool { return countActions(c, "update") >= 2 })
	release()
	if h := holderOf(getLease(t, c, "my-images-pull-slot-0")); h != "node-b" {
		t.Errorf("holder %q, want node-b kept", h)
	}
}

// A slot judged free is claimed over the version of its Lease that was judged:
// when the informer brings another node's claim between the judgement and the
// write, the write conflicts instead of landing over that claim. (Found by the
// 200-agent scale test against a real API server: two nodes held one slot.)
func TestClaimWritesOverTheVersionJudgedFree(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := newClient(t)
	a, b := newSem(t, c, "node-a", 1, nil), newSem(t, c, "node-b", 1, nil)
	free, err := c.CoordinationV1().Leases(ns).Create(ctx, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "my-images-pull-slot-0", Namespace: ns},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	store := cache.NewStore(cache.MetaNamespaceKeyFunc)
	if err := store.Add(free); err != nil {
		t.Fatal(err)
	}
	wb := &waiter{s: b, slots: make([]slotState, 1)}
	cands, _ := wb.candidates(store)
	if len(cands) != 1 {
		t.Fatalf("candidates %v, want the free slot 0", cands)
	}

	// node-a claims the slot, and the informer's store has that claim before node-b writes.
	wa := &waiter{s: a, slots: make([]slotState, 1)}
	heldA, err := wa.claim(ctx, candidate{slot: 0, lease: free})
	if err != nil || heldA == nil {
		t.Fatalf("node-a's claim: %v, %v", heldA, err)
	}
	if err := store.Update(heldA); err != nil {
		t.Fatal(err)
	}
	heldB, err := wb.claim(ctx, cands[0])
	if err != nil {
		t.Fatal(err)
	}
	if heldB != nil {
		t.Errorf("node-b claimed slot 0 over node-a's claim (resourceVersion %s)", heldB.ResourceVersion)
	}
	if h := holderOf(getLease(t, c, "my-images-pull-slot-0")); h != "node-a" {
		t.Errorf("holder %q, want node-a kept", h)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	t.Parallel()
	c := fake.NewClientset().CoordinationV1()
	for name, s := range map[string]Semaphore{
		"no slots":       {Client: c, Namespace: ns, Instance: "x", Holder: "n"},
		"no namespace":   {Client: c, Instance: "x", Holder: "n", Slots: 1},
		"no holder":      {Client: c, Namespace: ns, Instance: "x", Slots: 1},
		"upper instance": {Client: c, Namespace: ns, Instance: "X", Holder: "n", Slots: 1},
		"no instance":    {Client: c, Namespace: ns, Holder: "n", Slots: 1},
		"short lease":    {Client: c, Namespace: ns, Instance: "x", Holder: "n", Slots: 1, LeaseDuration: time.Second},
		"long lease":     {Client: c, Namespace: ns, Instance: "x", Holder: "n", Slots: 1, LeaseDuration: MaxLeaseDuration + time.Second},
	} {
		if _, err := New(s); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// Missing RBAC is not waited out: Acquire fails and says why.
func TestForbiddenFailsInsteadOfWaiting(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	c.PrependReactor("list", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(leasesGVR.GroupResource(), "", errors.New("no RBAC"))
	})
	s := newSem(t, c, "node-a", 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := s.Acquire(ctx, ""); !apierrors.IsForbidden(err) {
		t.Fatalf("Acquire: %v, want Forbidden", err)
	}
}

// A watch that keeps failing is retried with a growing backoff (the
// informer's: 0.8 s, 1.6 s, ... with jitter up to as much again), not in a
// tight list-and-watch loop.
func TestFailingWatchBacksOff(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	a := newSem(t, c, "node-a", 1, nil)
	ra, err := a.Acquire(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer ra()
	c.PrependWatchReactor("leases", func(k8stesting.Action) (bool, watch.Interface, error) {
		return true, nil, apierrors.NewServiceUnavailable("etcd is down")
	})
	b := newSem(t, c, "node-b", 1, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch := acquireAsync(ctx, b, "")
	lists := func() int { return countActions(c, "list") - 1 } // a's list is the first
	eventually(t, "b's second list", func() bool { return lists() >= 2 })
	// The third list comes at least 1.6 s after the second.
	time.Sleep(1500 * time.Millisecond)
	if n := lists(); n != 2 {
		t.Errorf("%d lists within 1.5 s of the second: no growing backoff", n)
	}
	cancel()
	if r := <-ch; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("Acquire: %v", r.err)
	}
}

// Two processes of the instance on one node (run, and a fetch beside it) do
// not share a slot: the second waits for the first's like another node's, and
// gets it once the first frees it; it never frees the first one's slot.
func TestSecondProcessOfANodeWaitsForTheFirstsSlot(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	run, fetch := newSem(t, c, "node-a", 1, nil), newSem(t, c, "node-a", 1, nil)
	run.Process, fetch.Process = "agent-pod/1", "init-container/1"
	ctx := context.Background()
	release, err := run.Acquire(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if p := getLease(t, c, "my-images-pull-slot-0").Annotations[ProcessAnnotation]; p != run.Process {
		t.Fatalf("held slot names process %q, want %q", p, run.Process)
	}
	watches := countWatches(c)
	waitCtx, cancel := context.WithCancel(ctx)
	ch := acquireAsync(waitCtx, fetch, "")
	eventually(t, "the second process's watch", func() bool { return watches.Load() >= 1 })
	select {
	case r := <-ch:
		t.Fatalf("the second process took the slot its node's first process holds (err %v)", r.err)
	case <-time.After(100 * time.Millisecond):
	}
	cancel()
	if r := <-ch; r.err == nil {
		t.Fatal("a cancelled wait acquired")
	}
	if h := getLease(t, c, "my-images-pull-slot-0"); holderOf(h) != "node-a" || h.Annotations[ProcessAnnotation] != run.Process {
		t.Fatalf("after the second process gave up: holder %q process %q, want the first's", holderOf(h), h.Annotations[ProcessAnnotation])
	}
	before := watches.Load()
	ch = acquireAsync(ctx, fetch, "")
	eventually(t, "the second process's new watch", func() bool { return watches.Load() > before })
	release()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	if p := getLease(t, c, "my-images-pull-slot-0").Annotations[ProcessAnnotation]; p != fetch.Process {
		t.Errorf("slot names process %q after the hand-over, want %q", p, fetch.Process)
	}
	r.release()
}

func newSeedSem(t *testing.T, c *fake.Clientset, holder string, slots int) *Semaphore {
	t.Helper()
	s := newSem(t, c, holder, slots, nil)
	s.Seed = true
	return s
}

// With Seed, a new list goes to one node alone: the others wait although a slot is free, until the
// seed slot's holder releases it at the end of its pass; then every slot is open to that list.
func TestSeedFirstPullsAloneUntilSeeded(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	a, b, d := newSeedSem(t, c, "node-a", 2), newSeedSem(t, c, "node-b", 2), newSeedSem(t, c, "node-d", 2)
	ctx := context.Background()
	ra, err := a.Acquire(ctx, "list-1")
	if err != nil {
		t.Fatal(err)
	}
	if h := holders(t, c); h["my-images-pull-slot-0"] != "node-a" {
		t.Fatalf("the seeder holds %v, want slot 0", h)
	}
	chB, chD := acquireAsync(ctx, b, "list-1"), acquireAsync(ctx, d, "list-1")
	select {
	case r := <-chB:
		t.Fatalf("node-b took a slot while the list was being seeded (err %v); holders %v", r.err, holders(t, c))
	case r := <-chD:
		t.Fatalf("node-d took a slot while the list was being seeded (err %v); holders %v", r.err, holders(t, c))
	case <-time.After(300 * time.Millisecond):
	}
	ra()
	if got := getLease(t, c, "my-images-pull-slot-0").Annotations[SeededAnnotation]; got != "list-1" {
		t.Fatalf("after the seeder's release slot 0 says seeded %q, want list-1", got)
	}
	// Both waiters hold a slot at once: seeded, the list has every slot.
	rb, rd := <-chB, <-chD
	if rb.err != nil || rd.err != nil {
		t.Fatalf("after seeding: %v, %v", rb.err, rd.err)
	}
	if h := holders(t, c); len(h) != 2 || h["my-images-pull-slot-0"] == "" || h["my-images-pull-slot-1"] == "" {
		t.Errorf("after seeding both slots should be held, got %v", h)
	}
	rb.release()
	rd.release()
	if got := getLease(t, c, "my-images-pull-slot-0").Annotations[SeededAnnotation]; got != "list-1" {
		t.Errorf("a later holder's release changed the seed mark to %q", got)
	}

	// A new list is seeded again: its first node takes slot 0 (slot 1 is free too) and marks it.
	r2, err := b.Acquire(ctx, "list-2")
	if err != nil {
		t.Fatal(err)
	}
	if h := holders(t, c); h["my-images-pull-slot-0"] != "node-b" {
		t.Fatalf("a new list's first node holds %v, want slot 0", h)
	}
	r2()
	if got := getLease(t, c, "my-images-pull-slot-0").Annotations[SeededAnnotation]; got != "list-2" {
		t.Errorf("after the new list's seeding slot 0 says %q, want list-2", got)
	}
}

// A seeder whose pass is cut short (its context done: shutdown, the pass's deadline) seeds nothing: the
// next node to take slot 0 pulls the list first.
func TestSeedCutShortSeedsNothing(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	a, b := newSeedSem(t, c, "node-a", 3), newSeedSem(t, c, "node-b", 3)
	ctx, cancel := context.WithCancel(context.Background())
	ra, err := a.Acquire(ctx, "list-1")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	ra()
	le := getLease(t, c, "my-images-pull-slot-0")
	if got, ok := le.Annotations[SeededAnnotation]; ok || ptr.Deref(le.Spec.HolderIdentity, "") != "" {
		t.Fatalf("a cut-short seeder left seeded=%q (set %v), holder %q", got, ok, ptr.Deref(le.Spec.HolderIdentity, ""))
	}
	rb, err := b.Acquire(context.Background(), "list-1")
	if err != nil {
		t.Fatal(err)
	}
	if h := holders(t, c); h["my-images-pull-slot-0"] != "node-b" || h["my-images-pull-slot-1"] != "" {
		t.Errorf("the next node should seed through slot 0 alone, holders %v", h)
	}
	rb()
}

// Without Seed (or without a list digest) every free slot is taken at once, as before.
func TestNoSeedTakesAnyFreeSlot(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	a, b := newSem(t, c, "node-a", 2, nil), newSeedSem(t, c, "node-b", 2)
	ctx := context.Background()
	ra, err := a.Acquire(ctx, "list-1")
	if err != nil {
		t.Fatal(err)
	}
	rb, err := b.Acquire(ctx, "") // no digest: nothing to seed
	if err != nil {
		t.Fatal(err)
	}
	if h := holders(t, c); len(h) != 2 || h["my-images-pull-slot-0"] == "" || h["my-images-pull-slot-1"] == "" {
		t.Errorf("holders %v, want both slots", h)
	}
	ra()
	rb()
	if _, ok := getLease(t, c, "my-images-pull-slot-0").Annotations[SeededAnnotation]; ok {
		t.Errorf("a semaphore without Seed marked a list seeded")
	}
}
