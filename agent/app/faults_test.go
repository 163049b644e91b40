package app

// Faults and bad input (issue 15): the node label never says more than the
// node holds, and a label write is given up only when its time budget ends.
// Each test fails against the agent before these fixes.

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
)

// lockedBuffer is a log written by the pass's goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// apiDown is what client-go returns while the API server is stopped.
var apiDown = &url.Error{Op: "Patch", URL: "https://127.0.0.1:6443/api/v1/nodes/" + testNode,
	Err: &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}}

// outage makes every node request of client fail as refused while down is set.
func outage(client *fake.Clientset) *atomic.Bool {
	var down atomic.Bool
	down.Store(true)
	client.PrependReactor("*", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		if down.Load() {
			return true, nil, apiDown
		}
		return false, nil, nil
	})
	return &down
}

func newNodeClient() *fake.Clientset {
	return fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name:   testNode,
		Labels: map[string]string{"kubernetes.io/hostname": testNode},
	}})
}

// newFaultPrefetcher builds a prefetcher on client (run's when server).
func newFaultPrefetcher(t *testing.T, o *Options, server bool, client *fake.Clientset) (*prefetcher, *lockedBuffer) {
	t.Helper()
	logs := &lockedBuffer{}
	var kc kubernetes.Interface
	if client != nil {
		kc = client
	}
	if server && o.Run == nil {
		o.Run = &RunOptions{RecheckInterval: defaultRunOptions().RecheckInterval}
	}
	p, err := newPrefetcher(o, logs, kc)
	if err != nil {
		t.Fatalf("newPrefetcher: %v", err)
	}
	t.Cleanup(p.close)
	return p, logs
}

func labeler(p *prefetcher) *nodelabel.Labeler { return p.node.Labels.(*nodelabel.Labeler) }

// fewSteps is a backoff whose step count runs out after a few tens of
// milliseconds: before the fix, that count, not the budget, ended a write.
var fewSteps = wait.Backoff{Duration: 10 * time.Millisecond, Factor: 2, Steps: 3, Cap: 50 * time.Millisecond}

func writes(client *fake.Clientset) []string {
	var out []string
	for _, a := range client.Actions() {
		switch a.GetVerb() {
		case "get", "list", "watch":
		default:
			out = append(out, a.GetVerb()+" "+a.GetResource().Resource)
		}
	}
	return out
}

func nodeEvents(t *testing.T, client *fake.Clientset) []corev1.Event {
	t.Helper()
	l, err := client.CoreV1().Events(metav1.NamespaceDefault).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return l.Items
}

// 1. The API server is down for longer than the backoff's steps last, but
// less than --label-write-timeout: fetch waits for it and labels the node.
func TestFetchLabelWriteOutlastsAnOutageWithinItsBudget(t *testing.T) {
	cri := critest.Start(t)
	client := newNodeClient()
	down := outage(client)
	o := testOptions(cri.Path(), writeList(t, pullable))
	o.LabelWriteTimeout = 20 * time.Second
	p, logs := newFaultPrefetcher(t, o, false, client)
	labeler(p).Backoff = &fewSteps
	time.AfterFunc(800*time.Millisecond, func() { down.Store(false) })

	rep, err := p.pass(context.Background())
	if code := p.fetchExit(rep, err); code != ExitOK {
		t.Fatalf("fetch exited %d after an 800 ms API outage with a 20 s label budget, want 0\n%s", code, logs)
	}
	labels, ann := nodeLabels(t, client)
	if labels[nodelabel.Key(testInstance)] != "succeeded" || ann[nodelabel.AnnotationKey(testInstance)] != rep.Digest {
		t.Errorf("label %q annotation %q, want succeeded for %s", labels[nodelabel.Key(testInstance)],
			ann[nodelabel.AnnotationKey(testInstance)], rep.Digest)
	}
}

