package app

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pullslots"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

const (
	scaleAgents    = 200
	scaleK         = 10
	scalePullDelay = 200 * time.Millisecond
	scaleInstance  = "scale"
)

// pullObserver is the fake runtime's image service seen from outside the
// agents: it counts how many distinct nodes have a PullImage in flight (the
// node is the path element after registry.test/scale/ in the reference).
type pullObserver struct {
	*critest.Server
	mu      sync.Mutex
	pulling map[string]int
	peak    int
	pulls   int
	// atPeak are the nodes pulling when the peak was first reached, and when.
	atPeak   []string
	peakTime time.Time
}

func (o *pullObserver) PullImage(ctx context.Context, req *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	node := strings.Split(strings.TrimPrefix(req.GetImage().GetImage(), "registry.test/scale/"), "/")[0]
	o.mu.Lock()
	o.pulling[node]++
	o.pulls++
	if len(o.pulling) > o.peak {
		o.peak, o.peakTime, o.atPeak = len(o.pulling), time.Now(), slices.Sorted(maps.Keys(o.pulling))
	}
	o.mu.Unlock()
	defer func() {
		o.mu.Lock()
		if o.pulling[node]--; o.pulling[node] == 0 {
			delete(o.pulling, node)
		}
		o.mu.Unlock()
	}()
	return o.Server.PullImage(ctx, req)
}

// requestCounter counts an agent's API requests by verb and resource on the
// client side, as a cross-check of the API server's own metrics.
type requestCounter struct {
	mu     sync.Mutex
	counts map[string]int // "VERB resource"
}

var resourceInPath = regexp.MustCompile(`/(nodes|leases|events)(/|$|\?)`)

func (c *requestCounter) wrap(rt http.RoundTripper) http.RoundTripper {
	return roundTripperFunc(func(r *http.Request) (*http.Response, error) {
		verb := r.Method
		if r.URL.Query().Get("watch") == "true" || r.URL.Query().Get("watch") == "1" {
			verb = "WATCH"
		} else if verb == http.MethodGet && !regexp.MustCompile(`/(nodes|leases|events)/[^/]+$`).MatchString(r.URL.Path) {
			verb = "LIST"
		}
		res := "other"
		if m := resourceInPath.FindStringSubmatch(r.URL.Path); m != nil {
			res = m[1]
		}
		c.mu.Lock()
		c.counts[verb+" "+res]++
		c.mu.Unlock()
		return rt.RoundTrip(r)
	})
}

func (c *requestCounter) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int, len(c.counts))
	for k, v := range c.counts {
		out[k] = v
	}
	return out
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// apiserverRequests reads apiserver_request_total from the API server's
// /metrics, summed by "VERB resource".
func apiserverRequests(ctx context.Context, t *testing.T, cs kubernetes.Interface) map[string]float64 {
	t.Helper()
	raw, err := cs.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		t.Fatalf("read API server metrics: %v", err)
	}
	verbRe, resRe := regexp.MustCompile(`[{,]verb="([^"]*)"`), regexp.MustCompile(`[{,]resource="([^"]*)"`)
	out := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "apiserver_request_total{") {
			continue
		}
		v, r := verbRe.FindStringSubmatch(line), resRe.FindStringSubmatch(line)
		if v == nil || r == nil {
			continue
		}
		f, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			continue
		}
		out[v[1]+" "+r[1]] += f
	}
	return out
}

// perNode formats the server-side deltas of the resources the agents use,
// per node, next to the background rate measured while nothing of ours ran.
func perNode(before, after, bgBefore, bgAfter map[string]float64, bgSecs, secs float64) string {
	var keys []string
	for k := range after {
		if strings.HasSuffix(k, " leases") || strings.HasSuffix(k, " nodes") || strings.HasSuffix(k, " events") {
			if after[k]-before[k] > 0 {
				keys = append(keys, k)
			}
		}
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		bg := (bgAfter[k] - bgBefore[k]) / bgSecs * secs
		fmt.Fprintf(&b, "  %-14s %6.0f total  %5.2f/node  (background estimate %.0f)\n", k, after[k]-before[k], (after[k]-before[k]-bg)/scaleAgents, bg)
	}
	return b.String()
}

func isWrite(k string) bool {
	verb := strings.SplitN(k, " ", 2)[0]
	return verb == "POST" || verb == "PUT" || verb == "PATCH" || verb == "DELETE"
}

