package app

// An image of the list removed while a pass runs (the kubelet's image GC,
// which the pass's own pulls trigger by filling the disk): the node claims the
// list (label `succeeded`, condition True, startup taint removed) only after
// a presence check of the whole list at the end of the pass.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// claimWatch records every node write that makes the node claim the list
// (label to succeeded, condition to True, our startup taint removed) while
// one of refs is not on the fake runtime.
type claimWatch struct {
	mu  sync.Mutex
	bad []string
}

func watchClaims(client *fake.Clientset, cri *critest.Server, refs ...string) *claimWatch {
	w := &claimWatch{}
	apply := k8stesting.ObjectReaction(client.Tracker())
	nodes := schema.GroupVersionResource{Version: "v1", Resource: "nodes"}
	claims := func(n *corev1.Node) (label, cond, untainted bool) {
		for _, c := range n.Status.Conditions {
			cond = cond || (c.Type == nodelabel.ConditionType(testInstance) && c.Status == corev1.ConditionTrue)
		}
		return n.Labels[nodelabel.Key(testInstance)] == string(nodelabel.Succeeded), cond, !hasTaint(n, ourTaint)
	}
	client.PrependReactor("patch", "nodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		old, err := client.Tracker().Get(nodes, "", testNode)
		if err != nil {
			return true, nil, err
		}
		handled, obj, err := apply(a)
		n, ok := obj.(*corev1.Node)
		if err != nil || !ok {
			return handled, obj, err
		}
		var gone []string
		for _, r := range refs {
			if !cri.HasImage(r) {
				gone = append(gone, r)
			}
		}
		l0, c0, u0 := claims(old.(*corev1.Node))
		l1, c1, u1 := claims(n)
		var made []string
		if l1 && !l0 {
			made = append(made, "label succeeded")
		}
		if c1 && !c0 {
			made = append(made, "condition True")
		}
		if u1 && !u0 {
			made = append(made, "startup taint removed")
		}
		if len(gone) > 0 && len(made) > 0 {
			w.mu.Lock()
			w.bad = append(w.bad, fmt.Sprintf("%s with %v missing", strings.Join(made, ", "), gone))
			w.mu.Unlock()
		}
		return handled, obj, err
	})
	return w
}

func (w *claimWatch) violations() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.bad...)
}

// requireNoFalseClaim checks the node after a pass that may end either way:
// failed naming ref, or succeeded with ref present; never claimed without it.
func requireNoFalseClaim(t *testing.T, cri *critest.Server, client *fake.Clientset, w *claimWatch, rep passReport, ref string) {
	t.Helper()
	for _, v := range w.violations() {
		t.Errorf("node written claiming the list without it: %s", v)
	}
	node := storedNode(t, client)
	label := node.Labels[nodelabel.Key(testInstance)]
	switch {
	case rep.State == nodelabel.Succeeded && !cri.HasImage(ref):
		t.Errorf("pass ended succeeded with %s missing (runtime holds %v)", ref, cri.Images())
	case rep.State == nodelabel.Failed:
		named := false
		for _, f := range rep.Failed() {
			named = named || f.Image == ref
		}
		if !named {
			t.Errorf("pass failed without naming %s: %+v", ref, rep.Failed())
		}
	}
	if label == string(nodelabel.Succeeded) && !cri.HasImage(ref) {
		t.Errorf("label succeeded with %s missing", ref)
	}
	if c := ourCondition(t, client); c != nil && c.Status == corev1.ConditionTrue && !cri.HasImage(ref) {
		t.Errorf("condition True with %s missing: %+v", ref, c)
	}
	if !hasTaint(node, ourTaint) && !cri.HasImage(ref) {
		t.Errorf("startup taint removed with %s missing", ref)
	}
}