// 2. fetch was asked to label and could not: its own exit code, 3, also when
// the images are all there; and a kubeconfig that does not exist is not a
// usage error either.
func TestFetchExitsNotRecordedWhenTheLabelCannotBeWritten(t *testing.T) {
	cri := critest.Start(t)
	cri.OnPull(missing, critest.NotFound(missing))
	for name, list := range map[string][]string{"all present": {pullable}, "an image missing": {pullable, missing}} {
		t.Run(name, func(t *testing.T) {
			client := newNodeClient()
			outage(client)
			o := testOptions(cri.Path(), writeList(t, list...))
			o.LabelWriteTimeout = 300 * time.Millisecond
			p, logs := newFaultPrefetcher(t, o, false, client)
			labeler(p).Backoff = &fewSteps
			rep, err := p.pass(context.Background())
			if code := p.fetchExit(rep, err); code != ExitNotRecorded {
				t.Errorf("fetch exited %d with the API server down, want %d\n%s", code, ExitNotRecorded, logs)
			}
			if !strings.Contains(logs.String(), "could not write the node label") {
				t.Errorf("the log does not say the label was not written:\n%s", logs)
			}
		})
	}

	var out bytes.Buffer
	code := Main([]string{"fetch", "--kubeconfig", filepath.Join(t.TempDir(), "missing.kubeconfig"), "--instance", testInstance,
		"--node-name", testNode, "--cri-socket", cri.Path(), "--image-list-file", writeList(t, pullable)}, &out, &out)
	if code != ExitNotRecorded {
		t.Errorf("fetch with a missing kubeconfig exited %d, want %d (not a usage error)\n%s", code, ExitNotRecorded, out.String())
	}
}

