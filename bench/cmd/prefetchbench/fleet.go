package main

import (
	"context"
	"fmt"
	"log"
	"math"
	"net"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/utils/ptr"

	"github.com/nodeprefetch/image-prefetcher/bench/shaper"
	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/deploy"
	"github.com/nodeprefetch/image-prefetcher/e2e/registrylog"
)

// The fleet benchmark (-only fleet, `make bench-fleet`): a rollout of L images to M = 1..N fleet nodes
// with K pull slots (--max-concurrent-nodes), each node's link capped (tc on its veth), the instance from
// the default overlay as a user deploys it. Per rollout: the time from the apply to every node saying
// succeeded, against the ideal ceil(M/K) x one node's time (M = K = 1, measured in the same round); the
// bytes the registry served (its access log) against L x M; and the slot handoff gaps (a slot's release
// to its next holder, polled every 50 ms). Then the same list to all N nodes at once through a
// pull-through mirror (fresh for each rollout), without and with --seed-first: the bytes the registry
// behind the mirror served, against L.

const fleetPoolLabel = "bench.image-prefetcher.stackrox.io/pool"

type fleetKey struct {
	m, k         int
	mirror, seed bool
}

type fleetResult struct {
	total time.Duration
	// bytes is what the registry served; nodeBytes what the nodes were served (the same without a mirror)
	bytes, nodeBytes int64
	gaps             []time.Duration
}

