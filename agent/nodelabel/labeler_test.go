package nodelabel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	k8stesting "k8s.io/client-go/testing"
	testingclock "k8s.io/utils/clock/testing"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

const (
	nodeName = "node-1"
	instance = "my-images"
	digestA  = "aaaa1111"
	digestB  = "bbbb2222"
)

// fastBackoff keeps retry tests quick; the schedule itself is client-go's.
var fastBackoff = wait.Backoff{Duration: time.Millisecond, Factor: 1, Steps: 5}

func newNode(labels, annotations map[string]string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName, Labels: labels, Annotations: annotations}}
}

func newLabeler(client kubernetes.Interface) *Labeler {
	return &Labeler{Client: client, Node: nodeName, Instance: instance, Backoff: &fastBackoff}
}

// getNode reads the node from the fake's store, so that the read is not
// counted among the labeler's actions.
func getNode(t *testing.T, client *fake.Clientset) *corev1.Node {
	t.Helper()
	obj, err := client.Tracker().Get(schema.GroupVersionResource{Version: "v1", Resource: "nodes"}, "", nodeName)
	if err != nil {
		t.Fatalf("get node: %v", err)
	}
	return obj.(*corev1.Node)
}

func countVerb(client *fake.Clientset, verb string) int {
	n := 0
	for _, a := range client.Actions() {
		if a.GetVerb() == verb && a.GetResource().Resource == "nodes" {
			n++
		}
	}
	return n
}

// wantKeys checks this instance's label and annotation; "" means absent.
func wantKeys(t *testing.T, node *corev1.Node, label, digest string) {
	t.Helper()
	gotLabel, hasLabel := node.Labels[Key(instance)]
	if (label == "") == hasLabel || gotLabel != label {
		t.Errorf("label %s = %q (present %v), want %q", Key(instance), gotLabel, hasLabel, label)
	}
	gotDigest, hasDigest := node.Annotations[AnnotationKey(instance)]
	if (digest == "") == hasDigest || gotDigest != digest {
		t.Errorf("annotation %s = %q (present %v), want %q", AnnotationKey(instance), gotDigest, hasDigest, digest)
	}
}

func TestSetAddsReplacesAndKeepsOthers(t *testing.T) {
	t.Parallel()
	others := map[string]string{
		"kubernetes.io/hostname":              nodeName,
		"image-prefetcher.stackrox.io/other":  "succeeded",
		"node-role.kubernetes.io/worker":      "",
		"image-prefetcher.stackrox.io/other2": "failed",
	}
	otherAnn := map[string]string{
		"list.image-prefetcher.stackrox.io/other": "cccc",
		"node.alpha.kubernetes.io/ttl":            "0",
	}
	client := fake.NewClientset(newNode(copyMap(others), copyMap(otherAnn)))
	l := newLabeler(client)
	ctx := context.Background()

	if err := l.Begin(ctx, digestA); err != nil {
		t.Fatal(err)
	}
	wantKeys(t, getNode(t, client), "", digestA)
	if _, err := l.Set(ctx, digestA, Failed); err != nil {
		t.Fatal(err)
	}
	wantKeys(t, getNode(t, client), "failed", digestA)
	if _, err := l.Set(ctx, digestA, Succeeded); err != nil {
		t.Fatal(err)
	}
	node := getNode(t, client)
	wantKeys(t, node, "succeeded", digestA)
	for k, v := range others {
		if node.Labels[k] != v {
			t.Errorf("label %s = %q, want %q kept", k, node.Labels[k], v)
		}
	}
	for k, v := range otherAnn {
		if node.Annotations[k] != v {
			t.Errorf("annotation %s = %q, want %q kept", k, node.Annotations[k], v)
		}
	}
	if len(node.Labels) != len(others)+1 || len(node.Annotations) != len(otherAnn)+1 {
		t.Errorf("labels %v annotations %v: want only this instance's keys added", node.Labels, node.Annotations)
	}
	// One GET to learn the node, then one patch per change.
	if got := countVerb(client, "get"); got != 1 {
		t.Errorf("%d GETs, want 1", got)
	}
	if got := countVerb(client, "patch"); got != 3 {
		t.Errorf("%d patches, want 3", got)
	}
}

