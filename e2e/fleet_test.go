// The fleet tests: one cluster of several real nodes of different runtimes (`make e2e-fleet`: the harness's
// first node runs containerd 2.x, IMAGE_PREFETCHER_E2E_FLEET adds a CRI-O node and a containerd 1.6 node, each
// in a network and mount namespace of its own with its own kubelet), and instances from the default overlay.
// What they prove is what users claim of fleets: one DaemonSet serves every runtime, the cluster-wide
// bound holds at the registry, a dead node's slot goes to another, a node joining later is gated until its
// images are there.
package e2e_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"

	"github.com/nodeprefetch/image-prefetcher/bench/shaper"
	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/registrylog"
)

type fleet struct {
	env   *clusterenv.Env
	nodes []clusterenv.Node
}

// requireFleet fails the test unless the cluster has at least 3 nodes of at least 2 runtimes.
func requireFleet(t *testing.T) *fleet {
	t.Helper()
	env := clusterenv.Require(t, clusterenv.Full)
	return &fleet{env: env, nodes: env.RequireFleet(t)}
}

// reload reads the env file again (add-node and kill-node rewrite it).
func (f *fleet) reload(t *testing.T) {
	t.Helper()
	env, err := clusterenv.Load()
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := env.FleetNodes()
	if err != nil {
		t.Fatal(err)
	}
	f.env, f.nodes = env, nodes
}

// node is any node of the cluster by name, an image-GC node too.
func (f *fleet) node(t *testing.T, name string) clusterenv.Node {
	t.Helper()
	all, err := f.env.Nodes()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range all {
		if n.Name == name {
			return n
		}
	}
	t.Fatalf("no node %s in the harness's cluster", name)
	return clusterenv.Node{}
}

// instance is newInstance for every node: the default overlay (vanilla: containerd's and CRI-O's
// directories), and the API server at the fleet gateway, which every node's network namespace reaches.
func (f *fleet) instance(t *testing.T, name string, images []string, components ...string) *instance {
	t.Helper()
	// registered before the instance's own cleanup, so it runs after the DaemonSet is gone
	t.Cleanup(func() { f.removeLabels(t, labelPrefix+name, annotationPrefix+name) })
	in := newNamedInstance(t, f.env, name, images, components...)
	in.opts.Flavor = bundle.FlavorVanilla
	in.opts.UseHarness(f.env)
	return in
}