// (a) An image present when the pass starts is removed while the pass pulls
// another one, or after the pass asked for it: the pass pulls it again and
// says succeeded with it present.
func TestImageRemovedDuringThePassIsNotClaimed(t *testing.T) {
	t.Run("while another image is pulled", func(t *testing.T) {
		cri := critest.Start(t)
		cri.AddImage(present, critest.Image{Size: 10})
		cri.OnPull(pullable, critest.Succeed().Doing(func() { cri.DeleteImage(present) }))
		client := gatedNodeClient(ourTaint)
		w := watchClaims(client, cri, present, pullable)
		p, logs := newFaultPrefetcher(t, gateOptions(cri.Path(), writeList(t, present, pullable)), false, client)

		rep, err := p.pass(context.Background())
		if err != nil {
			t.Fatalf("pass: %v\n%s", err, logs)
		}
		requireNoFalseClaim(t, cri, client, w, rep, present)
		if rep.State != nodelabel.Succeeded || !cri.HasImage(present) {
			t.Errorf("state %s, %s present %v: want it pulled again within the pass and succeeded\n%s",
				rep.State, present, cri.HasImage(present), logs)
		}
		if n := cri.PullCalls(present); n != 1 {
			t.Errorf("%d pulls of the removed image, want 1 (pulled again once)", n)
		}
		if code := p.fetchExit(rep, err); code != ExitOK {
			t.Errorf("fetch exit %d, want 0 with the list whole again", code)
		}
	})

	// Nothing missing at the start, so the label says succeeded all along:
	// the image goes after the pass asked for it, the node must stop
	// claiming the list before the pull that fills the hole.
	t.Run("after the start's presence check, under succeeded", func(t *testing.T) {
		cri := critest.Start(t)
		cri.AddImage(present, critest.Image{Size: 10})
		cri.AddImage(pullable, critest.Image{Size: 10})
		client := gatedNodeClient(ourTaint)
		p, logs := newFaultPrefetcher(t, gateOptions(cri.Path(), writeList(t, present, pullable)), true, client)
		if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
			t.Fatalf("first pass: %s %v", rep.State, err)
		}
		// The first ImageStatus of the next pass for pullable comes after
		// present's: GC removes present then.
		cri.OnStatus(pullable, critest.Succeed().Doing(func() { cri.DeleteImage(present) }), critest.Succeed())
		var labelAtRepull string
		cri.OnPull(present, critest.Succeed().Doing(func() {
			labelAtRepull = storedNode(t, client).Labels[nodelabel.Key(testInstance)]
		}))
		w := watchClaims(client, cri, present, pullable)

		rep, err := p.pass(context.Background())
		if err != nil {
			t.Fatalf("pass: %v\n%s", err, logs)
		}
		requireNoFalseClaim(t, cri, client, w, rep, present)
		if rep.State != nodelabel.Succeeded || !cri.HasImage(present) {
			t.Errorf("state %s, %s present %v: want it pulled again within the pass and succeeded\n%s",
				rep.State, present, cri.HasImage(present), logs)
		}
		if labelAtRepull == string(nodelabel.Succeeded) {
			t.Errorf("the node said succeeded while the removed image was pulled again\n%s", logs)
		}
		if c := ourCondition(t, client); c == nil || c.Status != corev1.ConditionTrue {
			t.Errorf("condition after the hole was filled: %+v, want True", c)
		}
	})

	// GC removes it again as soon as it is back: one more round, then the
	// pass ends failed naming it.
	t.Run("again after its re-pull", func(t *testing.T) {
		cri := critest.Start(t)
		cri.AddImage(present, critest.Image{Size: 10})
		cri.OnPull(pullable, critest.Succeed().Doing(func() { cri.DeleteImage(present) }))
		cri.OnPull(present, critest.Succeed().AndThen(func() { cri.DeleteImage(present) }))
		client := gatedNodeClient(ourTaint)
		w := watchClaims(client, cri, present, pullable)
		p, logs := newFaultPrefetcher(t, gateOptions(cri.Path(), writeList(t, present, pullable)), false, client)

		rep, err := p.pass(context.Background())
		if err != nil {
			t.Fatalf("pass: %v\n%s", err, logs)
		}
		requireNoFalseClaim(t, cri, client, w, rep, present)
		if rep.State != nodelabel.Failed {
			t.Fatalf("state %s with %s gone after every pull, want failed\n%s", rep.State, present, logs)
		}
		if n := cri.PullCalls(present); n != 1 {
			t.Errorf("%d pulls of the removed image, want 1: one more round, bounded", n)
		}
		if got := storedNode(t, client).Labels[nodelabel.Key(testInstance)]; got != string(nodelabel.Failed) {
			t.Errorf("label %q, want failed", got)
		}
		for _, f := range rep.Failed() {
			if f.Image == present && f.Reason != pull.ReasonRemoved {
				t.Errorf("reason %s, want %s", f.Reason, pull.ReasonRemoved)
			}
		}
		if c := ourCondition(t, client); c == nil || c.Status != corev1.ConditionFalse || !strings.Contains(c.Message, present) {
			t.Errorf("condition %+v, want False naming %s", c, present)
		}
		if code := p.fetchExit(rep, err); code != ExitFailed {
			t.Errorf("fetch exit %d, want %d", code, ExitFailed)
		}
	})
}

