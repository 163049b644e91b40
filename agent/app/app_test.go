package app

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

const (
	testNode     = "node-1"
	testInstance = "my-images"
	present      = "registry.test/app/present:1"
	pullable     = "registry.test/app/pullable:1"
	missing      = "registry.test/app/missing:1"
)

func writeList(t *testing.T, lines ...string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "images.txt")
	if err := os.WriteFile(p, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// testOptions are fast settings for a fake runtime: millisecond timeouts, no
// server.
func testOptions(socket, list string) *Options {
	o := defaultOptions()
	o.Instance, o.NodeName = testInstance, testNode
	o.CRISocket, o.ImageList = socket, list
	o.Pull.InitialAttemptTimeout, o.Pull.MaxAttemptTimeout = 200*time.Millisecond, time.Second
	o.Pull.InitialDelay, o.Pull.MaxDelay = 10*time.Millisecond, 50*time.Millisecond
	o.Pull.OverallTimeout = 20 * time.Second
	return o
}

func newTestPrefetcher(t *testing.T, o *Options) (*prefetcher, *fake.Clientset, *bytes.Buffer) {
	t.Helper()
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name:   testNode,
		Labels: map[string]string{"kubernetes.io/hostname": testNode, nodelabel.Key("other"): "succeeded"},
	}})
	var logs bytes.Buffer
	p, err := newPrefetcher(o, &logs, client)
	if err != nil {
		t.Fatalf("newPrefetcher: %v", err)
	}
	t.Cleanup(p.close)
	return p, client, &logs
}

func nodeLabels(t *testing.T, client *fake.Clientset) (map[string]string, map[string]string) {
	t.Helper()
	obj, err := client.Tracker().Get(schema.GroupVersionResource{Version: "v1", Resource: "nodes"}, "", testNode)
	if err != nil {
		t.Fatal(err)
	}
	n := obj.(*corev1.Node)
	return n.Labels, n.Annotations
}

func nodePatches(client *fake.Clientset) int {
	n := 0
	for _, a := range client.Actions() {
		if a.GetVerb() == "patch" && a.GetResource().Resource == "nodes" {
			n++
		}
	}
	return n
}

func TestPassWithMissingImageAndBadLineLabelsFailed(t *testing.T) {
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 10})
	cri.OnPull(missing, critest.NotFound(missing))
	list := writeList(t, "# test list", present, pullable, missing, "Not A Reference", "")
	p, client, logs := newTestPrefetcher(t, testOptions(cri.Path(), list))

	rep, err := p.pass(context.Background())
	if err != nil {
		t.Fatalf("pass: %v", err)
	}
	if rep.State != nodelabel.Failed {
		t.Fatalf("state = %q, want failed", rep.State)
	}
	failed := map[string]pull.Reason{}
	for _, f := range rep.Failed() {
		failed[f.Image] = f.Reason
	}
	if failed[missing] != pull.ReasonNotFound || failed["Not A Reference"] != pull.ReasonInvalidReference || len(failed) != 2 {
		t.Errorf("failed images = %v, want the missing tag (NotFound) and the bad line (InvalidReference)", failed)
	}
	// The other images are still pulled, and a 404 is not retried.
	if !cri.HasImage(pullable) {
		t.Errorf("%s was not pulled although another image failed", pullable)
	}
	if n := cri.PullCalls(missing); n != 1 {
		t.Errorf("PullImage calls for a missing tag = %d, want 1 (NotFound is permanent)", n)
	}
	if n := cri.PullCalls(present); n != 0 {
		t.Errorf("PullImage calls for a present image = %d, want 0 under IfNotPresent", n)
	}
	labels, annotations := nodeLabels(t, client)
	if got := labels[nodelabel.Key(testInstance)]; got != "failed" {
		t.Errorf("label = %q, want failed", got)
	}
	if labels[nodelabel.Key("other")] != "succeeded" || labels["kubernetes.io/hostname"] != testNode {
		t.Errorf("other labels changed: %v", labels)
	}
	if annotations[nodelabel.AnnotationKey(testInstance)] != rep.Digest {
		t.Errorf("list annotation = %q, want %q", annotations[nodelabel.AnnotationKey(testInstance)], rep.Digest)
	}
	events, err := client.CoreV1().Events("").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var msgs []string
	for _, e := range events.Items {
		msgs = append(msgs, e.Type+" "+e.Reason+" "+e.Message)
	}
	joined := strings.Join(msgs, "\n")
	for _, want := range []string{missing, "NotFound", "Not A Reference", "InvalidReference"} {
		if !strings.Contains(joined, want) {
			t.Errorf("node events do not mention %q:\n%s", want, joined)
		}
	}
	if err := p.readiness.Check(); err == nil {
		t.Error("readiness is ok although images are missing")
	}
	if !strings.Contains(logs.String(), "line=5") {
		t.Errorf("the bad line's number is not logged:\n%s", logs.String())
	}
}