func (f *fleet) removeLabels(t *testing.T, label, annotation string) {
	cs := f.env.Clientset(t)
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:null},"annotations":{%q:null}}}`, label, annotation)
	for _, n := range f.nodes {
		_, err := cs.CoreV1().Nodes().Patch(context.Background(), n.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Logf("cleanup: label %s of node %s: %v", label, n.Name, err)
		}
	}
}

// removeImages removes refs from every node through its CRI socket, so that every node has to pull them.
func (f *fleet) removeImages(ctx context.Context, t *testing.T, refs []string) {
	t.Helper()
	for _, n := range f.nodes {
		removeImages(ctx, t, n.CRI(t), refs)
	}
}

// waitLabels waits until every one of nodes has the instance's label at want; it returns when each got it.
func (f *fleet) waitLabels(ctx context.Context, t *testing.T, in *instance, nodes []clusterenv.Node, want string) map[string]time.Time {
	t.Helper()
	at := map[string]time.Time{}
	have := map[string]string{}
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		for _, n := range nodes {
			if _, ok := at[n.Name]; ok {
				continue
			}
			node, err := in.cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			have[n.Name] = node.Labels[in.labelKey()]
			if have[n.Name] == want {
				at[n.Name] = time.Now()
			}
		}
		return len(at) == len(nodes), nil
	})
	if err != nil {
		t.Fatalf("label %s: want %q on every node, have %v: %v\n%s", in.labelKey(), want, have, err, f.diagnose(t, in))
	}
	return at
}

// diagnose is the instance's diagnosis plus every agent's log through the API (the fleet nodes' pod logs
// are in their own mount namespaces).
func (f *fleet) diagnose(t *testing.T, in *instance) string {
	out, _ := kubectl(t, f.env, nil, "-n", in.opts.Namespace, "logs", "-l", "app.kubernetes.io/instance="+in.name(),
		"--prefix", "--timestamps", "--tail=40", "--max-log-requests=20")
	return in.diagnose() + "\nagent logs through the API:\n" + out
}

// agentLog is the log of the instance's agent on node, through the API (a fleet node's pod logs are in its
// own mount namespace).
func (f *fleet) agentLog(ctx context.Context, in *instance, node string) (string, error) {
	pods, err := in.cs.CoreV1().Pods(in.opts.Namespace).List(ctx, metav1.ListOptions{
		LabelSelector: "app.kubernetes.io/instance=" + in.name(), FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		return "", err
	}
	if len(pods.Items) == 0 {
		return "", fmt.Errorf("no agent pod on node %s", node)
	}
	out, err := in.cs.CoreV1().Pods(in.opts.Namespace).GetLogs(pods.Items[0].Name, &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil {
		return "", fmt.Errorf("logs of %s: %w", pods.Items[0].Name, err)
	}
	return string(out), nil
}

// waitLog waits until the log of the instance's agent on node holds line.
func (f *fleet) waitLog(ctx context.Context, t *testing.T, in *instance, node, line string) {
	t.Helper()
	var last string
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		out, err := f.agentLog(ctx, in, node)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		last = out
		return strings.Contains(last, line), nil
	})
	if err != nil {
		t.Fatalf("the agent on %s never logged %q: %v\nlast seen: %s\n%s", node, line, err, last, f.diagnose(t, in))
	}
}

// addNode adds a fleet node for this test (options: add-node's, e.g. --image-gc); it is killed and its
// Node object deleted when the test ends.
func (f *fleet) addNode(t *testing.T, name, runtime, taints string, options ...string) clusterenv.Node {
	t.Helper()
	start := time.Now()
	args := []string{"add-node", name, runtime}
	if taints != "" {
		args = append(args, taints)
	}
	args = append(args, options...)
	t.Cleanup(func() {
		if _, err := os.Stat(filepath.Join(f.env.State, "nodes", name)); err == nil {
			clusterenv.RunHarness(t, "kill-node", name)
		}
		f.forget(t, name)
		f.reload(t)
	})
	clusterenv.RunHarness(t, args...)
	f.reload(t)
	t.Logf("node %s (%s) joined and Ready in %s", name, runtime, time.Since(start).Round(100*time.Millisecond))
	return f.node(t, name)
}

// forget deletes a dead node's Node object, as a cloud's node controller or an admin does, and its pods,
// which no kubelet will ever confirm gone.
func (f *fleet) forget(t *testing.T, name string) {
	t.Helper()
	ctx := context.Background()
	cs := f.env.Clientset(t)
	if err := cs.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("delete node %s: %v", name, err)
	}
	pods, err := cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + name})
	if err != nil {
		t.Errorf("pods of node %s: %v", name, err)
		return
	}
	for _, p := range pods.Items {
		_ = cs.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)})
	}
}

func (f *fleet) shape(t *testing.T, node string, mbit int) {
	t.Helper()
	clusterenv.RunHarness(t, "shape-node", node, fmt.Sprint(mbit))
	if mbit != 0 {
		t.Cleanup(func() {
			// a node the test killed has no link left to free
			if _, err := os.Stat(filepath.Join(f.env.State, "nodes", node)); err == nil {
				clusterenv.RunHarness(t, "shape-node", node, "0")
			}
		})
	}
}

// TestFleetQuickStartLabelsEveryNode: the quick start on a cluster of containerd 2.x, CRI-O and
// containerd 1.6 nodes: one DaemonSet from the default overlay runs a Ready agent on every node, each
// node holds the list (asked through its own runtime) and says succeeded.
func TestFleetQuickStartLabelsEveryNode(t *testing.T) {
	f := requireFleet(t)
	ctx := ctxFor(t, 6*time.Minute)
	list := refs(t, f.env, "e2e/small:06", "e2e/small:07", "e2e/small:08")
	f.removeImages(ctx, t, list)
	in := f.instance(t, "e2e-fleet-quick-"+suffix(t), list)
	start := time.Now()
	in.apply()
	in.requireRollout(4 * time.Minute)
	at := f.waitLabels(ctx, t, in, f.nodes, "succeeded")
	for _, n := range f.nodes {
		requireAllPresent(ctx, t, n.CRI(t), list)
		t.Logf("node %s (%s): succeeded %s after the apply", n.Name, n.Runtime, at[n.Name].Sub(start).Round(100*time.Millisecond))
	}
	perNode := map[string]int{}
	for _, p := range in.pods(ctx) {
		ready := slices.ContainsFunc(p.Status.Conditions, func(c corev1.PodCondition) bool {
			return c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue
		})
		if ready {
			perNode[p.Spec.NodeName]++
		}
	}
	for _, n := range f.nodes {
		if perNode[n.Name] != 1 {
			t.Errorf("node %s (%s): %d Ready agent pods of the one DaemonSet, want 1 (all: %v)", n.Name, n.Runtime, perNode[n.Name], perNode)
		}
	}
}

// fetchWindow is when one node fetched from the registry: its first and last request of a repository.
type fetchWindow struct {
	node        string
	first, last time.Time
	requests    int
}

// fetchWindows reads the fleet registry's access log from offset: per node of the fleet, the first and
// last request for the repository repo. Requests from nodes outside the test's fleet (the image-GC
// test's node, which make e2e-fleet runs beside the others, prefetches through its own agent run) are
// not the test's; any other address is kept under its own name.
func (f *fleet) fetchWindows(t *testing.T, offset int64, repo string) []fetchWindow {
	t.Helper()
	byIP := map[string]string{f.env.FleetGateway(): f.env.NodeName}
	for _, n := range f.nodes {
		byIP[n.IP] = n.Name
	}
	others := map[string]bool{}
	if env, err := clusterenv.Load(); err != nil {
		t.Fatal(err)
	} else if all, err := env.Nodes(); err != nil {
		t.Fatal(err)
	} else {
		for _, n := range all {
			if byIP[n.IP] == "" {
				others[n.IP] = true
			}
		}
	}
	entries, err := registrylog.ReadFrom(f.env.FleetRegistryLog(), offset)
	if err != nil {
		t.Fatal(err)
	}
	windows := map[string]*fetchWindow{}
	for _, e := range entries {
		if e.Repository() != repo || others[e.Addr] {
			continue
		}
		node := byIP[e.Addr]
		if node == "" {
			node = e.Addr
		}
		w := windows[node]
		if w == nil {
			w = &fetchWindow{node: node, first: e.At, last: e.At}
			windows[node] = w
		}
		w.requests++
		if e.At.Before(w.first) {
			w.first = e.At
		}
		if e.At.After(w.last) {
			w.last = e.At
		}
	}
	out := make([]fetchWindow, 0, len(windows))
	for _, w := range windows {
		out = append(out, *w)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].first.Before(out[j].first) })
	return out
}

// TestFleetMaxConcurrentNodesOneFetchesOneNodeAtATime: with components/max-concurrent-nodes at K = 1,
// the registry's own access log shows the nodes fetching the list one after another: no node's first
// request comes before the previous node's last. The fleet nodes' links are capped (100 Mbit/s) and each
// agent pulls one image at a time, so that one node's fetching spans seconds (the log's resolution).
func TestFleetMaxConcurrentNodesOneFetchesOneNodeAtATime(t *testing.T) {
	f := requireFleet(t)
	ctx := ctxFor(t, 8*time.Minute)
	list := refs(t, f.env, "e2e/random:4mib", "e2e/random:8mib", "e2e/random:12mib", "e2e/random:16mib", "e2e/random:20mib")
	f.removeImages(ctx, t, list)
	for _, n := range f.nodes[1:] {
		f.shape(t, n.Name, 100)
	}
	offset, err := registrylog.Size(f.env.FleetRegistryLog())
	if err != nil {
		t.Fatal(err)
	}
	in := f.instance(t, "e2e-fleet-bound-"+suffix(t), list, "max-concurrent-nodes")
	in.opts.ExtraArgs = []string{"--max-concurrent-nodes=1", "--max-parallel-pulls=1"}
	in.apply()
	f.waitLabels(ctx, t, in, f.nodes, "succeeded")
	windows := f.fetchWindows(t, offset, "e2e/random")
	for _, w := range windows {
		t.Logf("node %s fetched e2e/random from %s to %s (%d requests)", w.node, w.first.Format(time.TimeOnly), w.last.Format(time.TimeOnly), w.requests)
	}
	if len(windows) != len(f.nodes) {
		t.Fatalf("the registry saw %d nodes fetch the list, want every one of the %d: %+v", len(windows), len(f.nodes), windows)
	}
	for i := 1; i < len(windows); i++ {
		if windows[i].first.Before(windows[i-1].last) {
			t.Errorf("node %s started fetching at %s, before node %s's last request at %s: two nodes fetched at once with K = 1",
				windows[i].node, windows[i].first.Format(time.TimeOnly), windows[i-1].node, windows[i-1].last.Format(time.TimeOnly))
		}
	}
	if windows[len(windows)-1].last.Equal(windows[0].first) {
		t.Errorf("every fetch of the list fell in one second of the log (%s): the test cannot tell one node at a time from all at once", windows[0].first)
	}
}

// TestFleetKilledNodeHandsItsPullSlotOver: two fresh nodes share one pull slot (K = 1, a 10 s lease); the
// node holding it while it pulls (its link capped at 4 Mbit/s, so the pull lasts) is killed hard
// (kubelet, runtime and containers SIGKILLed, namespaces removed). The other node holds the slot within
// the lease duration plus 5 s, pulls and says succeeded.
func TestFleetKilledNodeHandsItsPullSlotOver(t *testing.T) {
	f := requireFleet(t)
	ctx := ctxFor(t, 8*time.Minute)
	sfx := suffix(t)
	pool := "e2e.image-prefetcher/fleet-kill"
	a := f.addNode(t, "e2e-kill-a-"+sfx, clusterenv.RuntimeContainerd, "")
	b := f.addNode(t, "e2e-kill-b-"+sfx, clusterenv.RuntimeContainerd16, "")
	cs := f.env.Clientset(t)
	for _, n := range []clusterenv.Node{a, b} {
		// the agent's own images before the link is capped: only the list is to come through it
		f.env.PullAgentImages(ctx, t, n)
		f.shape(t, n.Name, 4)
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, pool, sfx)
		if _, err := cs.CoreV1().Nodes().Patch(ctx, n.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	const lease = 10 * time.Second
	in := f.instance(t, "e2e-fleet-kill-"+sfx, refs(t, f.env, "e2e/random:20mib"), "max-concurrent-nodes")
	in.opts.NodeSelector = map[string]string{pool: sfx}
	in.opts.ExtraArgs = []string{"--max-concurrent-nodes=1", "--pull-slot-lease-duration=" + lease.String()}
	in.apply()

	slot := in.name() + "-pull-slot-0"
	holder := func(ctx context.Context) string {
		l, err := cs.CoordinationV1().Leases(in.opts.Namespace).Get(ctx, slot, metav1.GetOptions{})
		if err != nil {
			return ""
		}
		return ptr.Deref(l.Spec.HolderIdentity, "")
	}
	var first string
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		first = holder(ctx)
		return first == a.Name || first == b.Name, nil
	})
	if err != nil {
		t.Fatalf("no node took slot %s: %v\n%s", slot, err, f.diagnose(t, in))
	}
	survivor := a
	if first == a.Name {
		survivor = b
	}
	// The claim is about a node that waits for the slot: an agent that starts after the holder died sees
	// the Lease for the first time then and, trusting no other node's clock, waits a whole lease from
	// that moment. So the survivor's agent must be waiting before the kill.
	f.waitLog(ctx, t, in, survivor.Name, "waiting for a cluster-wide pull slot")
	t.Logf("node %s holds %s and pulls through its 4 Mbit/s link, %s waits for it; killing %s", first, slot, survivor.Name, first)
	killed := time.Now()
	clusterenv.RunHarness(t, "kill-node", first)
	var second string
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		second = holder(ctx)
		return second == survivor.Name, nil
	})
	took := time.Since(killed)
	if err != nil {
		t.Fatalf("node %s never took slot %s after %s died (holder %q): %v\n%s", survivor.Name, slot, first, second, err, f.diagnose(t, in))
	}
	t.Logf("node %s took the slot %s after %s was killed (lease %s)", survivor.Name, took.Round(100*time.Millisecond), first, lease)
	if took > lease+5*time.Second {
		t.Errorf("the slot went to %s %s after its holder died, want within the lease duration %s + 5 s\n%s", survivor.Name, took.Round(100*time.Millisecond), lease, f.diagnose(t, in))
	}
	f.forget(t, first)
	clusterenv.RunHarness(t, "shape-node", survivor.Name, "0")
	done := f.waitLabels(ctx, t, in, []clusterenv.Node{survivor}, "succeeded")
	t.Logf("node %s succeeded %s after the kill", survivor.Name, done[survivor.Name].Sub(killed).Round(100*time.Millisecond))
}

// TestFleetNodeJoiningLaterIsGatedUntilItsImagesArePresent: an instance with components/startup-taint
// runs on the fleet; a Deployment asks for a node that is not there yet, with a nodeSelector on the
// instance's label. A CRI-O node joins registered with the instance's startup taint: the agent lands on it
// (it tolerates its own taint), pulls, labels the node, removes the taint, and only then the Deployment's
// pod is scheduled there and starts from the prefetched image ("already present on machine").
func TestFleetNodeJoiningLaterIsGatedUntilItsImagesArePresent(t *testing.T) {
	f := requireFleet(t)
	ctx := ctxFor(t, 8*time.Minute)
	sfx := suffix(t)
	name := "e2e-fleet-join-" + sfx
	newNode := "e2e-join-" + sfx
	list := refs(t, f.env, "e2e/busybox:latest", "e2e/random:8mib")
	in := f.instance(t, name, list, "startup-taint")
	in.apply()
	in.requireRollout(4 * time.Minute)
	f.waitLabels(ctx, t, in, f.nodes, "succeeded")

	in.node = newNode
	createSleeper(ctx, t, in, "app", list[0], corev1.PullIfNotPresent,
		map[string]string{in.labelKey(): "succeeded", corev1.LabelHostname: newNode})
	pending := requireUnschedulable(ctx, t, in, "app", "")
	t.Logf("before the node joins, the app is held: %s", pending)

	taint := corev1.Taint{Key: labelPrefix + name, Effect: corev1.TaintEffectNoSchedule}
	var tl nodeTimeline
	followCtx, stopFollowing := context.WithCancel(ctx)
	followed := make(chan struct{})
	go func() { defer close(followed); tl.follow(followCtx, in.cs, newNode, in.labelKey(), taint) }()
	joined := time.Now()
	f.addNode(t, newNode, clusterenv.RuntimeCRIO, taint.Key+":"+string(taint.Effect))
	requireStartedWithoutPull(ctx, t, in, "app", list[0], corev1.PullIfNotPresent)
	in.node = f.env.NodeName // the joined node leaves with the test, before the instance's cleanup
	stopFollowing()
	<-followed
	tl.mu.Lock()
	succeeded, untaint := tl.succeeded, tl.untaint
	tl.mu.Unlock()
	if succeeded.IsZero() || untaint.IsZero() {
		t.Fatalf("node %s: label succeeded seen at %v, taint removal at %v: want both\n%s", newNode, succeeded, untaint, f.diagnose(t, in))
	}
	if untaint.Before(succeeded) {
		t.Errorf("node %s: the startup taint went (%s) before the label said succeeded (%s)", newNode, untaint.Format(time.StampMilli), succeeded.Format(time.StampMilli))
	}
	requireAllPresent(ctx, t, f.node(t, newNode).CRI(t), list)
	t.Logf("node %s: joined, labelled succeeded %s and untainted %s after the join began", newNode,
		succeeded.Sub(joined).Round(100*time.Millisecond), untaint.Sub(joined).Round(100*time.Millisecond))
}

// TestFleetSeedFirstThroughAMirror: the nodes pull through a pull-through mirror of the registry
// (distribution's proxy mode, empty before each rollout, reaching the registry over a 20 Mbit/s link as a
// site mirror reaches a remote registry), every node at once (K = number of nodes). With --seed-first one
// node fetches the list alone and the others only after its pass; the registry serves fewer bytes than
// the same rollout without seeding, in which nodes that start together miss the same blobs in the mirror
// at the same time and each miss is fetched from the registry.
func TestFleetSeedFirstThroughAMirror(t *testing.T) {
	f := requireFleet(t)
	ctx := ctxFor(t, 10*time.Minute)
	list := refs(t, f.env, "e2e/random:4mib", "e2e/random:8mib", "e2e/random:12mib")
	link, err := shaper.Listen("127.0.0.1:0", shaper.Config{Upstream: f.env.Registry, BitsPerSecond: 20_000_000})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { link.Close() })
	t.Cleanup(func() { clusterenv.RunHarness(t, "fleet-registry", "plain") })
	upstream := f.env.Var("IMAGE_PREFETCHER_E2E_REGISTRY_LOG")

	rollout := func(seed bool) (windows []fetchWindow, served int64) {
		t.Helper()
		f.removeImages(ctx, t, list)
		clusterenv.RunHarness(t, "fleet-registry", "mirror", link.Addr())
		offset, err := registrylog.Size(upstream)
		if err != nil {
			t.Fatal(err)
		}
		in := f.instance(t, "e2e-fleet-seed-"+suffix(t), list, "max-concurrent-nodes")
		in.opts.ExtraArgs = []string{fmt.Sprintf("--max-concurrent-nodes=%d", len(f.nodes))}
		if seed {
			in.opts.ExtraArgs = append(in.opts.ExtraArgs, "--seed-first")
		}
		in.apply()
		f.waitLabels(ctx, t, in, f.nodes, "succeeded")
		windows = f.fetchWindows(t, 0, "e2e/random") // the mirror's log starts with it
		entries, err := registrylog.ReadFrom(upstream, offset)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if e.Repository() == "e2e/random" {
				served += e.Bytes
			}
		}
		for _, w := range windows {
			t.Logf("seed-first=%v: node %s fetched the list from the mirror from %s to %s (%d requests)", seed, w.node,
				w.first.Format(time.TimeOnly), w.last.Format(time.TimeOnly), w.requests)
		}
		t.Logf("seed-first=%v: the registry served the mirror %.1f MiB", seed, float64(served)/(1<<20))
		if len(windows) != len(f.nodes) {
			t.Fatalf("the mirror saw %d nodes fetch the list, want %d: %+v", len(windows), len(f.nodes), windows)
		}
		return windows, served
	}

	_, unseeded := rollout(false)
	windows, seeded := rollout(true)
	for _, w := range windows[1:] {
		if w.first.Before(windows[0].last) {
			t.Errorf("with --seed-first node %s fetched from %s, before the seeding node %s was done (%s)", w.node,
				w.first.Format(time.TimeOnly), windows[0].node, windows[0].last.Format(time.TimeOnly))
		}
	}
	if seeded >= unseeded {
		t.Errorf("with --seed-first the registry served %d bytes, without %d: seeding should save registry egress", seeded, unseeded)
	}
}

// TestFleetNodeCutOffFromTheRegistrySaysFailed: one node cannot reach the registry (its connections are
// refused in its own network namespace): it says failed and its agent is not Ready, so the DaemonSet's
// rollout does not complete, while every other node says succeeded. Allowed again, it catches up.
func TestFleetNodeCutOffFromTheRegistrySaysFailed(t *testing.T) {
	f := requireFleet(t)
	ctx := ctxFor(t, 8*time.Minute)
	list := refs(t, f.env, "e2e/small:09", "e2e/small:10")
	f.removeImages(ctx, t, list)
	cut := f.nodes[len(f.nodes)-1]
	others := f.nodes[:len(f.nodes)-1]
	// the agent's own images first: only the list is to be out of reach
	f.env.PullAgentImages(ctx, t, cut)
	clusterenv.RunHarness(t, "node-registry", cut.Name, "block")
	t.Cleanup(func() { clusterenv.RunHarness(t, "node-registry", cut.Name, "allow") })
	in := f.instance(t, "e2e-fleet-cut-"+suffix(t), list)
	in.opts.RecheckInterval = "10s"
	// a pass that gives up within seconds (the defaults retry an unreachable registry for many minutes,
	// during which the node makes no claim either way)
	in.opts.ExtraArgs = []string{"--max-attempts=3", "--max-pull-attempt-delay=2s"}
	in.apply()
	f.waitLabels(ctx, t, in, others, "succeeded")
	f.waitLabels(ctx, t, in, []clusterenv.Node{cut}, "failed")
	if out, err := in.rollout(20 * time.Second); err == nil {
		t.Errorf("rollout status completed while node %s cannot pull the list:\n%s", cut.Name, out)
	}
	clusterenv.RunHarness(t, "node-registry", cut.Name, "allow")
	f.waitLabels(ctx, t, in, []clusterenv.Node{cut}, "succeeded")
	in.requireRollout(2 * time.Minute)
	requireAllPresent(ctx, t, cut.CRI(t), list)
}

// TestFleetNodeRelabelledOutLosesItsLabel: with components/node-placement every node opted in says
// succeeded; the CRI-O node's opt-in label removed, the DaemonSet controller stops its agent, which takes
// the instance's label and list annotation off that node on its way out, while the other nodes keep theirs.
func TestFleetNodeRelabelledOutLosesItsLabel(t *testing.T) {
	f := requireFleet(t)
	ctx := ctxFor(t, 6*time.Minute)
	cs := f.env.Clientset(t)
	optIn := func(node string, value *string) {
		t.Helper()
		if err := labelNodeValue(ctx, t, f, node, placementLabel, value); err != nil {
			t.Fatal(err)
		}
	}
	yes := "true"
	for _, n := range f.nodes {
		optIn(n.Name, &yes)
		t.Cleanup(func() { optIn(n.Name, nil) })
	}
	list := refs(t, f.env, "e2e/small:11", "e2e/small:12")
	in := f.instance(t, "e2e-fleet-out-"+suffix(t), list, "node-placement")
	in.apply()
	f.waitLabels(ctx, t, in, f.nodes, "succeeded")

	var out clusterenv.Node
	var stay []clusterenv.Node
	for _, n := range f.nodes {
		if n.Runtime == clusterenv.RuntimeCRIO && out.Name == "" {
			out = n
		} else {
			stay = append(stay, n)
		}
	}
	if out.Name == "" {
		t.Fatalf("no CRI-O node in the fleet: %+v", f.nodes)
	}
	optIn(out.Name, nil)
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		for _, p := range in.pods(ctx) {
			if p.Spec.NodeName == out.Name {
				return false, nil
			}
		}
		n, err := cs.CoreV1().Nodes().Get(ctx, out.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		_, labelled := n.Labels[in.labelKey()]
		_, annotated := n.Annotations[in.annotationKey()]
		return !labelled && !annotated, nil
	})
	if err != nil {
		t.Fatalf("node %s relabelled out of the placement: its agent, label or annotation stayed: %v\n%s", out.Name, err, f.diagnose(t, in))
	}
	for _, n := range stay {
		node, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if node.Labels[in.labelKey()] != "succeeded" {
			t.Errorf("node %s, still placed, says %q, want succeeded", n.Name, node.Labels[in.labelKey()])
		}
	}
}

// labelNodeValue sets (value) or removes (nil) a label of a node.
func labelNodeValue(ctx context.Context, t *testing.T, f *fleet, node, key string, value *string) error {
	t.Helper()
	v := "null"
	if value != nil {
		v = fmt.Sprintf("%q", *value)
	}
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, key, v)
	_, err := f.env.Clientset(t).CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