// TestScaleManyAgentsOneBound runs 200 agents (the real pass code, each with
// its own Node, client and CRI connection) against the harness' real API
// server with --max-concurrent-nodes=10, and checks from outside that no more
// than 10 nodes ever pull at once and that every node ends succeeded.
func TestScaleManyAgentsOneBound(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cfg, err := env.RESTConfig()
	if err != nil {
		t.Fatal(err)
	}
	adminCfg := rest.CopyConfig(cfg)
	adminCfg.QPS, adminCfg.Burst = 500, 1000
	admin := kubernetes.NewForConfigOrDie(adminCfg)

	suffix := fmt.Sprintf("%05d", rand.IntN(100000))
	ns := "prefetch-scale-" + suffix
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	nodes := make([]string, scaleAgents)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("prefetch-scale-%s-%03d", suffix, i)
	}
	t.Cleanup(func() { cleanupScale(t, admin, ns, nodes) })

	// Nodes without the kubernetes.io/os label and with a NoExecute taint: no
	// DaemonSet of another test on the shared cluster lands on them.
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(20)
	for _, name := range nodes {
		g.Go(func() error {
			_, err := admin.CoreV1().Nodes().Create(gctx, &corev1.Node{
				ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"image-prefetcher.test/simulated": "true"}},
				Spec: corev1.NodeSpec{Unschedulable: true, Taints: []corev1.Taint{{
					Key: "image-prefetcher.test/simulated", Value: "true", Effect: corev1.TaintEffectNoExecute}}},
			}, metav1.CreateOptions{})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("create nodes: %v", err)
	}

	// One fake runtime behind an observer; every agent has its own images
	// and its own connection.
	fakeCRI := critest.New()
	fakeCRI.SetDefaultPull(critest.Succeed().After(scalePullDelay))
	obs := &pullObserver{Server: fakeCRI, pulling: map[string]int{}}
	gs := grpc.NewServer()
	runtimeapi.RegisterImageServiceServer(gs, obs)
	runtimeapi.RegisterRuntimeServiceServer(gs, fakeCRI)
	sockDir, err := os.MkdirTemp("", "scale")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "cri.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(l) //nolint:errcheck // ends with Stop
	defer gs.Stop()

	counters := make([]*requestCounter, scaleAgents)
	agents := make([]*prefetcher, scaleAgents)
	logs := make([]*lockedBuffer, scaleAgents)
	for i, name := range nodes {
		counters[i] = &requestCounter{counts: map[string]int{}}
		c := rest.CopyConfig(cfg)
		c.QPS, c.Burst = 0, 0 // client-go's defaults, as in the agent
		c.WrapTransport = counters[i].wrap
		client, err := kubernetes.NewForConfig(c)
		if err != nil {
			t.Fatal(err)
		}
		list := filepath.Join(t.TempDir(), "images.txt")
		refs := fmt.Sprintf("registry.test/scale/%s/app:1\nregistry.test/scale/%s/sidecar:1\n", name, name)
		if err := os.WriteFile(list, []byte(refs), 0o644); err != nil {
			t.Fatal(err)
		}
		o := defaultOptions()
		o.Instance, o.NodeName, o.Namespace = scaleInstance, name, ns
		o.MaxConcurrentNodes = scaleK
		o.CRISocket, o.ImageList = sock, list
		o.Log.Level = "warn"
		logs[i] = &lockedBuffer{}
		p, err := newPrefetcher(o, logs[i], client)
		if err != nil {
			t.Fatal(err)
		}
		defer p.close()
		agents[i] = p
	}

	// Background: what the cluster's own components send while we wait.
	bg0, bgStart := apiserverRequests(ctx, t, admin), time.Now()
	time.Sleep(5 * time.Second)
	bg1 := apiserverRequests(ctx, t, admin)
	bgSecs := time.Since(bgStart).Seconds()

	runPass := func(label string) (time.Duration, map[string]float64, map[string]float64) {
		before := apiserverRequests(ctx, t, admin)
		start := time.Now()
		var wg sync.WaitGroup
		failed := make(chan string, scaleAgents)
		for i, p := range agents {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rep, err := p.pass(ctx)
				if err != nil || rep.State != nodelabel.Succeeded {
					failed <- fmt.Sprintf("%s: state %q err %v\n%s", nodes[i], rep.State, err, logs[i])
				}
			}()
		}
		wg.Wait()
		took := time.Since(start)
		close(failed)
		n := 0
		for f := range failed {
			if n++; n <= 3 {
				t.Errorf("%s pass: %s", label, f)
			}
		}
		if n > 0 {
			t.Fatalf("%s pass: %d of %d agents did not succeed", label, n, scaleAgents)
		}
		return took, before, apiserverRequests(ctx, t, admin)
	}

	took1, m0, m1 := runPass("first")
	afterFirst := make([]map[string]int, scaleAgents)
	for i, c := range counters {
		afterFirst[i] = c.snapshot()
	}
	obs.mu.Lock()
	peak, pulls, atPeak, peakTime := obs.peak, obs.pulls, obs.atPeak, obs.peakTime
	obs.mu.Unlock()
	if peak > scaleK {
		// The agents log at warn (info from 200 of them slows the pass measured here); their
		// slot's acquire and release are info: run again with it to see who held which slot.
		t.Errorf("%d nodes pulled at the same time (at %s: %s), bound %d", peak,
			peakTime.Format("15:04:05.000"), strings.Join(atPeak, " "), scaleK)
	}
	if pulls != 2*scaleAgents {
		t.Errorf("%d PullImage calls, want %d (two images per node, no retries)", pulls, 2*scaleAgents)
	}

	// Every Node carries the label, read by the admin client.
	sel := nodelabel.Key(scaleInstance) + "=" + string(nodelabel.Succeeded)
	nl, err := admin.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: sel + ",image-prefetcher.test/simulated=true"})
	if err != nil {
		t.Fatal(err)
	}
	labelled := 0
	for _, n := range nl.Items {
		if strings.HasPrefix(n.Name, "prefetch-scale-"+suffix+"-") {
			labelled++
		}
	}
	if labelled != scaleAgents {
		t.Errorf("%d of %d nodes labelled %s", labelled, scaleAgents, sel)
	}
	// No slot is left held.
	ll, err := admin.CoordinationV1().Leases(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ll.Items) > scaleK {
		t.Errorf("%d slot Leases, at most %d expected", len(ll.Items), scaleK)
	}
	for _, le := range ll.Items {
		if h := le.Spec.HolderIdentity; h != nil && *h != "" {
			t.Errorf("%s still held by %s after every pass ended", le.Name, *h)
		}
	}

	// Second pass: every image is present; no slot is asked for.
	took2, m2, m3 := runPass("steady-state")
	var leaseReqs2, writes2 int
	for i, c := range counters {
		now := c.snapshot()
		for k, v := range now {
			d := v - afterFirst[i][k]
			if strings.HasSuffix(k, " leases") {
				leaseReqs2 += d
			}
			if isWrite(k) {
				writes2 += d
			}
		}
	}
	if leaseReqs2 != 0 {
		t.Errorf("steady-state pass sent %d Lease requests; a node with every image present takes no slot", leaseReqs2)
	}

	// Report (not asserted: timings depend on the machine).
	ideal := time.Duration((scaleAgents+scaleK-1)/scaleK) * scalePullDelay
	t.Logf("first pass: %d agents, K=%d, pull %s: %s wall (ideal ceil(N/K) x pull = %s, ratio %.2f; start jitter up to %s included); peak nodes pulling %d",
		scaleAgents, scaleK, scalePullDelay, took1.Round(time.Millisecond), ideal, took1.Seconds()/ideal.Seconds(), pullslots.DefaultStartJitter, peak)
	total1 := map[string]int{}
	for _, m := range afterFirst {
		for k, v := range m {
			total1[k] += v
		}
	}
	var keys []string
	for k := range total1 {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "  %-14s %6d total  %5.2f/node\n", k, total1[k], float64(total1[k])/scaleAgents)
	}
	t.Logf("first pass, agents' requests counted client-side:\n%s", b.String())
	t.Logf("first pass, API server apiserver_request_total deltas (nodes/leases/events; includes the cluster's own components):\n%s",
		perNode(m0, m1, bg0, bg1, bgSecs, took1.Seconds()))
	t.Logf("steady-state pass: %s wall; agents' writes %d (%.2f/node), Lease requests %d", took2.Round(time.Millisecond), writes2, float64(writes2)/scaleAgents, leaseReqs2)
	t.Logf("steady-state pass, API server deltas:\n%s", perNode(m2, m3, bg0, bg1, bgSecs, took2.Seconds()))
}

// cleanupScale deletes the simulated Nodes, their Events, the slot Leases and
// the namespace, on a fresh context so that a failed or timed-out test cleans
// up too.
func cleanupScale(t *testing.T, admin kubernetes.Interface, ns string, nodes []string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(20)
	for _, name := range nodes {
		g.Go(func() error {
			err := admin.CoreV1().Nodes().Delete(gctx, name, metav1.DeleteOptions{})
			if err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("delete node %s: %w", name, err)
			}
			err = admin.CoreV1().Events(metav1.NamespaceDefault).DeleteCollection(gctx, metav1.DeleteOptions{},
				metav1.ListOptions{FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + name})
			if err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("delete events of node %s: %w", name, err)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Errorf("cleanup: %v", err)
	}
	if err := admin.CoordinationV1().Leases(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("cleanup: delete leases: %v", err)
	}
	if err := admin.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("cleanup: delete namespace: %v", err)
	}
}