// 3. In `run`, a label write that failed is retried within seconds (not at
// the next --recheck-interval), and /readyz is not ready until the node's
// label says what the node holds.
func TestRunRetriesAFailedLabelWriteSoonAndIsNotReadyMeanwhile(t *testing.T) {
	cri := critest.Start(t)
	client := newNodeClient()
	down := outage(client)
	o := testOptions(cri.Path(), writeList(t, pullable))
	o.Run = &RunOptions{RecheckInterval: time.Hour}
	o.LabelWriteTimeout = 150 * time.Millisecond
	p, logs := newFaultPrefetcher(t, o, true, client)
	labeler(p).Backoff = &fewSteps
	p.retryAfter = 50 * time.Millisecond

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int)
	go func() { done <- p.serve(ctx) }()
	defer func() { cancel(); <-done }()

	// The first pass pulls everything but cannot write: not ready, naming the label.
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := p.readiness.Check()
		if err != nil && strings.Contains(err.Error(), "label not written") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("readiness %v while the label cannot be written; want not ready naming the label\n%s", err, logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !cri.HasImage(pullable) {
		t.Fatal("the image was not pulled")
	}
	down.Store(false) // the API server is back
	back := time.Now()
	for {
		labels, _ := nodeLabels(t, client)
		if labels[nodelabel.Key(testInstance)] == "succeeded" {
			break
		}
		if time.Since(back) > 5*time.Second {
			t.Fatalf("label not written %s after the API server came back (recheck interval 1h)\n%s", time.Since(back), logs)
		}
		if err := p.readiness.Check(); err == nil {
			t.Fatal("ready while the node has no label")
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("label written %s after the API server came back", time.Since(back).Round(time.Millisecond))
	deadline = time.Now().Add(5 * time.Second)
	for p.readiness.Check() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("not ready after the label was written: %v", p.readiness.Check())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// 4. An unreadable list (missing file, a directory in its place) labels the
// node failed, with the annotation saying so, and a Node event names the path.
func TestUnreadableListLabelsFailedAndNamesThePath(t *testing.T) {
	for name, breakList := range map[string]func(string) error{
		"missing file": os.Remove,
		"directory": func(p string) error {
			if err := os.Remove(p); err != nil {
				return err
			}
			return os.Mkdir(p, 0o755)
		},
	} {
		t.Run(name, func(t *testing.T) {
			cri := critest.Start(t)
			list := writeList(t, pullable)
			client := newNodeClient()
			p, logs := newFaultPrefetcher(t, testOptions(cri.Path(), list), false, client)
			first, err := p.pass(context.Background())
			if err != nil || first.State != nodelabel.Succeeded {
				t.Fatalf("first pass: %q %v", first.State, err)
			}
			if err := breakList(list); err != nil {
				t.Fatal(err)
			}
			rep, err := p.pass(context.Background())
			if err == nil {
				t.Fatal("no error for an unreadable list")
			}
			if code := p.fetchExit(rep, err); code != ExitFailed {
				t.Errorf("fetch exited %d, want %d", code, ExitFailed)
			}
			labels, ann := nodeLabels(t, client)
			if labels[nodelabel.Key(testInstance)] != "failed" || ann[nodelabel.AnnotationKey(testInstance)] != nodelabel.UnreadableList {
				t.Errorf("label %q annotation %q, want failed / %q", labels[nodelabel.Key(testInstance)],
					ann[nodelabel.AnnotationKey(testInstance)], nodelabel.UnreadableList)
			}
			found := false
			for _, e := range nodeEvents(t, client) {
				if e.Type == corev1.EventTypeWarning && e.Reason == nodelabel.EventReasonFailed && strings.Contains(e.Message, list) {
					found = true
				}
			}
			if !found {
				t.Errorf("no Warning %s event names %s: %v", nodelabel.EventReasonFailed, list, nodeEvents(t, client))
			}
			if strings.Contains(logs.String(), "read image list: read image list") || strings.Contains(err.Error(), "read image list: read image list") {
				t.Errorf("doubled prefix in %q", err)
			}
			if err := p.readiness.Check(); err == nil {
				t.Error("ready with an unreadable list")
			}
			// The list comes back: its outcome replaces the unreadable one.
			os.RemoveAll(list)
			if err := os.WriteFile(list, []byte(pullable+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
				t.Fatalf("pass after the list came back: %q %v", rep.State, err)
			}
			labels, ann = nodeLabels(t, client)
			if labels[nodelabel.Key(testInstance)] != "succeeded" || ann[nodelabel.AnnotationKey(testInstance)] != first.Digest {
				t.Errorf("after the list came back: label %q annotation %q", labels[nodelabel.Key(testInstance)], ann[nodelabel.AnnotationKey(testInstance)])
			}
		})
	}
}

// 5. A pass that finds an image of the current list missing (image GC) takes
// `succeeded` away before the re-pull starts; a shutdown in the middle leaves
// it away; only a whole list says succeeded again. Cost: one write when the
// hole is found, one when it is filled, none in the steady state.
func TestHoleWithdrawsSucceededUntilTheListIsWhole(t *testing.T) {
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 10})
	client := newNodeClient()
	p, logs := newFaultPrefetcher(t, testOptions(cri.Path(), writeList(t, present, pullable)), true, client)
	first, err := p.pass(context.Background())
	if err != nil || first.State != nodelabel.Succeeded {
		t.Fatalf("first pass: %q %v", first.State, err)
	}
	steady := len(writes(client))
	if rep, _ := p.pass(context.Background()); rep.State != nodelabel.Succeeded || len(writes(client)) != steady {
		t.Fatalf("steady pass: %q, writes %v", rep.State, writes(client)[steady:])
	}

	// The kubelet's GC removes an image; its re-pull hangs, then SIGTERM.
	cri.DeleteImage(pullable)
	cri.OnPull(pullable, critest.Stall())
	cri.ResetCounters()
	cancel, done := passUntilPull(p, cri, pullable)
	labels, ann := nodeLabels(t, client)
	if v, ok := labels[nodelabel.Key(testInstance)]; ok {
		t.Errorf("label %q while an image of the list is being pulled again\n%s", v, logs)
	}
	if ann[nodelabel.AnnotationKey(testInstance)] != first.Digest {
		t.Errorf("annotation %q, want the list's digest kept", ann[nodelabel.AnnotationKey(testInstance)])
	}
	if err := p.readiness.Check(); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("readiness %v during the re-pull, want not ready", err)
	}
	cancel() // SIGTERM mid-re-pull
	if rep := <-done; !rep.Canceled {
		t.Error("the interrupted pass was not reported as canceled")
	}
	labels, _ = nodeLabels(t, client)
	if v, ok := labels[nodelabel.Key(testInstance)]; ok {
		t.Errorf("label %q after a shutdown mid-re-pull, want none", v)
	}
	if got := writes(client)[steady:]; len(got) != 1 || got[0] != "patch nodes" {
		t.Errorf("writes for finding the hole: %v, want exactly one node patch", got)
	}

	// The agent starts again and fills the hole: succeeded, one more write
	// (plus the event saying so); then a steady state writes nothing.
	cri.OnPull(pullable)
	before := len(writes(client))
	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("re-pull pass: %q %v", rep.State, err)
	}
	labels, _ = nodeLabels(t, client)
	if labels[nodelabel.Key(testInstance)] != "succeeded" {
		t.Errorf("label %q after the hole was filled", labels[nodelabel.Key(testInstance)])
	}
	if got := writes(client)[before:]; len(got) != 2 || got[0] != "patch nodes" || got[1] != "create events" {
		t.Errorf("writes for filling the hole: %v, want one node patch and the success event", got)
	}
	before = len(writes(client))
	if _, err := p.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := writes(client)[before:]; len(got) != 0 {
		t.Errorf("steady state after the hole wrote %v", got)
	}
	if err := p.readiness.Check(); err != nil {
		t.Errorf("not ready with the list whole and labelled: %v", err)
	}
}