func TestPatchNamesOnlyThisInstance(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(nil, nil))
	l := newLabeler(client)
	if _, err := l.Set(context.Background(), digestA, Failed); err != nil {
		t.Fatal(err)
	}
	var patches []k8stesting.PatchAction
	for _, a := range client.Actions() {
		if p, ok := a.(k8stesting.PatchActionImpl); ok {
			patches = append(patches, p)
		}
	}
	if len(patches) != 1 {
		t.Fatalf("%d patches, want 1", len(patches))
	}
	if pt := patches[0].GetPatchType(); pt != types.MergePatchType {
		t.Errorf("patch type %s, want %s", pt, types.MergePatchType)
	}
	want := `{"metadata":{"annotations":{"list.image-prefetcher.stackrox.io/my-images":"aaaa1111"},` +
		`"labels":{"image-prefetcher.stackrox.io/my-images":"failed"}}}`
	if got := string(patches[0].GetPatch()); got != want {
		t.Errorf("patch %s, want %s", got, want)
	}
}

func TestNoWriteWhenUnchanged(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(
		map[string]string{Key(instance): "succeeded"},
		map[string]string{AnnotationKey(instance): digestA}))
	l := newLabeler(client)
	ctx := context.Background()
	for range 3 {
		if err := l.Begin(ctx, digestA); err != nil {
			t.Fatal(err)
		}
		if _, err := l.Set(ctx, digestA, Succeeded); err != nil {
			t.Fatal(err)
		}
	}
	if got := countVerb(client, "patch"); got != 0 {
		t.Errorf("%d patches in a steady state, want 0", got)
	}
	if got := countVerb(client, "get"); got != 1 {
		t.Errorf("%d GETs, want 1 (the state is cached)", got)
	}
	wantKeys(t, getNode(t, client), "succeeded", digestA)
}

func TestBeginClearsStaleLabel(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(
		map[string]string{Key(instance): "succeeded", Key("other"): "succeeded"},
		map[string]string{AnnotationKey(instance): digestA}))
	l := newLabeler(client)
	if err := l.Begin(context.Background(), digestB); err != nil {
		t.Fatal(err)
	}
	node := getNode(t, client)
	wantKeys(t, node, "", digestB)
	if node.Labels[Key("other")] != "succeeded" {
		t.Errorf("other instance's label lost: %v", node.Labels)
	}
	if got := countVerb(client, "patch"); got != 1 {
		t.Errorf("%d patches, want 1 (label removal and new digest together)", got)
	}
}

func TestBeginClearsLabelWithoutAnnotation(t *testing.T) {
	t.Parallel()
	// A label written by an older agent (or by hand) says nothing about which
	// list it describes, so it must not survive the start of a pass.
	client := fake.NewClientset(newNode(map[string]string{Key(instance): "succeeded"}, nil))
	if err := newLabeler(client).Begin(context.Background(), digestA); err != nil {
		t.Fatal(err)
	}
	wantKeys(t, getNode(t, client), "", digestA)
}

func TestRemove(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(
		map[string]string{Key(instance): "failed", "keep": "me"},
		map[string]string{AnnotationKey(instance): digestA, "keep": "me"}))
	l := newLabeler(client)
	if err := l.Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	node := getNode(t, client)
	wantKeys(t, node, "", "")
	if node.Labels["keep"] != "me" || node.Annotations["keep"] != "me" {
		t.Errorf("other keys lost: %v %v", node.Labels, node.Annotations)
	}
	// Removing again writes nothing.
	if err := l.Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := countVerb(client, "patch"); got != 1 {
		t.Errorf("%d patches, want 1", got)
	}
}