// A withdrawal of succeeded that fails (the API server down when a pass
// finds a hole) does not stop the pulls, nor wait for the pass's end: it is
// retried meanwhile and lands as soon as the API server takes writes again,
// while the re-pull still runs.
func TestFailedWithdrawalIsRetriedWhileThePassPulls(t *testing.T) {
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 10})
	client := newNodeClient()
	o := testOptions(cri.Path(), writeList(t, present, pullable))
	o.LabelWriteTimeout = 300 * time.Millisecond
	// One attempt waits for the test to let the pull end.
	o.Pull.InitialAttemptTimeout, o.Pull.MaxAttemptTimeout = 30*time.Second, 30*time.Second
	p, logs := newFaultPrefetcher(t, o, true, client)
	labeler(p).Backoff = &fewSteps
	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("first pass: %s %v", rep.State, err)
	}

	cri.DeleteImage(pullable)
	cri.ResetCounters()
	release := make(chan struct{})
	var once sync.Once
	let := func() { once.Do(func() { close(release) }) }
	t.Cleanup(let)
	cri.OnPull(pullable, critest.Succeed().Doing(func() { <-release }))
	down := outage(client)
	done := make(chan passReport, 1)
	go func() { rep, _ := p.pass(context.Background()); done <- rep }()
	for deadline := time.Now().Add(10 * time.Second); cri.PullCalls(pullable) == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the hole is not pulled while the API server is down\n%s", logs)
		}
	}
	down.Store(false)
	back := time.Now()
	for {
		if _, ok := storedNode(t, client).Labels[nodelabel.Key(testInstance)]; !ok {
			break
		}
		if time.Since(back) > 5*time.Second {
			let()
			t.Fatalf("label still succeeded %s after the API server came back, with %s missing and its pull running\n%s",
				time.Since(back), pullable, logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("succeeded withdrawn %s after the API server came back, during the re-pull", time.Since(back).Round(time.Millisecond))
	if cri.HasImage(pullable) {
		t.Error("the pull had ended before the withdrawal: the test proves nothing")
	}
	let()
	rep := <-done
	if rep.State != nodelabel.Succeeded || rep.LabelErr != nil {
		t.Errorf("pass: %s, label error %v; want succeeded and written\n%s", rep.State, rep.LabelErr, logs)
	}
	if got := storedNode(t, client).Labels[nodelabel.Key(testInstance)]; got != string(nodelabel.Succeeded) || !cri.HasImage(pullable) {
		t.Errorf("label %q, %s present %v; want succeeded with it present", got, pullable, cri.HasImage(pullable))
	}
}

// An image the runtime does not answer for at the start of a pass is not
// known present: succeeded is withdrawn before the engine pulls it.
func TestImageStatusErrorAtTheStartWithdrawsFirst(t *testing.T) {
	cri := critest.Start(t)
	client := newNodeClient()
	p, logs := newFaultPrefetcher(t, testOptions(cri.Path(), writeList(t, present, pullable)), false, client)
	cri.AddImage(present, critest.Image{Size: 10})
	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("first pass: %s %v", rep.State, err)
	}
	cri.DeleteImage(pullable)
	cri.OnStatus(pullable, critest.Unavailable(), critest.Succeed())
	labelAtPull := "(not pulled)"
	cri.OnPull(pullable, critest.Succeed().Doing(func() {
		labelAtPull = storedNode(t, client).Labels[nodelabel.Key(testInstance)]
	}))

	rep, err := p.pass(context.Background())
	if err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("pass: %s %v\n%s", rep.State, err, logs)
	}
	if labelAtPull == string(nodelabel.Succeeded) || labelAtPull == "(not pulled)" {
		t.Errorf("label at the pull of the image the runtime did not answer for: %q, want it withdrawn first\n%s", labelAtPull, logs)
	}
}