// A hole in a list whose label says failed keeps failed (it is still true)
// and costs no write.
func TestHoleKeepsFailedWithoutWriting(t *testing.T) {
	cri := critest.Start(t)
	cri.OnPull(missing, critest.NotFound(missing))
	client := newNodeClient()
	p, _ := newFaultPrefetcher(t, testOptions(cri.Path(), writeList(t, pullable, missing)), false, client)
	if rep, _ := p.pass(context.Background()); rep.State != nodelabel.Failed {
		t.Fatalf("first pass: %q", rep.State)
	}
	cri.DeleteImage(pullable)
	patches := nodePatches(client)
	if rep, _ := p.pass(context.Background()); rep.State != nodelabel.Failed {
		t.Fatalf("second pass: %q", rep.State)
	}
	if n := nodePatches(client) - patches; n != 0 {
		t.Errorf("%d patches for a hole under failed, want 0", n)
	}
}

// 6. A broken and a missing --docker-config file are reported (log and Node
// event naming the file, never a secret) and do not block the pulls: public
// images anonymously, the private one with the file that loads.
func TestBrokenCredentialFileDoesNotBlockPulls(t *testing.T) {
	const private = "registry.test/private/app:1"
	const secret = "hunter2-broken-file-secret"
	cri := critest.Start(t)
	cri.RequireAuth(private, critest.Credential{Username: "u", Password: "p"})
	dir := t.TempDir()
	broken := filepath.Join(dir, "broken.json")
	good := filepath.Join(dir, "good.json")
	absent := filepath.Join(dir, "absent.json")
	os.WriteFile(broken, []byte(`{"auths":{"registry.test":{"password":"`+secret+`"`), 0o600)
	os.WriteFile(good, []byte(`{"auths":{"registry.test/private":{"username":"u","password":"p"}}}`), 0o600)

	client := newNodeClient()
	o := testOptions(cri.Path(), writeList(t, pullable, present, private))
	o.DockerConfigs = []string{broken, absent, good}
	p, logs := newFaultPrefetcher(t, o, false, client)
	rep, err := p.pass(context.Background())
	if err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("pass with a broken credential file: %q %v (failed %v)\n%s", rep.State, err, rep.Failed(), logs)
	}
	for _, ref := range []string{pullable, present, private} {
		if !cri.HasImage(ref) {
			t.Errorf("%s not pulled", ref)
		}
	}
	for _, c := range cri.PullCallsFor(pullable) {
		if c.Username != "" {
			t.Errorf("public image pulled with credentials of %q", c.Username)
		}
	}
	var msgs []string
	for _, e := range nodeEvents(t, client) {
		if e.Reason == nodelabel.EventReasonCredentialFileSkipped && e.Type == corev1.EventTypeWarning {
			msgs = append(msgs, e.Message)
		}
	}
	all := strings.Join(msgs, "\n")
	for _, f := range []string{broken, absent} {
		if !strings.Contains(all, f) {
			t.Errorf("no %s event names %s:\n%s", nodelabel.EventReasonCredentialFileSkipped, f, all)
		}
		if !strings.Contains(logs.String(), f) {
			t.Errorf("the log does not name %s", f)
		}
	}
	if strings.Contains(all, secret) || strings.Contains(logs.String(), secret) {
		t.Error("a secret of the broken file reached an event or the log")
	}
}