func (b *bench) fleet(ctx context.Context) error {
	env := b.env
	all, err := env.FleetNodes()
	if err != nil {
		return err
	}
	// the first node shares this machine's namespaces: its link cannot be capped, so it takes no part
	nodes := all[1:]
	if len(nodes) < 2 || env.FleetRegistryLog() == "" {
		return fmt.Errorf("the fleet benchmark needs >= 2 fleet nodes (make bench-fleet brings them up); the cluster has %d", len(nodes))
	}
	cfg, err := env.RESTConfig()
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	root, err := bundle.Root()
	if err != nil {
		return err
	}
	var list []string
	var listBytes int64
	images, err := env.Catalogue()
	if err != nil {
		return err
	}
	catalogue := map[string]clusterenv.Image{}
	for _, img := range images {
		catalogue[img.Ref] = img
	}
	repos := map[string]bool{}
	for _, name := range strings.Split(b.o.fleetImages, ",") {
		img, ok := catalogue[env.Registry+"/"+strings.TrimSpace(name)]
		if !ok {
			return fmt.Errorf("-fleet-images: %q is not a test image of the harness", name)
		}
		list = append(list, img.Ref)
		listBytes += img.LayersBytes
		repos[strings.SplitN(strings.TrimPrefix(img.Ref, env.Registry+"/"), ":", 2)[0]] = true
	}
	// the agent's own image before the links are capped: a rollout's time is the list's
	for _, n := range nodes {
		if err := nodeCRI(n, func(images runtimeapi.ImageServiceClient) error {
			_, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: env.AgentImage}})
			return err
		}); err != nil {
			return fmt.Errorf("pull the agent image on %s: %w", n.Name, err)
		}
		if err := clusterenv.Harness(ctx, "shape-node", n.Name, fmt.Sprint(b.o.fleetMbit)); err != nil {
			return err
		}
		defer func() { _ = clusterenv.Harness(context.WithoutCancel(ctx), "shape-node", n.Name, "0") }()
	}
	var runs []fleetKey
	for m := 1; m <= len(nodes); m++ {
		for _, k := range []int{1, 2, m} {
			if k <= m && !slices.Contains(runs, fleetKey{m: m, k: k}) {
				runs = append(runs, fleetKey{m: m, k: k})
			}
		}
	}
	n := len(nodes)
	mirrored := []fleetKey{{m: n, k: n, mirror: true}, {m: n, k: n, mirror: true, seed: true}}
	runs = append(runs, mirrored...)
	defer func() { _ = clusterenv.Harness(context.WithoutCancel(ctx), "fleet-registry", "plain") }()
	results := map[fleetKey][]fleetResult{}
	for round := 0; round < b.o.rounds; round++ {
		// rotate the order every round; the baseline (1, 1) is one of the runs
		order := append(slices.Clone(runs[round%len(runs):]), runs[:round%len(runs)]...)
		for _, r := range order {
			res, err := b.rollout(ctx, cs, root, nodes[:r.m], r, list, repos, round)
			if err != nil {
				return fmt.Errorf("round %d, M=%d K=%d: %w", round+1, r.m, r.k, err)
			}
			log.Printf("fleet round %d: M=%d K=%d mirror=%v seed=%v: all succeeded in %s, registry served %.1f MiB (nodes fetched %.1f MiB), %d handoffs",
				round+1, r.m, r.k, r.mirror, r.seed, res.total.Round(100*time.Millisecond), float64(res.bytes)/(1<<20),
				float64(res.nodeBytes)/(1<<20), len(res.gaps))
			results[r] = append(results[r], res)
		}
	}

	fmt.Fprintf(b.out, "## Fleet rollout\n\n")
	fmt.Fprintf(b.out, "%d images (%.0f MiB) to M of %d fleet nodes (%s), each node's link capped at %d Mbit/s, K pull slots "+
		"(`--max-concurrent-nodes`), the default overlay with components/max-concurrent-nodes; %d rounds, medians; "+
		"ideal = ceil(M/K) x the M = K = 1 rollout of the same round; bytes as the registry's access log counts them.\n\n",
		len(list), float64(listBytes)/(1<<20), len(nodes), runtimesOf(nodes), b.o.fleetMbit, b.o.rounds)
	fmt.Fprintf(b.out, "| M | K | all succeeded | / ideal | registry MiB | / (L x M) | handoff gap p50 / p99 |\n|---|---|---|---|---|---|---|\n")
	for _, r := range runs {
		if r.mirror {
			continue
		}
		var totals []time.Duration
		var ratios, byteRatios []float64
		var mibs []float64
		var gaps []time.Duration
		for round, res := range results[r] {
			totals = append(totals, res.total)
			one := results[fleetKey{m: 1, k: 1}][round].total
			ideal := time.Duration(math.Ceil(float64(r.m)/float64(r.k))) * one
			ratios = append(ratios, float64(res.total)/float64(ideal))
			mibs = append(mibs, float64(res.bytes)/(1<<20))
			byteRatios = append(byteRatios, float64(res.bytes)/float64(listBytes*int64(r.m)))
			gaps = append(gaps, res.gaps...)
		}
		gap := "-"
		if len(gaps) > 0 {
			gap = fmt.Sprintf("%s / %s", percentile(gaps, 0.5).Round(10*time.Millisecond), percentile(gaps, 0.99).Round(10*time.Millisecond))
		}
		fmt.Fprintf(b.out, "| %d | %d | %s | %.2f | %.1f | %.2f | %s |\n", r.m, r.k, median(totals).Round(100*time.Millisecond),
			medianF(ratios), medianF(mibs), medianF(byteRatios), gap)
	}
	fmt.Fprintln(b.out)

	fmt.Fprintf(b.out, "Through a pull-through mirror (distribution's proxy mode, empty before each rollout) in front of the "+
		"registry, its link to the registry capped at %d Mbit/s, all %d nodes at once (K = %d): the registry's bytes are what it served the mirror (its own access log), "+
		"against L; the nodes' are what the mirror served them, against L x M; time against the M = K = 1 rollout "+
		"(plain registry) of the same round.\n\n", b.o.fleetUpstreamMbit, n, n)
	fmt.Fprintf(b.out, "| seeding | all succeeded | / one node | registry MiB | / L | nodes MiB | / (L x M) |\n|---|---|---|---|---|---|---|\n")
	for _, r := range mirrored {
		var totals []time.Duration
		var ratios, mibs, byteRatios, nodeMibs, nodeRatios []float64
		for round, res := range results[r] {
			totals = append(totals, res.total)
			ratios = append(ratios, float64(res.total)/float64(results[fleetKey{m: 1, k: 1}][round].total))
			mibs = append(mibs, float64(res.bytes)/(1<<20))
			byteRatios = append(byteRatios, float64(res.bytes)/float64(listBytes))
			nodeMibs = append(nodeMibs, float64(res.nodeBytes)/(1<<20))
			nodeRatios = append(nodeRatios, float64(res.nodeBytes)/float64(listBytes*int64(r.m)))
		}
		seeding := "no"
		if r.seed {
			seeding = "`--seed-first`"
		}
		fmt.Fprintf(b.out, "| %s | %s | %.2f | %.1f | %.2f | %.1f | %.2f |\n", seeding, median(totals).Round(100*time.Millisecond),
			medianF(ratios), medianF(mibs), medianF(byteRatios), medianF(nodeMibs), medianF(nodeRatios))
	}
	fmt.Fprintln(b.out)
	return nil
}