func TestSteadyStateWritesNothing(t *testing.T) {
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 10})
	list := writeList(t, present, pullable)
	p, client, _ := newTestPrefetcher(t, testOptions(cri.Path(), list))

	rep, err := p.pass(context.Background())
	if err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("first pass: state %q, err %v", rep.State, err)
	}
	if err := p.readiness.Check(); err != nil {
		t.Errorf("not ready after a complete pass: %v", err)
	}
	labels, _ := nodeLabels(t, client)
	if labels[nodelabel.Key(testInstance)] != "succeeded" {
		t.Fatalf("label = %q, want succeeded", labels[nodelabel.Key(testInstance)])
	}
	before := nodePatches(client)
	cri.ResetCounters()
	if rep, err = p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("second pass: state %q, err %v", rep.State, err)
	}
	if after := nodePatches(client); after != before {
		t.Errorf("second pass with nothing changed patched the node %d times", after-before)
	}
	if cri.TotalPullCalls() != 0 {
		t.Errorf("second pass pulled %d times; every image was present", cri.TotalPullCalls())
	}
}

// TestAllPresentPassLogsOneInfoLine: a pass over a list whose images are all
// present (every steady re-check) logs no INFO line per image, only one
// summary line that counts them; the per-image lines are at debug level.
func TestAllPresentPassLogsOneInfoLine(t *testing.T) {
	cri := critest.Start(t)
	var refs []string
	for i := range 50 {
		ref := fmt.Sprintf("registry.test/app/present-%d:1", i)
		cri.AddImage(ref, critest.Image{Size: 10})
		refs = append(refs, ref)
	}
	o := testOptions(cri.Path(), writeList(t, refs...))
	o.Log.Format, o.Log.Level = "json", "debug"
	p, _, logs := newTestPrefetcher(t, o)

	for _, pass := range []string{"first pass", "re-check"} {
		logs.Reset()
		if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
			t.Fatalf("%s: state %q, err %v", pass, rep.State, err)
		}
		var summaries []map[string]any
		debugReady := 0
		for line := range strings.Lines(logs.String()) {
			var l map[string]any
			if err := json.Unmarshal([]byte(line), &l); err != nil {
				t.Fatalf("%s: log line %q: %v", pass, line, err)
			}
			switch {
			case l["level"] == "DEBUG":
				if l["msg"] == "image ready" {
					debugReady++
				}
			case l["msg"] == "pass finished":
				summaries = append(summaries, l)
			case l["image"] != nil:
				t.Errorf("%s: per-image line at %s: %s", pass, l["level"], line)
			}
		}
		if debugReady != len(refs) {
			t.Errorf("%s: %d debug lines \"image ready\", want one per image (%d)", pass, debugReady, len(refs))
		}
		if len(summaries) != 1 {
			t.Fatalf("%s: %d \"pass finished\" lines, want 1:\n%s", pass, len(summaries), logs.String())
		}
		sum := summaries[0]
		for k, want := range map[string]any{"level": "INFO", "images": 50.0, "present": 50.0, "pulled": 0.0, "failed": 0.0} {
			if sum[k] != want {
				t.Errorf("%s: summary's %s = %v, want %v", pass, k, sum[k], want)
			}
		}
		if d, _ := sum["listDigest"].(string); d == "" {
			t.Errorf("%s: summary has no list digest: %v", pass, sum)
		}
	}
	// The steady re-check has nothing else to say at INFO.
	infos := 0
	for line := range strings.Lines(logs.String()) {
		if !strings.Contains(line, `"level":"DEBUG"`) {
			infos++
		}
	}
	if infos != 1 {
		t.Errorf("re-check logged %d lines above debug, want only the summary:\n%s", infos, logs.String())
	}
}