// (c) A full disk: no retry within the pass, and everything that reports the
// failure says DiskFull, not something about the image.
func TestDiskFullIsNotRetriedAndSaysSo(t *testing.T) {
	cri := critest.Start(t)
	cri.OnPull(pullable, critest.DiskFull(pullable))
	client := gatedNodeClient(ourTaint)
	p, logs := newFaultPrefetcher(t, gateOptions(cri.Path(), writeList(t, pullable)), false, client)

	rep, err := p.pass(context.Background())
	if err != nil || rep.State != nodelabel.Failed {
		t.Fatalf("pass: %s %v", rep.State, err)
	}
	if n := cri.PullCalls(pullable); n != 1 {
		t.Errorf("%d pulls on a full disk, want 1", n)
	}
	if f := rep.Failed(); len(f) != 1 || f[0].Reason != pull.ReasonDiskFull {
		t.Errorf("failed %+v, want %s with %s", f, pullable, pull.ReasonDiskFull)
	}
	found := false
	for _, e := range nodeEvents(t, client) {
		found = found || (e.Reason == nodelabel.EventReasonFailed && strings.Contains(e.Message, pullable) &&
			strings.Contains(e.Message, string(pull.ReasonDiskFull)))
	}
	if !found {
		t.Errorf("no %s event naming %s with %s: %v", nodelabel.EventReasonFailed, pullable, pull.ReasonDiskFull, nodeEvents(t, client))
	}
	if c := ourCondition(t, client); c == nil || !strings.Contains(c.Message, "("+string(pull.ReasonDiskFull)+")") {
		t.Errorf("condition %+v, want its message to give %s", c, pull.ReasonDiskFull)
	}
	if got := metricValue(t, p, "image_prefetcher_image_failures_total", "reason", string(pull.ReasonDiskFull)); got != 1 {
		t.Errorf("image failures{reason=%s} = %v, want 1", pull.ReasonDiskFull, got)
	}
	if got := metricValue(t, p, "image_prefetcher_pull_attempts_total", "outcome", "failure", "reason", string(pull.ReasonDiskFull)); got != 1 {
		t.Errorf("attempts{failure,%s} = %v, want 1", pull.ReasonDiskFull, got)
	}
	for _, want := range []string{"reason=" + string(pull.ReasonDiskFull), "image file system is full"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log does not say %q:\n%s", want, logs)
		}
	}
}

// The check at the end costs one ListImages for the whole list: images are
// found by tag, by digest and by name:tag@digest without an ImageStatus
// each. An image the runtime lists under other names (as CRI-O may, having
// resolved a short name through its registries.conf) is asked by
// ImageStatus, so the runtime's own matching decides; so is every image when
// ListImages fails.
func TestFinalCheckIsOneListImagesCall(t *testing.T) {
	const (
		digest  = "registry.test/app/pinned@sha256:1111111111111111111111111111111111111111111111111111111111111111"
		tagged  = "registry.test/app/both:2@sha256:2222222222222222222222222222222222222222222222222222222222222222"
		aliased = "registry.test/app/aliased:1"
	)
	refs := []string{present, digest, tagged, aliased}
	cri := critest.Start(t)
	for _, r := range refs[:3] {
		cri.AddImage(r, critest.Image{Size: 10})
	}
	cri.AddImage(aliased, critest.Image{Size: 10, RepoTags: []string{"quay.io/app/aliased:1"},
		RepoDigests: []string{"quay.io/app/aliased@sha256:3333333333333333333333333333333333333333333333333333333333333333"}})
	p, _, _ := newTestPrefetcher(t, testOptions(cri.Path(), writeList(t, refs...)))
	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("pass: %s %v", rep.State, err)
	}
	if n := cri.ListCalls(); n != 1 {
		t.Errorf("%d ListImages calls, want 1", n)
	}
	for _, r := range refs[:3] {
		if n := cri.StatusCalls(r); n != 1 {
			t.Errorf("%s: %d ImageStatus calls, want 1 (the start's)", r, n)
		}
	}
	if n := cri.StatusCalls(aliased); n != 2 {
		t.Errorf("%s: %d ImageStatus calls, want 2 (the start's, and the check's for an image listed under other names)", aliased, n)
	}
	if n := cri.TotalPullCalls(); n != 0 {
		t.Errorf("%d pulls of present images", n)
	}

	cri.ResetCounters()
	cri.OnList(critest.Unavailable())
	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("pass with ListImages failing: %s %v", rep.State, err)
	}
	for _, r := range refs {
		if n := cri.StatusCalls(r); n != 2 {
			t.Errorf("%s: %d ImageStatus calls with ListImages failing, want 2", r, n)
		}
	}
}