// 7. A warm fetch (every image present, the node already saying succeeded for
// this list) makes no API write: no patch, no event. Every fetch is a new
// process, so "already said" comes from the Node, not from memory.
func TestWarmFetchMakesNoAPIWrites(t *testing.T) {
	cri := critest.Start(t)
	client := newNodeClient()
	list := writeList(t, pullable, present)
	cold, _ := newFaultPrefetcher(t, testOptions(cri.Path(), list), false, client)
	if rep, err := cold.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("cold fetch: %q %v", rep.State, err)
	}
	if got := writes(client); len(got) == 0 {
		t.Fatal("the cold fetch wrote nothing")
	}
	for i := range 3 {
		before := len(client.Actions())
		warm, logs := newFaultPrefetcher(t, testOptions(cri.Path(), list), false, client)
		rep, err := warm.pass(context.Background())
		if code := warm.fetchExit(rep, err); code != ExitOK {
			t.Fatalf("warm fetch %d exited %d\n%s", i, code, logs)
		}
		var got []string
		for _, a := range client.Actions()[before:] {
			got = append(got, a.GetVerb()+" "+a.GetResource().Resource)
		}
		if len(got) != 1 || got[0] != "get nodes" {
			t.Errorf("warm fetch %d: API requests %v, want only the node read", i, got)
		}
	}
}

// 8. A list of garbage: each bad line is logged once, cut, and one pass logs
// at most maxBadLinesLogged of them plus a count.
func TestBadLinesAreLoggedOnceAndCapped(t *testing.T) {
	cri := critest.Start(t)
	lines := []string{pullable}
	for i := range 100 {
		lines = append(lines, strings.Repeat("Z", 5000)+"!"+string(rune('a'+i%26)))
	}
	o := testOptions(cri.Path(), writeList(t, lines...))
	o.Label = false
	p, logs := newFaultPrefetcher(t, o, false, nil)
	rep, err := p.pass(context.Background())
	if code := p.fetchExit(rep, err); code != ExitFailed {
		t.Errorf("exit %d, want %d", code, ExitFailed)
	}
	out := logs.String()
	if n := strings.Count(out, `msg="bad image list line"`); n != maxBadLinesLogged {
		t.Errorf("%d bad lines logged in full, want %d", n, maxBadLinesLogged)
	}
	if !strings.Contains(out, "count=80") {
		t.Errorf("the bad lines not logged are not counted:\n%.2000s", out)
	}
	if strings.Contains(out, `msg="missing image" image=ZZZ`) {
		t.Error("bad lines logged a second time as missing images")
	}
	if len(out) > 40_000 {
		t.Errorf("%d bytes of log for 100 bad lines of 5 KB, want it bounded", len(out))
	}
	if !cri.HasImage(pullable) {
		t.Error("the good image was not pulled")
	}
}

// --instance is validated with --label=false too.
func TestInstanceValidatedWithoutLabel(t *testing.T) {
	var out bytes.Buffer
	code := Main([]string{"fetch", "--label=false", "--instance", "Not_Valid!", "--cri-socket", "/nonexistent.sock",
		"--image-list-file", writeList(t, pullable)}, &out, &out)
	if code != ExitUsage || !strings.Contains(out.String(), "--instance") {
		t.Errorf("exit %d, want %d naming --instance\n%s", code, ExitUsage, out.String())
	}
}

func TestNextWait(t *testing.T) {
	p := &prefetcher{opts: &Options{Run: &RunOptions{RecheckInterval: 5 * time.Minute}}, retryAfter: defaultRetryAfter}
	ok := passReport{State: nodelabel.Succeeded}
	bad := passReport{State: nodelabel.Failed}
	unrecorded := passReport{State: nodelabel.Succeeded, LabelErr: errors.New("refused")}
	retry := p.retryAfter
	var waits []time.Duration
	for range 4 {
		var w time.Duration
		w, retry = p.nextWait(bad, nil, retry)
		waits = append(waits, w)
	}
	if want := []time.Duration{10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second}; !equalDurations(waits, want) {
		t.Errorf("failed pass waits %v, want %v", waits, want)
	}
	retry = p.retryAfter
	waits = nil
	for range 5 {
		var w time.Duration
		w, retry = p.nextWait(unrecorded, nil, retry)
		waits = append(waits, w)
	}
	if want := []time.Duration{10 * time.Second, 20 * time.Second, labelRetryCap, labelRetryCap, labelRetryCap}; !equalDurations(waits, want) {
		t.Errorf("unrecorded outcome waits %v, want %v", waits, want)
	}
	if w, next := p.nextWait(ok, nil, time.Minute); w != 5*time.Minute || next != p.retryAfter {
		t.Errorf("recorded success: wait %s next %s", w, next)
	}
}

func equalDurations(a, b []time.Duration) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