func TestRecheckRepullsRemovedImage(t *testing.T) {
	cri := critest.Start(t)
	list := writeList(t, pullable)
	p, client, _ := newTestPrefetcher(t, testOptions(cri.Path(), list))
	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("first pass: %q %v", rep.State, err)
	}
	cri.DeleteImage(pullable) // kubelet image GC, behind the agent's back
	if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("re-check pass: %q %v", rep.State, err)
	}
	if !cri.HasImage(pullable) {
		t.Error("the removed image was not pulled again")
	}
	labels, _ := nodeLabels(t, client)
	if labels[nodelabel.Key(testInstance)] != "succeeded" {
		t.Errorf("label = %q after re-pull", labels[nodelabel.Key(testInstance)])
	}
}

func TestNewListClearsLabelBeforePulling(t *testing.T) {
	cri := critest.Start(t)
	list := writeList(t, pullable)
	o := testOptions(cri.Path(), list)
	p, client, _ := newTestPrefetcher(t, o)
	if rep, _ := p.pass(context.Background()); rep.State != nodelabel.Succeeded {
		t.Fatalf("first pass: %q", rep.State)
	}
	// The list changes and the new image's pull hangs: while it hangs the
	// node must not claim `succeeded`.
	const slow = "registry.test/app/slow:2"
	cri.OnPull(slow, critest.Stall())
	if err := os.WriteFile(list, []byte(pullable+"\n"+slow+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cancel, done := passUntilPull(p, cri, slow)
	labels, _ := nodeLabels(t, client)
	if v, ok := labels[nodelabel.Key(testInstance)]; ok {
		t.Errorf("label %q kept while a new list is being pulled", v)
	}
	cancel() // SIGTERM mid-pass
	rep := <-done
	if !rep.Canceled {
		t.Errorf("an interrupted pass was not reported as canceled: %+v", rep.State)
	}
	labels, _ = nodeLabels(t, client)
	if v, ok := labels[nodelabel.Key(testInstance)]; ok {
		t.Errorf("interrupted pass wrote label %q", v)
	}
}

func TestFetchExitCodes(t *testing.T) {
	cri := critest.Start(t)
	cri.OnPull(missing, critest.NotFound(missing))
	fast := []string{"--label=false", "--cri-socket", cri.Path(), "--initial-pull-attempt-timeout=1s"}

	var stderr bytes.Buffer
	if code := Main(append([]string{"fetch", "--image-list-file", writeList(t, pullable)}, fast...), &stderr, &stderr); code != ExitOK {
		t.Errorf("fetch of a pullable list exited %d, want 0\n%s", code, stderr.String())
	}
	stderr.Reset()
	start := time.Now()
	code := Main(append([]string{"fetch", "--image-list-file", writeList(t, pullable, missing)}, fast...), &stderr, &stderr)
	if code != ExitFailed {
		t.Errorf("fetch with a missing tag exited %d, want %d", code, ExitFailed)
	}
	if !strings.Contains(stderr.String(), missing) {
		t.Errorf("the missing image is not named:\n%s", stderr.String())
	}
	if time.Since(start) > 15*time.Second {
		t.Errorf("a missing tag took %s: it was retried", time.Since(start))
	}
}

func TestFetchDeadSocketFailsFastNamingThePath(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "containerd.sock")
	var stderr bytes.Buffer
	start := time.Now()
	code := Main([]string{"fetch", "--label=false", "--cri-socket", sock, "--image-list-file", writeList(t, pullable)}, &stderr, &stderr)
	if code != ExitFailed {
		t.Errorf("exit %d, want %d", code, ExitFailed)
	}
	if !strings.Contains(stderr.String(), sock) {
		t.Errorf("error does not name %s:\n%s", sock, stderr.String())
	}
	if time.Since(start) > 15*time.Second {
		t.Errorf("a missing socket took %s to fail", time.Since(start))
	}
}

func TestUsageErrors(t *testing.T) {
	for name, args := range map[string][]string{
		"no command":         {},
		"unknown command":    {"frobnicate"},
		"bad instance":       {"fetch", "--instance", "Not_Valid!", "--node-name", "n", "--kubeconfig", "/dev/null"},
		"bad policy":         {"fetch", "--label=false", "--pull-policy", "Sometimes"},
		"bad log format":     {"fetch", "--label=false", "--log-format", "xml"},
		"stray argument":     {"fetch", "--label=false", "busybox"},
		"no node name":       {"fetch", "--instance", "x", "--node-name", ""},
		"negative parallel":  {"fetch", "--label=false", "--max-parallel-pulls", "-1"},
		"no results held":    {"collect", "--max-results=0"},
		"node without label": {"fetch", "--label=false", "--act-as-node"},
		"node removes taint": {"fetch", "--instance", "x", "--node-name", "n", "--kubeconfig", "/dev/null", "--act-as-node", "--startup-taint"},
	} {
		t.Run(name, func(t *testing.T) {
			var out bytes.Buffer
			if code := Main(args, &out, &out); code != ExitUsage {
				t.Errorf("exit %d, want %d\n%s", code, ExitUsage, out.String())
			}
			// Errors of a command's flags say where its flags are described.
			if len(args) > 0 && (args[0] == "fetch" || args[0] == "collect") &&
				!strings.HasSuffix(out.String(), "See 'image-prefetcher "+args[0]+" --help'.\n") {
				t.Errorf("no --help hint at the end:\n%s", out.String())
			}
		})
	}
}

// passUntilPull starts a pass and returns once the runtime got a pull of ref
// (or 10 s passed): cancel is the pass's SIGTERM, done gives its report.
func passUntilPull(p *prefetcher, cri *critest.Server, ref string) (cancel context.CancelFunc, done <-chan passReport) {
	ctx, cancel := context.WithCancel(context.Background())
	reports := make(chan passReport, 1)
	go func() { rep, _ := p.pass(ctx); reports <- rep }()
	deadline := time.Now().Add(10 * time.Second)
	for cri.PullCalls(ref) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	return cancel, reports
}

// With --act-as-node every request of the node's state carries the
// impersonation of the node the agent runs on, and nothing else; the pull
// slots stay with the ServiceAccount.
func TestActAsNodeImpersonatesItsNode(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]string{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.Method+" "+r.URL.Path] = r.Header.Get("Impersonate-User") + "|" + strings.Join(r.Header.Values("Impersonate-Group"), ",")
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"kind":"Node","apiVersion":"v1","metadata":{"name":"node-a"}}`))
	}))
	defer srv.Close()
	kubeconfig := serverKubeconfig(t, srv.URL)
	for _, c := range []struct {
		asNode, want string
	}{{"node-a", "system:node:node-a|"}, {"", "|"}} {
		client, err := kubeClient(kubeconfig, c.asNode)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := client.CoreV1().Nodes().Get(context.Background(), "node-a", metav1.GetOptions{}); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		got := seen["GET /api/v1/nodes/node-a"]
		mu.Unlock()
		if got != c.want {
			t.Errorf("as node %q: impersonation %q, want %q", c.asNode, got, c.want)
		}
	}
}

// serverKubeconfig writes a kubeconfig for a test API server (a token, no TLS).
func serverKubeconfig(t *testing.T, server string) string {
	t.Helper()
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: %q}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`, server)), 0o600); err != nil {
		t.Fatal(err)
	}
	return kubeconfig
}

// The image filesystems' use (CRI ImageFsInfo) is read into the metrics at the
// end of each pass.
func TestPassRecordsImageFsUse(t *testing.T) {
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 1000})
	p, _, _ := newTestPrefetcher(t, testOptions(cri.Path(), writeList(t, present)))
	if _, err := p.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := metricValue(t, p, "image_prefetcher_image_fs_used_bytes"); got != 1000 {
		t.Errorf("image_fs_used_bytes = %v, want the 1000 the runtime reports", got)
	}
}