// stuckGate never hands out a slot: every holder keeps its Lease alive.
type stuckGate struct{}

func (stuckGate) Acquire(ctx context.Context, _ string) (func(), error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// The wait for a pull slot is part of the pass: slots that never free end
// the pass as failed within --overall-timeout instead of holding the node's
// label (and its startup taint) forever.
func TestSlotWaitIsBoundedByThePassDeadline(t *testing.T) {
	cri := critest.Start(t)
	client := gatedNodeClient(ourTaint)
	o := gateOptions(cri.Path(), writeList(t, pullable))
	o.Pull.OverallTimeout = 200 * time.Millisecond
	p, logs := newFaultPrefetcher(t, o, false, client)
	p.slots = stuckGate{}

	done := make(chan struct{})
	var rep passReport
	var err error
	go func() {
		defer close(done)
		rep, err = p.pass(context.Background())
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("the pass still waits for a pull slot long after --overall-timeout\n%s", logs)
	}
	if err == nil || !strings.Contains(err.Error(), "pull slot") || rep.State != nodelabel.Failed {
		t.Errorf("pass: %s %v, want failed waiting for a pull slot", rep.State, err)
	}
	if n := cri.PullCalls(pullable); n != 0 {
		t.Errorf("%d pulls without a slot", n)
	}
}

// Another namespace's instance of the same name wrote the node's keys and still
// exists: the pass pulls nothing and writes nothing, and readiness says why.
// Once that instance is gone, the next pass takes the keys over.
func TestPassLeavesANameTakenInAnotherNamespaceAlone(t *testing.T) {
	cri := critest.Start(t)
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name:        testNode,
		Labels:      map[string]string{nodelabel.Key(testInstance): "succeeded"},
		Annotations: map[string]string{nodelabel.AnnotationKey(testInstance): "sha256:other-list"},
		ManagedFields: []metav1.ManagedFieldsEntry{{
			Manager: nodelabel.FieldManagerPrefix + "team-a", Operation: metav1.ManagedFieldsOperationUpdate, FieldsType: "FieldsV1",
			FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:metadata":{"f:annotations":{"f:` + nodelabel.AnnotationKey(testInstance) + `":{}}}}`)},
		}},
	}}
	other := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: testInstance, Namespace: "team-a",
		Labels: map[string]string{"app.kubernetes.io/name": "image-prefetcher", "app.kubernetes.io/instance": testInstance}}}
	client := fake.NewClientset(node, other)
	o := testOptions(cri.Path(), writeList(t, pullable))
	o.Namespace = "team-b"
	p, logs := newFaultPrefetcher(t, o, false, client)

	_, err := p.pass(context.Background())
	var conflict *nodelabel.ConflictError
	if !errors.As(err, &conflict) || conflict.Other != "team-a" {
		t.Fatalf("pass: %v, want the name conflict with team-a\n%s", err, logs)
	}
	if n := cri.PullCalls(pullable); n != 0 {
		t.Errorf("%d pulls under a taken name", n)
	}
	if w := writes(client); len(w) != 0 {
		t.Errorf("writes under a taken name: %v", w)
	}
	if err := p.readiness.Check(); err == nil || !strings.Contains(err.Error(), "team-a") {
		t.Errorf("readiness %v, want not ready naming team-a", err)
	}

	if err := client.AppsV1().DaemonSets("team-a").Delete(context.Background(), testInstance, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	p.node.Labels.(*nodelabel.Labeler).MaxCacheAge = time.Nanosecond
	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("pass after the other instance went: %s %v\n%s", rep.State, err, logs)
	}
}