// rollout deploys one instance to nodes (selected by a pool label), waits for every node to say
// succeeded, and takes it away again.
func (b *bench) rollout(ctx context.Context, cs kubernetes.Interface, root string, nodes []clusterenv.Node, r fleetKey, list []string,
	repos map[string]bool, round int) (fleetResult, error) {
	env := b.env
	var res fleetResult
	k := r.k
	name := fmt.Sprintf("bench-fleet-m%d-k%d-r%d", len(nodes), k, round+1)
	mode := "plain"
	if r.mirror {
		mode = "mirror"
		name += "-mirror"
		if r.seed {
			name += "-seed"
		}
	}
	// a mirror starts empty for every rollout, and reaches the registry through a link of its own (a site's
	// uplink); the plain registry is switched to only when it is not on
	if r.mirror {
		uplink, err := shaper.Listen("127.0.0.1:0", shaper.Config{Upstream: env.Registry, BitsPerSecond: int64(b.o.fleetUpstreamMbit) * 1_000_000})
		if err != nil {
			return res, err
		}
		defer uplink.Close()
		if err := clusterenv.Harness(ctx, "fleet-registry", mode, uplink.Addr()); err != nil {
			return res, err
		}
		b.fleetMode = mode
	} else if b.fleetMode != "plain" {
		if err := clusterenv.Harness(ctx, "fleet-registry", mode); err != nil {
			return res, err
		}
		b.fleetMode = mode
	}
	for _, n := range nodes {
		if err := nodeCRI(n, func(images runtimeapi.ImageServiceClient) error {
			return runtime{images: images}.removeAll(ctx, list)
		}); err != nil {
			return res, fmt.Errorf("node %s: %w", n.Name, err)
		}
		if err := labelNode(ctx, cs, n.Name, fleetPoolLabel, ptr.To(name)); err != nil {
			return res, err
		}
	}
	defer func() {
		// the pool label, and the instance's label and list annotation (its namespace goes at once, so
		// its agents may not get to remove them)
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:null,%q:null},"annotations":{%q:null}}}`,
			fleetPoolLabel, "image-prefetcher.stackrox.io/"+name, "list.image-prefetcher.stackrox.io/"+name)
		for _, n := range nodes {
			if _, err := cs.CoreV1().Nodes().Patch(context.WithoutCancel(ctx), n.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
				log.Printf("cleanup of node %s: %v", n.Name, err)
			}
		}
	}()
	port, err := freePort()
	if err != nil {
		return res, err
	}
	o := deploy.Options{
		Namespace: name, Instance: name, Flavor: bundle.FlavorVanilla, Images: list,
		Components: []string{"max-concurrent-nodes"}, AgentImage: env.AgentImage, ListenPort: port,
		NodeSelector: map[string]string{fleetPoolLabel: name},
		ExtraArgs:    []string{fmt.Sprintf("--max-concurrent-nodes=%d", k)},
	}
	if r.seed {
		o.ExtraArgs = append(o.ExtraArgs, "--seed-first")
	}
	o.UseHarness(env)
	manifests, err := deploy.Build(root, filepath.Join(b.dir, name), o)
	if err != nil {
		return res, err
	}
	offset, err := registrylog.Size(env.FleetRegistryLog())
	if err != nil {
		return res, err
	}
	upstreamLog := env.Var("IMAGE_PREFETCHER_E2E_REGISTRY_LOG")
	upstreamOffset, err := registrylog.Size(upstreamLog)
	if err != nil {
		return res, err
	}
	start := time.Now()
	if out, err := env.Kubectl(ctx, manifests, "apply", "-f", "-"); err != nil {
		return res, fmt.Errorf("kubectl apply: %w\n%s", err, out)
	}
	defer func() {
		if out, err := env.Kubectl(context.WithoutCancel(ctx), manifests, "delete", "-f", "-", "--wait", "--timeout=2m"); err != nil {
			log.Printf("delete %s: %v\n%s", name, err, out)
		}
	}()
	label := "image-prefetcher.stackrox.io/" + name
	slots := newSlotWatch()
	err = wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 15*time.Minute, true, func(ctx context.Context) (bool, error) {
		if leases, err := cs.CoordinationV1().Leases(name).List(ctx, metav1.ListOptions{}); err == nil {
			for _, l := range leases.Items {
				if strings.HasPrefix(l.Name, name+"-pull-slot-") {
					slots.see(l.Name, ptr.Deref(l.Spec.HolderIdentity, ""), time.Now())
				}
			}
		}
		done := 0
		for _, n := range nodes {
			node, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			if node.Labels[label] == "succeeded" {
				done++
			}
		}
		return done == len(nodes), nil
	})
	if err != nil {
		return res, fmt.Errorf("waiting for every node to say succeeded: %w", err)
	}
	res.total = time.Since(start)
	res.gaps = slots.gaps
	entries, err := registrylog.ReadFrom(env.FleetRegistryLog(), offset)
	if err != nil {
		return res, err
	}
	ips := map[string]bool{}
	for _, n := range nodes {
		ips[n.IP] = true
	}
	for _, e := range entries {
		if ips[e.Addr] && repos[e.Repository()] {
			res.nodeBytes += e.Bytes
		}
	}
	res.bytes = res.nodeBytes
	if r.mirror {
		// only the mirror fetches from the registry during the rollout
		up, err := registrylog.ReadFrom(upstreamLog, upstreamOffset)
		if err != nil {
			return res, err
		}
		res.bytes = 0
		for _, e := range up {
			if repos[e.Repository()] {
				res.bytes += e.Bytes
			}
		}
	}
	return res, nil
}

// slotWatch turns polled holders of the slot Leases into handoff gaps: the time from a slot's release (its
// holder gone) to its next holder.
type slotWatch struct {
	holder   map[string]string
	released map[string]time.Time
	gaps     []time.Duration
}

func newSlotWatch() *slotWatch {
	return &slotWatch{holder: map[string]string{}, released: map[string]time.Time{}}
}

func (w *slotWatch) see(slot, holder string, now time.Time) {
	prev, seen := w.holder[slot]
	w.holder[slot] = holder
	switch {
	case !seen || prev == holder:
	case holder == "":
		w.released[slot] = now
	default:
		// a new holder: from the release, or (a handover within one poll) from now
		from, ok := w.released[slot]
		if !ok || prev != "" {
			from = now
		}
		w.gaps = append(w.gaps, now.Sub(from))
		delete(w.released, slot)
	}
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

func runtimesOf(nodes []clusterenv.Node) string {
	count := map[string]int{}
	var names []string
	for _, n := range nodes {
		if count[n.Runtime] == 0 {
			names = append(names, n.Runtime)
		}
		count[n.Runtime]++
	}
	parts := make([]string, 0, len(names))
	for _, r := range names {
		parts = append(parts, fmt.Sprintf("%d x %s", count[r], r))
	}
	return strings.Join(parts, ", ")
}

func nodeCRI(n clusterenv.Node, f func(runtimeapi.ImageServiceClient) error) error {
	conn, err := grpc.NewClient("unix://"+n.CRISocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	defer conn.Close()
	return f(runtimeapi.NewImageServiceClient(conn))
}

func labelNode(ctx context.Context, cs kubernetes.Interface, node, key string, value *string) error {
	v := "null"
	if value != nil {
		v = fmt.Sprintf("%q", *value)
	}
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, key, v)
	if _, err := cs.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("label node %s: %w", node, err)
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", ":0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
