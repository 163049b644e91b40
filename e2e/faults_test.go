// The fault matrix of issue 15 on the real cluster: the API server and the container runtime stopped and
// started again by the harness (`e2e/cluster.sh stop-component` / `start-component`, by recorded PID),
// SIGTERM in the middle of a re-pull, a broken credential file beside public images, an unreadable list and
// the API requests of a warm `fetch`. Each test runs the agent binary itself (fetch, or run in the
// background), with its own instance name on the harness's node, and asserts the node's label and list
// annotation at the end and, where it matters, while the fault lasts.
package e2e_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/bench/shaper"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// harnessComponent runs `e2e/cluster.sh <action>-component <name>`; start returns once the component
// answers again (the harness waits for it).
func harnessComponent(t *testing.T, action, name string) {
	t.Helper()
	clusterenv.RunHarness(t, action+"-component", name)
}

// stopped is a harness component this test stopped; start starts it again once (also from the test's
// cleanup, so a failing test never leaves the cluster without it) and returns when it answers.
type stopped struct {
	t       *testing.T
	name    string
	mu      sync.Mutex
	started bool
}

func stopComponent(t *testing.T, name string) *stopped {
	t.Helper()
	harnessComponent(t, "stop", name)
	s := &stopped{t: t, name: name}
	t.Logf("%s stopped at %s", name, time.Now().Format("15:04:05.000"))
	t.Cleanup(func() { s.start() })
	return s
}

// start starts the component again and returns when it answers.
func (s *stopped) start() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.started {
		s.started = true
		harnessComponent(s.t, "start", s.name)
		s.t.Logf("%s answers again at %s", s.name, time.Now().Format("15:04:05.000"))
	}
	return time.Now()
}

// runtimeComponent is the harness's name of the container runtime process.
func runtimeComponent(env *clusterenv.Env) string {
	if env.IsContainerd() {
		return "containerd"
	}
	return "crio"
}

// syncBuf is an agent's output, written by its process and read by the test.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// agentProc is the agent binary running in the background.
type agentProc struct {
	t      *testing.T
	args   []string
	cmd    *exec.Cmd
	out    *syncBuf
	done   chan struct{}
	code   int
	start  time.Time
	exitAt time.Time
}

func startAgent(t *testing.T, args ...string) *agentProc {
	t.Helper()
	a := &agentProc{t: t, args: args, out: &syncBuf{}, done: make(chan struct{})}
	a.cmd = exec.Command(agentBinary(t), args...)
	a.cmd.Stdout, a.cmd.Stderr = a.out, a.out
	a.start = time.Now()
	if err := a.cmd.Start(); err != nil {
		t.Fatalf("start agent: %v", err)
	}
	go func() {
		err := a.cmd.Wait()
		a.exitAt = time.Now()
		a.code = 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			a.code = ee.ExitCode()
		} else if err != nil {
			a.code = -1
		}
		close(a.done)
	}()
	t.Cleanup(func() {
		if a.running() {
			_ = a.cmd.Process.Kill()
			<-a.done
		}
	})
	return a
}

func (a *agentProc) running() bool {
	select {
	case <-a.done:
		return false
	default:
		return true
	}
}

// wait waits for the agent to exit and returns its exit code; it fails the test after timeout.
func (a *agentProc) wait(timeout time.Duration) int {
	a.t.Helper()
	select {
	case <-a.done:
	case <-time.After(timeout):
		_ = a.cmd.Process.Kill()
		<-a.done
		a.t.Fatalf("image-prefetcher %s did not exit within %s:\n%s", strings.Join(a.args, " "), timeout, a.out)
	}
	a.t.Logf("image-prefetcher %s: exit %d after %s", a.args[0], a.code, a.exitAt.Sub(a.start).Round(time.Millisecond))
	return a.code
}

func (a *agentProc) signal(sig os.Signal) {
	a.t.Helper()
	if err := a.cmd.Process.Signal(sig); err != nil {
		a.t.Fatalf("signal agent: %v", err)
	}
}

// runAgent runs the agent to its end.
func runAgent(t *testing.T, timeout time.Duration, args ...string) (int, string) {
	t.Helper()
	a := startAgent(t, args...)
	code := a.wait(timeout)
	return code, a.out.String()
}