func TestExternalChangeIsRepaired(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(nil, nil))
	clk := testingclock.NewFakePassiveClock(time.Unix(1000, 0))
	l := newLabeler(client)
	l.Clock = clk
	ctx := context.Background()
	if _, err := l.Set(ctx, digestA, Succeeded); err != nil {
		t.Fatal(err)
	}
	// Someone removes the label behind the agent's back.
	if _, err := client.CoreV1().Nodes().Patch(ctx, nodeName, types.MergePatchType,
		[]byte(`{"metadata":{"labels":{"image-prefetcher.stackrox.io/my-images":null}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	// Within the cache age the agent trusts what it wrote ...
	if _, err := l.Set(ctx, digestA, Succeeded); err != nil {
		t.Fatal(err)
	}
	wantKeys(t, getNode(t, client), "", digestA)
	// ... and once it is older, it reads the node again and repairs it.
	clk.SetTime(clk.Now().Add(DefaultMaxCacheAge))
	if _, err := l.Set(ctx, digestA, Succeeded); err != nil {
		t.Fatal(err)
	}
	wantKeys(t, getNode(t, client), "succeeded", digestA)
}

// ctxClient fails node requests whose context is already done, like a real
// client does; the fake clientset ignores contexts.
type ctxClient struct {
	*fake.Clientset
	deadlines []time.Duration // remaining time of each request's context
}

func (c *ctxClient) CoreV1() typedcorev1.CoreV1Interface { return ctxCore{c.Clientset.CoreV1(), c} }

type ctxCore struct {
	typedcorev1.CoreV1Interface
	c *ctxClient
}

func (cc ctxCore) Nodes() typedcorev1.NodeInterface {
	return ctxNodes{cc.CoreV1Interface.Nodes(), cc.c}
}
func (cc ctxCore) Events(ns string) typedcorev1.EventInterface {
	return ctxEvents{cc.CoreV1Interface.Events(ns), cc.c}
}

type ctxNodes struct {
	typedcorev1.NodeInterface
	c *ctxClient
}

func (c *ctxClient) check(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		return errors.New("request without a deadline")
	}
	c.deadlines = append(c.deadlines, time.Until(deadline))
	return nil
}

func (n ctxNodes) Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Node, error) {
	if err := n.c.check(ctx); err != nil {
		return nil, err
	}
	return n.NodeInterface.Get(ctx, name, opts)
}

func (n ctxNodes) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions,
	sub ...string) (*corev1.Node, error) {
	if err := n.c.check(ctx); err != nil {
		return nil, err
	}
	return n.NodeInterface.Patch(ctx, name, pt, data, opts, sub...)
}

type ctxEvents struct {
	typedcorev1.EventInterface
	c *ctxClient
}

func (e ctxEvents) Create(ctx context.Context, ev *corev1.Event, opts metav1.CreateOptions) (*corev1.Event, error) {
	if err := e.c.check(ctx); err != nil {
		return nil, err
	}
	return e.EventInterface.Create(ctx, ev, opts)
}

func TestWriteDoesNotUsePassContext(t *testing.T) {
	t.Parallel()
	client := &ctxClient{Clientset: fake.NewClientset(newNode(
		map[string]string{Key(instance): "succeeded"},
		map[string]string{AnnotationKey(instance): digestA}))}
	l := newLabeler(client)
	l.WriteTimeout = time.Hour

	// The pass ran out of time: its context expired before the label write.
	expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	if err := l.Begin(expired, digestB); err != nil {
		t.Fatalf("Begin on an expired context: %v", err)
	}
	// SIGTERM: the pass's context is cancelled.
	cancelled, cancel2 := context.WithCancel(context.Background())
	cancel2()
	if _, err := l.Set(cancelled, digestB, Failed); err != nil {
		t.Fatalf("Set on a cancelled context: %v", err)
	}
	wantKeys(t, getNode(t, client.Clientset), "failed", digestB)
	if len(client.deadlines) == 0 {
		t.Fatal("no requests seen")
	}
	for _, d := range client.deadlines {
		if d <= 0 || d > time.Hour {
			t.Errorf("request deadline %v away, want within the labeler's WriteTimeout", d)
		}
	}
}

func TestRetryOnTransientErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"conflict", apierrors.NewConflict(schema.GroupResource{Resource: "nodes"}, nodeName, errors.New("changed"))},
		{"unavailable", apierrors.NewServiceUnavailable("etcd leader changed")},
		{"too many requests", apierrors.NewTooManyRequests("slow down", 1)},
		{"internal", apierrors.NewInternalError(errors.New("boom"))},
		{"server timeout", apierrors.NewServerTimeout(schema.GroupResource{Resource: "nodes"}, "patch", 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client := fake.NewClientset(newNode(nil, nil))
			failures := 0
			client.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
				if failures < 2 {
					failures++
					return true, nil, tc.err
				}
				return false, nil, nil
			})
			if _, err := newLabeler(client).Set(context.Background(), digestA, Failed); err != nil {
				t.Fatalf("Set: %v", err)
			}
			if got := countVerb(client, "patch"); got != 3 {
				t.Errorf("%d patch attempts, want 3", got)
			}
			wantKeys(t, getNode(t, client), "failed", digestA)
		})
	}
}

func TestPermanentErrors(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(nil, nil))
	client.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, nodeName,
			errors.New(`User "system:serviceaccount:x:y" cannot patch resource "nodes"`))
	})
	_, err := newLabeler(client).Set(context.Background(), digestA, Failed)
	if err == nil || !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "ServiceAccount needs") {
		t.Errorf("Set = %v, want a Forbidden error with an RBAC hint", err)
	}
	if got := countVerb(client, "patch"); got != 1 {
		t.Errorf("%d patch attempts, want 1 (no retry on Forbidden)", got)
	}

	missing := fake.NewClientset()
	_, err = (&Labeler{Client: missing, Node: "gone", Instance: instance}).Set(context.Background(), digestA, Failed)
	if err == nil || !apierrors.IsNotFound(err) || !strings.Contains(err.Error(), "--node-name") {
		t.Errorf("Set on a missing node = %v, want NotFound naming --node-name", err)
	}
}

func TestContextErrorIsNotSwallowed(t *testing.T) {
	t.Parallel()
	// client-go wraps context errors (for example "client rate limiter Wait
	// returned an error: context deadline exceeded"); retry.OnError alone
	// would turn such an error into success.
	client := fake.NewClientset(newNode(nil, nil))
	client.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, fmt.Errorf("client rate limiter Wait returned an error: %w", context.DeadlineExceeded)
	})
	_, err := newLabeler(client).Set(context.Background(), digestA, Failed)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Set = %v, want the deadline error", err)
	}
	ev := &Events{Client: fake.NewClientset(), Node: nodeName, Instance: instance, Backoff: &fastBackoff}
	ev.Client.(*fake.Clientset).PrependReactor("create", "events", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, fmt.Errorf("wrapped: %w", context.Canceled)
	})
	if err := ev.Report(context.Background(), Outcome{Digest: digestA, Results: []pull.Result{failed("x", pull.ReasonNotFound, nil)}}); !errors.Is(err, context.Canceled) {
		t.Errorf("Report = %v, want the cancellation error", err)
	}
}

func TestGetForbiddenFallsBackToPatch(t *testing.T) {
	t.Parallel()
	// RBAC that grants patch but not get on nodes.
	client := fake.NewClientset(newNode(map[string]string{"keep": "me"}, nil))
	client.PrependReactor("get", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, nodeName, errors.New("no get"))
	})
	l := newLabeler(client)
	ctx := context.Background()
	for range 3 {
		if err := l.Begin(ctx, digestA); err != nil {
			t.Fatal(err)
		}
		if _, err := l.Set(ctx, digestA, Failed); err != nil {
			t.Fatal(err)
		}
	}
	// The first Begin writes blind, then patch responses keep the state known.
	if got := countVerb(client, "patch"); got != 2 {
		t.Errorf("%d patches, want 2", got)
	}
	wantKeys(t, getNode(t, client), "failed", digestA)
}

func TestInvalidInput(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(nil, nil))
	ctx := context.Background()
	for name, err := range map[string]error{
		"bad instance": (&Labeler{Client: client, Node: nodeName, Instance: "Bad_Name"}).Begin(ctx, digestA),
		"no node":      (&Labeler{Client: client, Instance: instance}).Begin(ctx, digestA),
		"no digest":    newLabeler(client).Begin(ctx, ""),
		"bad state":    second(newLabeler(client).Set(ctx, digestA, "done")),
	} {
		if err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if n := len(client.Actions()); n != 0 {
		t.Errorf("%d API calls for invalid input, want 0", n)
	}
}

func second(_ bool, err error) error { return err }

func copyMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// refused is what client-go returns while the API server is down.
var refused = &url.Error{Op: "Patch", URL: "https://127.0.0.1:6443/api/v1/nodes/" + nodeName,
	Err: &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}}

// downUntil makes every node request fail as refused until the returned
// function is called or the deadline passes, like an API server that is
// stopped and started again.
func downUntil(client *fake.Clientset, until time.Time) {
	client.PrependReactor("*", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		if time.Now().Before(until) {
			return true, nil, refused
		}
		return false, nil, nil
	})
}

// The write keeps trying for as long as its time budget lasts, whatever the
// backoff's step count says: here the steps run out after ~30 ms, the API
// server is down for 700 ms and the budget is 10 s.
func TestWriteRetriesUntilItsBudgetEnds(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(nil, nil))
	downUntil(client, time.Now().Add(700*time.Millisecond))
	l := newLabeler(client)
	l.Backoff = &wait.Backoff{Duration: 10 * time.Millisecond, Factor: 2, Steps: 3, Cap: 50 * time.Millisecond}
	l.WriteTimeout = 10 * time.Second
	start := time.Now()
	wrote, err := l.Set(context.Background(), digestA, Succeeded)
	if err != nil || !wrote {
		t.Fatalf("Set after a 700 ms outage with a 10 s budget: wrote %v, %v", wrote, err)
	}
	if d := time.Since(start); d < 700*time.Millisecond || d > 3*time.Second {
		t.Errorf("Set took %s; want it to end soon after the outage (700 ms)", d)
	}
	wantKeys(t, getNode(t, client), "succeeded", digestA)
}

func TestWriteGivesUpOnlyWhenItsBudgetEnds(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(nil, nil))
	downUntil(client, time.Now().Add(time.Hour))
	l := newLabeler(client)
	l.Backoff = &wait.Backoff{Duration: 10 * time.Millisecond, Factor: 2, Steps: 2}
	l.WriteTimeout = 400 * time.Millisecond
	start := time.Now()
	_, err := l.Set(context.Background(), digestA, Failed)
	took := time.Since(start)
	if err == nil {
		t.Fatal("Set succeeded against a server that is down")
	}
	// Only a lower bound: how soon after the budget it returns depends on
	// the machine's load.
	if took < 400*time.Millisecond {
		t.Errorf("Set gave up after %s, before its 400 ms budget ended", took)
	}
	if !utilnet.IsConnectionRefused(err) || !strings.Contains(err.Error(), "time budget") {
		t.Errorf("error %q: want the last API error (connection refused) and the budget named", err)
	}
	// The backoff's two steps allow three requests; a write that keeps
	// trying for its whole budget makes more (about 20 on an idle machine).
	if n := len(client.Actions()); n <= 3 {
		t.Errorf("%d requests in 400 ms with 10-20 ms between them: it stopped retrying when the backoff's steps ran out", n)
	}
}

// hangClient lets the first hang node requests wait until their context
// ends, like a request to a server that went silent.
type hangClient struct {
	*fake.Clientset
	mu   sync.Mutex
	hang int
}

func (c *hangClient) CoreV1() typedcorev1.CoreV1Interface { return hangCore{c.Clientset.CoreV1(), c} }

type hangCore struct {
	typedcorev1.CoreV1Interface
	c *hangClient
}

func (hc hangCore) Nodes() typedcorev1.NodeInterface {
	return hangNodes{hc.CoreV1Interface.Nodes(), hc.c}
}

type hangNodes struct {
	typedcorev1.NodeInterface
	c *hangClient
}

func (n hangNodes) wait(ctx context.Context) error {
	n.c.mu.Lock()
	hang := n.c.hang > 0
	n.c.hang--
	n.c.mu.Unlock()
	if hang {
		<-ctx.Done()
		return fmt.Errorf("request canceled: %w", ctx.Err())
	}
	return nil
}

func (n hangNodes) Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Node, error) {
	if err := n.wait(ctx); err != nil {
		return nil, err
	}
	return n.NodeInterface.Get(ctx, name, opts)
}

func (n hangNodes) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions,
	sub ...string) (*corev1.Node, error) {
	if err := n.wait(ctx); err != nil {
		return nil, err
	}
	return n.NodeInterface.Patch(ctx, name, pt, data, opts, sub...)
}

// A request that hangs is abandoned after RequestTimeout and retried, so it
// cannot eat the write's whole budget.
func TestHangingRequestIsRetried(t *testing.T) {
	t.Parallel()
	client := &hangClient{Clientset: fake.NewClientset(newNode(nil, nil)), hang: 2}
	l := newLabeler(client)
	l.RequestTimeout = 100 * time.Millisecond
	l.WriteTimeout = 10 * time.Second
	start := time.Now()
	if _, err := l.Set(context.Background(), digestA, Failed); err != nil {
		t.Fatalf("Set: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Set took %s with two hanging requests of 100 ms each", d)
	}
	wantKeys(t, getNode(t, client.Clientset), "failed", digestA)
}

func TestWithdraw(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name                  string
		label, digest         string
		wantLabel, wantDigest string
		wantPatches           int
	}{
		{"succeeded for this list", "succeeded", digestA, "", digestA, 1},
		{"failed for this list stays", "failed", digestA, "failed", digestA, 0},
		{"nothing yet for this list", "", digestA, "", digestA, 0},
		{"succeeded for another list", "succeeded", digestB, "", digestA, 1},
		{"no label, no annotation", "", "", "", digestA, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			labels, anns := map[string]string{"keep": "me"}, map[string]string{}
			if tc.label != "" {
				labels[Key(instance)] = tc.label
			}
			if tc.digest != "" {
				anns[AnnotationKey(instance)] = tc.digest
			}
			client := fake.NewClientset(newNode(labels, anns))
			l := newLabeler(client)
			for range 2 { // the second call finds the node as wanted
				if err := l.Withdraw(context.Background(), digestA); err != nil {
					t.Fatal(err)
				}
			}
			node := getNode(t, client)
			wantKeys(t, node, tc.wantLabel, tc.wantDigest)
			if node.Labels["keep"] != "me" {
				t.Errorf("other label lost: %v", node.Labels)
			}
			if got := countVerb(client, "patch"); got != tc.wantPatches {
				t.Errorf("%d patches, want %d", got, tc.wantPatches)
			}
		})
	}
}

func TestSetReportsWhetherItWrote(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(nil, nil))
	l := newLabeler(client)
	for i, want := range []bool{true, false, false} {
		wrote, err := l.Set(context.Background(), digestA, Succeeded)
		if err != nil || wrote != want {
			t.Errorf("Set #%d: wrote %v, %v; want %v", i+1, wrote, err, want)
		}
	}
	// A new process (a second fetch) reads the node and writes nothing either.
	if wrote, err := newLabeler(client).Set(context.Background(), digestA, Succeeded); err != nil || wrote {
		t.Errorf("Set by a new labeler on a node that already says so: wrote %v, %v", wrote, err)
	}
}

// Two instances of one name in different namespaces would write one cluster-wide label key:
// the node's managed fields say which namespace's agent wrote the list annotation, and while
// that instance lives, the other one touches nothing and says why; a stale writer (its
// instance gone, its keys left behind) is taken over.
func TestSecondInstanceOfANameLeavesTheNodeAlone(t *testing.T) {
	t.Parallel()
	node := newNode(map[string]string{Key(instance): string(Succeeded)}, map[string]string{AnnotationKey(instance): digestA})
	node.ManagedFields = []metav1.ManagedFieldsEntry{{
		Manager: FieldManagerPrefix + "team-a", Operation: metav1.ManagedFieldsOperationUpdate, FieldsType: "FieldsV1",
		FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:metadata":{"f:annotations":{"f:` + AnnotationKey(instance) + `":{}},"f:labels":{"f:` + Key(instance) + `":{}}}}`)},
	}}
	for _, c := range []struct {
		name       string
		alive      bool
		wantWrites int
	}{{"the other instance lives", true, 0}, {"the other instance is gone", false, 1}} {
		t.Run(c.name, func(t *testing.T) {
			client := fake.NewClientset(node.DeepCopy())
			l := newLabeler(client)
			l.Namespace = "team-b"
			var asked []string
			l.InstanceAlive = func(_ context.Context, ns string) (bool, error) {
				asked = append(asked, ns)
				return c.alive, nil
			}
			_, err := l.Set(context.Background(), digestB, Failed)
			var conflict *ConflictError
			if c.alive && (!errors.As(err, &conflict) || conflict.Other != "team-a" || !strings.Contains(err.Error(), `also runs in namespace "team-a"`)) {
				t.Errorf("Set: %v, want a conflict naming team-a", err)
			}
			if !c.alive && err != nil {
				t.Errorf("Set over a stale writer: %v", err)
			}
			if _, err := l.Claim(context.Background(), digestA); c.alive && !errors.As(err, &conflict) {
				t.Errorf("Claim: %v, want the conflict", err)
			}
			if n := countVerb(client, "patch"); n != c.wantWrites {
				t.Errorf("%d patches, want %d", n, c.wantWrites)
			}
			if len(asked) == 0 || asked[0] != "team-a" {
				t.Errorf("asked about %v, want team-a", asked)
			}
			got := getNode(t, client)
			if c.alive && got.Labels[Key(instance)] != string(Succeeded) {
				t.Errorf("the other instance's label changed to %q", got.Labels[Key(instance)])
			}
		})
	}
	// Its own namespace's writes are no conflict.
	client := fake.NewClientset(node.DeepCopy())
	l := newLabeler(client)
	l.Namespace = "team-a"
	l.InstanceAlive = func(context.Context, string) (bool, error) {
		t.Error("asked about its own namespace")
		return true, nil
	}
	if _, err := l.Set(context.Background(), digestA, Failed); err != nil {
		t.Errorf("Set in the owning namespace: %v", err)
	}
}

// Every write names the instance's namespace as its field manager.
func TestWritesNameTheNamespaceAsFieldManager(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(newNode(nil, nil))
	l := newLabeler(client)
	l.Namespace = "team-a"
	if _, err := l.Set(context.Background(), digestA, Succeeded); err != nil {
		t.Fatal(err)
	}
	patches := 0
	for _, a := range client.Actions() {
		if p, ok := a.(k8stesting.PatchActionImpl); ok {
			patches++
			if got := p.GetPatchOptions().FieldManager; got != FieldManagerPrefix+"team-a" {
				t.Errorf("field manager %q, want %s", got, FieldManagerPrefix+"team-a")
			}
		}
	}
	if patches == 0 {
		t.Error("no patch")
	}
}