// faultInstance is a throwaway instance name on one node (the harness's first, unless on says another);
// its label and annotation are removed when the test ends.
type faultInstance struct {
	t    *testing.T
	env  *clusterenv.Env
	cs   kubernetes.Interface
	name string
	// node is the node the agent runs as, and socket its CRI socket
	node, socket string
}

func newFaultInstance(t *testing.T, env *clusterenv.Env, base string) *faultInstance {
	t.Helper()
	in := &faultInstance{t: t, env: env, cs: env.Clientset(t), name: "e2e-fault-" + base + "-" + suffix(t),
		node: env.NodeName, socket: env.CRISocket}
	t.Cleanup(func() {
		// The API server may just have come back: try for a while.
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:null},"annotations":{%q:null}}}`, in.labelKey(), in.annotationKey())
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_ = wait.PollUntilContextCancel(ctx, time.Second, true, func(ctx context.Context) (bool, error) {
			_, err := in.cs.CoreV1().Nodes().Patch(ctx, in.node, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
			return err == nil || apierrors.IsNotFound(err), nil
		})
	})
	return in
}

// on makes n the instance's node.
func (in *faultInstance) on(n clusterenv.Node) *faultInstance {
	in.node, in.socket = n.Name, n.CRISocket
	return in
}

func (in *faultInstance) labelKey() string      { return labelPrefix + in.name }
func (in *faultInstance) annotationKey() string { return annotationPrefix + in.name }

// flags are the agent flags that label the instance's node as this instance.
func (in *faultInstance) flags(list string) []string {
	return []string{"--cri-socket", in.socket, "--kubeconfig", in.env.Kubeconfig, "--node-name", in.node,
		"--instance", in.name, "--image-list-file", list}
}

// state reads the instance's label and annotation; ok is false when the API server did not answer.
func (in *faultInstance) state(ctx context.Context) (s nodeState, ok bool) {
	n, err := in.cs.CoreV1().Nodes().Get(ctx, in.node, metav1.GetOptions{})
	if err != nil {
		return nodeState{}, false
	}
	label, has := n.Labels[in.labelKey()]
	return nodeState{label: label, hasLabel: has, list: n.Annotations[in.annotationKey()], at: time.Now()}, true
}

// waitState polls until cond holds for the instance's state and returns the time it was first seen.
func (in *faultInstance) waitState(ctx context.Context, what string, cond func(nodeState) bool) (nodeState, time.Time) {
	in.t.Helper()
	var last nodeState
	var at time.Time
	err := wait.PollUntilContextCancel(ctx, 100*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		s, ok := in.state(ctx)
		if !ok {
			return false, nil
		}
		last, at = s, time.Now()
		return cond(s), nil
	})
	if err != nil {
		in.t.Fatalf("instance %s: %s not seen; last state %v: %v", in.name, what, last, err)
	}
	return last, at
}

// events returns the Node events this instance's agent recorded.
func (in *faultInstance) events(ctx context.Context) []corev1.Event {
	in.t.Helper()
	l, err := in.cs.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + in.node})
	if err != nil {
		in.t.Fatalf("list node events: %v", err)
	}
	var mine []corev1.Event
	for _, e := range l.Items {
		if e.Source.Component == "image-prefetcher/"+in.name {
			mine = append(mine, e)
		}
	}
	return mine
}

// writeImageList writes a list file and returns its path and the digest the agent records for it.
func writeImageList(t *testing.T, images ...string) (string, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "images.txt")
	if err := os.WriteFile(path, []byte("# fault test\n"+strings.Join(images, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := imagelist.ParseFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, l.Digest
}

// shapedRegistry puts a bandwidth-capped proxy in front of the plain registry, so that a pull lasts long
// enough for a fault to hit it in the middle. Images are pulled under the proxy's name
// (127.0.0.1:<port>/...): containerd treats loopback names as plain HTTP; CRI-O only knows the registries
// of its registries.conf, so these tests need containerd.
func shapedRegistry(t *testing.T, env *clusterenv.Env, mbit int64) *shaper.Proxy {
	t.Helper()
	if !env.IsContainerd() {
		t.Skipf("needs containerd (runtime %s): the shaping proxy's loopback port is not an insecure registry in CRI-O's registries.conf", env.Runtime)
	}
	p, err := shaper.Listen("127.0.0.1:0", shaper.Config{Upstream: env.Registry, BitsPerSecond: mbit * 1_000_000})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// viaProxy returns the catalogue image name under the proxy, and removes it (and its name on the plain
// registry, so that its content is really gone and must cross the proxy again).
func viaProxy(ctx context.Context, t *testing.T, env *clusterenv.Env, images runtimeapi.ImageServiceClient, p *shaper.Proxy, name string) string {
	t.Helper()
	orig := env.Image(t, name).Ref
	ref := p.Addr() + strings.TrimPrefix(orig, env.Registry)
	removeImages(ctx, t, images, []string{ref, orig})
	return ref
}

// waitNodeReady waits until the harness's node is Ready again after a fault, so later tests find a healthy
// cluster.
func waitNodeReady(t *testing.T, env *clusterenv.Env, cs kubernetes.Interface) {
	t.Helper()
	waitNodeNamedReady(t, cs, env.NodeName)
}

// waitNodeNamedReady waits until the node name is Ready.
func waitNodeNamedReady(t *testing.T, cs kubernetes.Interface, name string) {
	t.Helper()
	ctx := ctxFor(t, 2*time.Minute)
	err := wait.PollUntilContextCancel(ctx, time.Second, true, func(ctx context.Context) (bool, error) {
		n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady {
				return c.Status == corev1.ConditionTrue, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Errorf("node %s not Ready again after the fault: %v", name, err)
	}
}

// readyz returns the agent's /readyz status code, 0 when it does not answer.
func readyz(addr string) int {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// Case 1: the API server is stopped for 20 s while `fetch` pulls and then writes its label, with
// --label-write-timeout 120s. The write waits for the server instead of giving up after a few retries:
// fetch exits 0, the node says succeeded for this list, and the label lands within seconds of the API
// server answering again.
func TestFaultAPIServerDownDuringLabelWrite(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 6*time.Minute)
	_, images := env.CRI(t)
	proxy := shapedRegistry(t, env, 16) // 16 MiB at 16 Mbit/s: about 8 s of pulling
	ref := viaProxy(ctx, t, env, images, proxy, "e2e/random:16mib")
	in := newFaultInstance(t, env, "apiserver")
	list, digest := writeImageList(t, ref)

	agent := startAgent(t, append([]string{"fetch", "--label-write-timeout", "120s"}, in.flags(list)...)...)
	// The pass has started (the new list's digest is on the node, no label): now stop the API server, so the
	// rest of the pull and the final label write happen while it is down.
	in.waitState(ctx, "the list annotation", func(s nodeState) bool { return s.list == digest && !s.hasLabel })
	api := stopComponent(t, "kube-apiserver")
	time.Sleep(20 * time.Second)
	if !agent.running() {
		t.Fatalf("fetch exited %d while the API server was down (budget 120s): it gave up early\n%s", agent.code, agent.out)
	}
	back := api.start()
	code := agent.wait(3 * time.Minute)
	out := agent.out.String()
	if code != 0 {
		t.Fatalf("fetch exited %d, want 0 (the API server was back with most of the budget left)\n%s", code, out)
	}
	s, _ := in.waitState(ctx, "the label", func(s nodeState) bool { return true })
	if !s.hasLabel || s.label != "succeeded" || s.list != digest {
		t.Errorf("node state %v, want succeeded for list %.12s", s, digest)
	}
	requireAllPresent(ctx, t, images, []string{ref})
	took := agent.exitAt.Sub(back)
	t.Logf("measured: fetch labelled the node and exited %s after the API server answered again", took.Round(time.Millisecond))
	if took > 15*time.Second {
		t.Errorf("the label write ended %s after the API server was back, want within seconds (backoff cap 4 s)", took)
	}
	if !strings.Contains(out, "node label written") {
		t.Errorf("the agent's log does not record the label write:\n%s", out)
	}
	waitNodeReady(t, env, in.cs)
}

// Case 2: asked to label and unable to: with the API server down for longer than the budget (5 s),
// `fetch` exits 3, says why, and the node got no label.
func TestFaultFetchExitsNotRecordedWhenTheLabelCannotBeWritten(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	in := newFaultInstance(t, env, "exit3")
	list, _ := writeImageList(t, refs(t, env, "e2e/small:10")...)

	api := stopComponent(t, "kube-apiserver")
	code, out := runAgent(t, 2*time.Minute, append([]string{"fetch", "--label-write-timeout", "5s"}, in.flags(list)...)...)
	api.start()
	if code != 3 {
		t.Errorf("fetch exited %d with the API server down, want 3 (node not written)\n%s", code, out)
	}
	if !strings.Contains(out, "could not write the node label") {
		t.Errorf("the output does not say the label was not written:\n%s", out)
	}
	if s, ok := in.state(ctx); !ok || s.hasLabel {
		t.Errorf("node state %v (API answered: %v), want no label", s, ok)
	}
	waitNodeReady(t, env, in.cs)
}

// Case 3: `run` with the API server down for 45 s from its start (label budget 5 s, so every write of
// the outage fails): /readyz is never 200 while the node has no label, the failed write is retried on the
// short schedule (not at the 5 min recheck), and the label lands soon after the API server is back.
func TestFaultRunRetriesAnUnwrittenLabelSoon(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 6*time.Minute)
	in := newFaultInstance(t, env, "run")
	list, digest := writeImageList(t, refs(t, env, "e2e/small:09")...)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))

	api := stopComponent(t, "kube-apiserver")
	agent := startAgent(t, append([]string{"run", "--label-write-timeout", "5s", "--listen-address", addr}, in.flags(list)...)...)
	deadline := time.Now().Add(45 * time.Second)
	ready200 := 0
	for time.Now().Before(deadline) {
		if readyz(addr) == http.StatusOK {
			ready200++
		}
		time.Sleep(500 * time.Millisecond)
	}
	if ready200 > 0 {
		t.Errorf("/readyz said 200 %d times while the node's label could not be written", ready200)
	}
	back := api.start()
	s, at := in.waitState(ctx, "succeeded", func(s nodeState) bool { return s.label == "succeeded" })
	if s.list != digest {
		t.Errorf("annotation %.12s, want %.12s", s.list, digest)
	}
	took := at.Sub(back)
	t.Logf("measured: run labelled the node %s after the API server answered again (recheck interval 5m)", took.Round(time.Millisecond))
	if took > 45*time.Second {
		t.Errorf("label written %s after the API server was back, want within the short retry schedule (<= 30 s apart)", took)
	}
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(context.Context) (bool, error) {
		return readyz(addr) == http.StatusOK, nil
	})
	if err != nil {
		t.Errorf("/readyz not 200 after the label was written: %v", err)
	}
	if !strings.Contains(agent.out.String(), "labelWritten=false") {
		t.Errorf("the agent never logged a pass without its label written:\n%s", agent.out)
	}
	agent.signal(syscall.SIGTERM)
	if code := agent.wait(time.Minute); code != 0 {
		t.Errorf("run exited %d on SIGTERM", code)
	}
	waitNodeReady(t, env, in.cs)
}

// Case 4: the container runtime is stopped in the middle of a pull and started again 5 s later. The pass
// goes on (the failed attempts are retried), the node never says succeeded while an image of the list is
// missing, and ends succeeded for the list with every image present.
func TestFaultRuntimeRestartedMidPass(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 6*time.Minute)
	_, images := env.CRI(t)
	proxy := shapedRegistry(t, env, 24)
	list := []string{
		viaProxy(ctx, t, env, images, proxy, "e2e/random:20mib"),
		viaProxy(ctx, t, env, images, proxy, "e2e/random:12mib"),
		viaProxy(ctx, t, env, images, proxy, "e2e/small:08"),
	}
	in := newFaultInstance(t, env, "runtime")
	file, digest := writeImageList(t, list...)

	agent := startAgent(t, append([]string{"fetch"}, in.flags(file)...)...)
	err := wait.PollUntilContextCancel(ctx, 50*time.Millisecond, true, func(context.Context) (bool, error) {
		return proxy.Stats().BytesDown > 2<<20, nil
	})
	if err != nil || !agent.running() {
		t.Fatalf("the pull did not get under way (%v)\n%s", err, agent.out)
	}
	rt := stopComponent(t, runtimeComponent(env))
	// While the runtime is down the node must not claim the list.
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		if s, ok := in.state(ctx); ok && s.label == "succeeded" {
			t.Errorf("node says succeeded while the runtime is down mid-pull: %v", s)
		}
	}
	rt.start()
	code := agent.wait(4 * time.Minute)
	if code != 0 {
		t.Fatalf("fetch exited %d after the runtime came back, want 0\n%s", code, agent.out)
	}
	s, _ := in.waitState(ctx, "the final state", func(nodeState) bool { return true })
	if s.label != "succeeded" || s.list != digest {
		t.Errorf("node state %v, want succeeded for %.12s", s, digest)
	}
	requireAllPresent(ctx, t, images, list)
	if n := strings.Count(agent.out.String(), `msg="pull attempt failed"`); n == 0 {
		t.Errorf("no failed attempt logged: the runtime was not stopped mid-pull\n%s", agent.out)
	}
	waitNodeReady(t, env, in.cs)
}

// Case 5: `run` holds the whole list and says succeeded; an image of it is removed (as the kubelet's GC
// would). The next re-check removes the label (one update, annotation kept) before the re-pull, /readyz
// goes 503, and succeeded comes back only with the image present (one more update). The second time, SIGTERM
// arrives in the middle of the re-pull: the agent exits and the node keeps no label.
func TestFaultSIGTERMMidRepull(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 6*time.Minute)
	_, images := env.CRI(t)
	proxy := shapedRegistry(t, env, 32) // 20 MiB at 32 Mbit/s: about 5 s per re-pull
	big := viaProxy(ctx, t, env, images, proxy, "e2e/random:20mib")
	small := viaProxy(ctx, t, env, images, proxy, "e2e/small:17")
	in := newFaultInstance(t, env, "sigterm")
	file, digest := writeImageList(t, small, big)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))

	agent := startAgent(t, append([]string{"run", "--recheck-interval", "2s", "--listen-address", addr}, in.flags(file)...)...)
	in.waitState(ctx, "succeeded", func(s nodeState) bool { return s.label == "succeeded" && s.list == digest })
	n, err := in.cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w, err := in.cs.CoreV1().Nodes().Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + env.NodeName, ResourceVersion: n.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	// next returns the next change of the instance's keys (other updates of the node are skipped).
	last := nodeState{label: "succeeded", hasLabel: true, list: digest}
	next := func(what string) nodeState {
		t.Helper()
		for {
			select {
			case <-ctx.Done():
				t.Fatalf("%s not seen\n%s", what, agent.out)
			case ev, ok := <-w.ResultChan():
				if !ok || ev.Type == watch.Error {
					t.Fatalf("node watch ended: %+v", ev.Object)
				}
				n, ok := ev.Object.(*corev1.Node)
				if !ok {
					continue
				}
				label, has := n.Labels[in.labelKey()]
				s := nodeState{label: label, hasLabel: has, list: n.Annotations[in.annotationKey()], at: time.Now()}
				if s.label == last.label && s.hasLabel == last.hasLabel && s.list == last.list {
					continue // someone else's update of the node
				}
				last = s
				return s
			}
		}
	}

	// A hole, filled: exactly two updates of the instance's keys.
	removeImages(ctx, t, images, []string{big})
	gone := next("the label's removal")
	if gone.hasLabel || gone.list != digest {
		t.Fatalf("first update after the hole: %v, want no label and the annotation kept", gone)
	}
	if _, missing := present(ctx, t, images, []string{big}); len(missing) != 1 {
		t.Errorf("the label was removed only after the image was back: the re-pull ran under succeeded")
	}
	if code := readyz(addr); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz %d during the re-pull, want 503", code)
	}
	back := next("succeeded again")
	if back.label != "succeeded" || back.list != digest {
		t.Fatalf("second update after the hole: %v, want succeeded for the list", back)
	}
	requireAllPresent(ctx, t, images, []string{small, big})
	t.Logf("measured: label removed at %s, succeeded again at %s (re-pull of 20 MiB at 32 Mbit/s)",
		gone.at.Format("15:04:05.000"), back.at.Format("15:04:05.000"))

	// A hole again, and SIGTERM in the middle of its re-pull.
	removeImages(ctx, t, images, []string{big})
	gone = next("the label's removal (second hole)")
	if gone.hasLabel {
		t.Fatalf("update after the second hole: %v", gone)
	}
	agent.signal(syscall.SIGTERM)
	if code := agent.wait(time.Minute); code != 0 {
		t.Errorf("run exited %d on SIGTERM", code)
	}
	if _, missing := present(ctx, t, images, []string{big}); len(missing) != 1 {
		t.Fatalf("%s was present when the agent stopped: SIGTERM came after the re-pull, nothing was tested", big)
	}
	s, ok := in.state(ctx)
	if !ok || s.hasLabel || s.list != digest {
		t.Errorf("after SIGTERM mid-re-pull: %v, want no label and the annotation of the list", s)
	}
}

// Case 6: a --docker-config file that is broken (not JSON, with a secret in it) and one that does not
// exist, beside the right one for the auth registry: public images are pulled anonymously, the private one
// with the good file, the node says succeeded, and a Warning event names each bad file without its content.
func TestFaultBrokenCredentialFileBesidePublicImages(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	_, images := env.CRI(t)
	public := refs(t, env, "e2e/small:14", "e2e/small:15", "e2e/random:4mib")
	private := env.Image(t, env.AuthRegistry+"/e2e/private:latest").Ref
	all := append(append([]string{}, public...), private)
	removeImages(ctx, t, images, all)
	in := newFaultInstance(t, env, "creds")
	dir := t.TempDir()
	const secret = "fault-test-not-a-real-password"
	broken := filepath.Join(dir, "broken", ".dockerconfigjson")
	os.MkdirAll(filepath.Dir(broken), 0o755)
	if err := os.WriteFile(broken, []byte(`{"auths":{"`+env.Registry+`":{"password":"`+secret+`"`), 0o600); err != nil {
		t.Fatal(err)
	}
	absent := filepath.Join(dir, "absent", ".dockerconfigjson")
	file, digest := writeImageList(t, all...)

	code, out := runAgent(t, 3*time.Minute, append([]string{"fetch", "--docker-config", broken, "--docker-config", absent,
		"--docker-config", env.AuthDockerConfig}, in.flags(file)...)...)
	if code != 0 {
		t.Fatalf("fetch with a broken credential file exited %d, want 0\n%s", code, out)
	}
	requireAllPresent(ctx, t, images, all)
	s, _ := in.waitState(ctx, "succeeded", func(s nodeState) bool { return s.label == "succeeded" })
	if s.list != digest {
		t.Errorf("annotation %.12s, want %.12s", s.list, digest)
	}
	var msgs []string
	for _, e := range in.events(ctx) {
		if e.Type == corev1.EventTypeWarning && e.Reason == "PrefetchCredentialFileSkipped" {
			msgs = append(msgs, e.Message)
		}
		if strings.Contains(e.Message, secret) {
			t.Errorf("event %s quotes the broken file's secret", e.Name)
		}
	}
	joined := strings.Join(msgs, "\n")
	for _, f := range []string{broken, absent} {
		if !strings.Contains(joined, f) {
			t.Errorf("no PrefetchCredentialFileSkipped event names %s:\n%s", f, joined)
		}
	}
	if strings.Contains(out, secret) || strings.Contains(out, env.AuthPassword(t)) {
		t.Error("a secret appears in the agent's output")
	}
}

// Case 7: an unreadable list (a missing file, then a directory in its place) turns the node's succeeded
// for the previous list into failed, with the annotation "unreadable" and a Warning event naming the path;
// fetch exits 1; a readable list replaces it again.
func TestFaultUnreadableList(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	in := newFaultInstance(t, env, "list")
	good, digest := writeImageList(t, refs(t, env, "e2e/small:13")...)
	if code, out := runAgent(t, 2*time.Minute, append([]string{"fetch"}, in.flags(good)...)...); code != 0 {
		t.Fatalf("fetch of a good list exited %d\n%s", code, out)
	}
	in.waitState(ctx, "succeeded", func(s nodeState) bool { return s.label == "succeeded" && s.list == digest })

	dir := t.TempDir()
	for name, path := range map[string]string{"missing file": filepath.Join(dir, "missing.txt"), "directory": dir} {
		t.Run(name, func(t *testing.T) {
			code, out := runAgent(t, 2*time.Minute, append([]string{"fetch"}, in.flags(path)...)...)
			if code != 1 {
				t.Errorf("fetch of an unreadable list exited %d, want 1\n%s", code, out)
			}
			if strings.Contains(out, "read image list: read image list") {
				t.Errorf("doubled prefix in the output:\n%s", out)
			}
			s, ok := in.state(ctx)
			if !ok || s.label != "failed" || s.list != "unreadable" {
				t.Errorf("node state %v, want failed with annotation \"unreadable\"", s)
			}
			found := false
			for _, e := range in.events(ctx) {
				if e.Type == corev1.EventTypeWarning && e.Reason == "PrefetchFailed" && strings.Contains(e.Message, path) {
					found = true
				}
			}
			if !found {
				t.Errorf("no Warning PrefetchFailed event names %s", path)
			}
		})
	}
	if code, out := runAgent(t, 2*time.Minute, append([]string{"fetch"}, in.flags(good)...)...); code != 0 {
		t.Fatalf("fetch of the good list again exited %d\n%s", code, out)
	}
	if s, ok := in.state(ctx); !ok || s.label != "succeeded" || s.list != digest {
		t.Errorf("after the list came back: %v, want succeeded for %.12s", s, digest)
	}
}

// countingAPI is an HTTPS reverse proxy in front of the real API server that counts every request by
// method; the agent reaches it through a kubeconfig of its own. The proxy adds the admin credentials.
type countingAPI struct {
	srv        *httptest.Server
	kubeconfig string
	mu         sync.Mutex
	requests   []string // "METHOD path"
}

func newCountingAPI(t *testing.T, env *clusterenv.Env) *countingAPI {
	t.Helper()
	cfg, err := env.RESTConfig()
	if err != nil {
		t.Fatal(err)
	}
	rt, err := rest.TransportFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	upstream, err := url.Parse(cfg.Host)
	if err != nil {
		t.Fatal(err)
	}
	c := &countingAPI{}
	rp := httputil.NewSingleHostReverseProxy(upstream)
	rp.Transport = rt
	c.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		c.requests = append(c.requests, r.Method+" "+r.URL.Path)
		c.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	c.srv.TLS = &tls.Config{MinVersion: tls.VersionTLS12}
	c.srv.StartTLS()
	t.Cleanup(c.srv.Close)
	c.kubeconfig = filepath.Join(t.TempDir(), "counting.kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: counting
  cluster:
    server: %s
    insecure-skip-tls-verify: true
contexts:
- name: counting
  context: {cluster: counting, user: none}
users:
- name: none
  user: {}
current-context: counting
`, c.srv.URL)
	if err := os.WriteFile(c.kubeconfig, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	return c
}

// take returns the requests since the last call.
func (c *countingAPI) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.requests
	c.requests = nil
	return out
}

func writesOf(reqs []string) []string {
	var w []string
	for _, r := range reqs {
		if !strings.HasPrefix(r, http.MethodGet+" ") {
			w = append(w, r)
		}
	}
	return w
}

// Case 8: a warm `fetch` (every image present, the node already saying succeeded for this list) makes no
// API write: counted on the wire by a proxy in front of the API server, three times in a row, and no new
// PrefetchSucceeded event.
func TestFaultWarmFetchWritesNothing(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	_, images := env.CRI(t)
	list := refs(t, env, "e2e/small:11", "e2e/small:12")
	removeImages(ctx, t, images, list)
	in := newFaultInstance(t, env, "warm")
	file, digest := writeImageList(t, list...)
	api := newCountingAPI(t, env)
	flags := []string{"--cri-socket", env.CRISocket, "--kubeconfig", api.kubeconfig, "--node-name", env.NodeName,
		"--instance", in.name, "--image-list-file", file}

	if code, out := runAgent(t, 2*time.Minute, append([]string{"fetch"}, flags...)...); code != 0 {
		t.Fatalf("cold fetch exited %d\n%s", code, out)
	}
	cold := api.take()
	t.Logf("measured: cold fetch: %d API requests, writes %v", len(cold), writesOf(cold))
	if len(writesOf(cold)) == 0 {
		t.Fatal("the cold fetch wrote nothing through the counting proxy: the proxy is not in the agent's path")
	}
	in.waitState(ctx, "succeeded", func(s nodeState) bool { return s.label == "succeeded" && s.list == digest })
	succeeded := func() int {
		n := 0
		for _, e := range in.events(ctx) {
			if e.Reason == "PrefetchSucceeded" {
				n++
			}
		}
		return n
	}
	before := succeeded()
	for i := range 3 {
		code, out := runAgent(t, 2*time.Minute, append([]string{"fetch"}, flags...)...)
		if code != 0 {
			t.Fatalf("warm fetch %d exited %d\n%s", i, code, out)
		}
		reqs := api.take()
		t.Logf("measured: warm fetch %d: %d API requests %v, %d writes", i, len(reqs), reqs, len(writesOf(reqs)))
		if w := writesOf(reqs); len(w) != 0 {
			t.Errorf("warm fetch %d wrote to the API: %v", i, w)
		}
	}
	if after := succeeded(); after != before {
		t.Errorf("%d new PrefetchSucceeded events from warm fetches, want 0", after-before)
	}
	if s, ok := in.state(ctx); !ok || s.label != "succeeded" || s.list != digest {
		t.Errorf("node state after warm fetches: %v", s)
	}
}
