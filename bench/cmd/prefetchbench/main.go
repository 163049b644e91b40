// Command prefetchbench measures the agent's pull pass on the real runtime of
// the e2e harness (containerd + a local registry): the agent's pass against
// raw parallel and sequential CRI pulls, at several --max-parallel-pulls, on
// bare loopback and through a shaping proxy (delay + bandwidth cap); the warm
// pass; a stalled registry; big images and an OCI artifact on slow links
// with capped attempts; the agent's memory and CPU. Every round starts
// from a cold content store, variants are interleaved (their order rotates
// each round), and the report prints medians and per-round ratios against
// raw parallel pulls of the same round. It prints Markdown on stdout and
// progress on stderr. `make bench` runs it (see docs/benchmarks.md).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/app"
	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/bench/imageset"
	"github.com/nodeprefetch/image-prefetcher/bench/shaper"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

type options struct {
	rounds       int
	delay        time.Duration
	mbit         int64
	stall        time.Duration
	agentBin     string
	only         string
	experiment   bool
	stallNoHedge bool
	holdAfter    int64
	windows      []time.Duration
	bigMbit      int64
	bigCap       time.Duration
	artifactMiB  int
	artifactMbit int64
	artifactCap  time.Duration
	artifactOff  bool
	fleetImages  string
	fleetMbit    int
	// fleetUpstreamMbit caps the pull-through mirror's link to the registry
	fleetUpstreamMbit int
}

func main() {
	var o options
	flag.IntVar(&o.rounds, "rounds", 5, "rounds of every variant")
	flag.DurationVar(&o.delay, "delay", 10*time.Millisecond, "shaping proxy: one-way delay each direction (round trip +2x)")
	flag.Int64Var(&o.mbit, "mbit", 200, "shaping proxy: bandwidth cap in Mbit/s per direction")
	flag.DurationVar(&o.stall, "stall", 20*time.Second, "stalled registry: connections made this long after the stall begins are never answered")
	flag.StringVar(&o.agentBin, "agent-bin", "bin/image-prefetcher", "the agent binary, for the memory and CPU measurements")
	flag.StringVar(&o.only, "only", "", "comma-separated parts to run: pulls,stall,midstall,big,artifact,resources,experiment (default: all of them), fleet (only when named: a full cluster with fleet nodes, make bench-fleet)")
	flag.BoolVar(&o.experiment, "experiment", true, "run the concurrent-PullImage experiment (does containerd let a second pull of a stalled ref progress?)")
	flag.BoolVar(&o.stallNoHedge, "stall-without-hedging", true, "also time the stall with --hedge-after=0, for comparison")
	flag.Int64Var(&o.holdAfter, "hold-after", 5*imageset.MiB, "mid-layer stall: bytes the held connection gets before it goes silent")
	windows := flag.String("windows", "15s,30s", "mid-layer stall: --pull-progress-timeout values timed besides the default (comma-separated; empty: none)")
	flag.Int64Var(&o.bigMbit, "big-mbit", 20, "big image: the shaped link in Mbit/s")
	flag.DurationVar(&o.bigCap, "big-cap", time.Minute, "big image: --max-pull-attempt-timeout, well below the transfer time")
	flag.IntVar(&o.artifactMiB, "artifact-mib", 1024, "OCI artifact: the model's weights in MiB")
	flag.Int64Var(&o.artifactMbit, "artifact-mbit", 400, "OCI artifact: the shaped link in Mbit/s")
	flag.DurationVar(&o.artifactCap, "artifact-cap", 10*time.Second, "OCI artifact: --max-pull-attempt-timeout, shorter than the transfer time")
	flag.BoolVar(&o.artifactOff, "artifact-progress-off", true, "OCI artifact: also run the agent with --pull-progress-timeout=0 (no resume; bounded by --overall-timeout)")
	flag.StringVar(&o.fleetImages, "fleet-images", "e2e/random:4mib,e2e/random:8mib,e2e/random:12mib,e2e/random:16mib", "fleet: the list, test images of the harness (comma-separated)")
	flag.IntVar(&o.fleetMbit, "fleet-mbit", 100, "fleet: each fleet node's link in Mbit/s")
	flag.IntVar(&o.fleetUpstreamMbit, "fleet-upstream-mbit", 50, "fleet: the pull-through mirror's link to the registry in Mbit/s")
	flag.Parse()
	for _, w := range strings.Split(*windows, ",") {
		if w = strings.TrimSpace(w); w == "" {
			continue
		}
		d, err := time.ParseDuration(w)
		if err != nil {
			log.Fatalf("-windows: %v", err)
		}
		o.windows = append(o.windows, d)
	}
	log.SetFlags(log.Ltime)
	log.SetOutput(os.Stderr)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		log.Fatal(err)
	}
}

// bench holds what every part shares.
type bench struct {
	o      options
	env    *clusterenv.Env
	rt     runtime
	shaped *shaper.Proxy // delay + cap
	plain  *shaper.Proxy // no shaping: counting and stalls
	dir    string
	sets   []imageset.Set
	hosts  []string // every registry name the sets are pulled under
	out    io.Writer
	store  *store // containerd's own API; nil on other runtimes
	// fleetMode is the fleet registry's mode (plain or mirror) as the fleet benchmark last set it.
	fleetMode string
}

func (b *bench) want(part string) bool {
	if b.o.only == "" {
		return (part != "experiment" || b.o.experiment) && part != "fleet"
	}
	for _, p := range strings.Split(b.o.only, ",") {
		if p == part {
			return true
		}
	}
	return false
}

func run(ctx context.Context, o options) error {
	env, err := clusterenv.Load()
	if err != nil {
		return err
	}
	if o.only == "fleet" {
		b := &bench{o: o, env: env, out: os.Stdout, fleetMode: "plain"}
		if b.dir, err = os.MkdirTemp("", "prefetchbench"); err != nil {
			return err
		}
		defer os.RemoveAll(b.dir)
		fmt.Fprintf(b.out, "# prefetchbench %s\n\n", time.Now().UTC().Format(time.RFC3339))
		return b.fleet(ctx)
	}
	client, err := cri.Dial(ctx, env.CRIEndpoint, 10*time.Second)
	if err != nil {
		return err
	}
	defer client.Close()
	b := &bench{o: o, env: env, rt: runtime{images: client.Images}, out: os.Stdout}
	if env.IsContainerd() {
		if b.store, err = dialStore(env.CRISocket); err != nil {
			return err
		}
		defer b.store.conn.Close()
	}
	if b.dir, err = os.MkdirTemp("", "prefetchbench"); err != nil {
		return err
	}
	defer os.RemoveAll(b.dir)

	b.sets = []imageset.Set{imageset.Shared(), imageset.Large(), imageset.Many()}
	// Only the big image and the artifact have sets of their own.
	needSets := b.want("experiment") || b.want("pulls") || b.want("stall") || b.want("midstall") || b.want("resources")
	for _, s := range b.sets {
		if !needSets {
			break
		}
		begin := time.Now()
		n, err := imageset.Push(env.Registry, s)
		if err != nil {
			return err
		}
		log.Printf("set %s: %d images, %d pushed now (%s)", s.Name, len(s.Images), n, time.Since(begin).Round(time.Millisecond))
	}
	if b.shaped, err = shaper.Listen("127.0.0.1:0", shaper.Config{Upstream: env.Registry, Delay: o.delay, BitsPerSecond: o.mbit * 1_000_000}); err != nil {
		return err
	}
	defer b.shaped.Close()
	if b.plain, err = shaper.Listen("127.0.0.1:0", shaper.Config{Upstream: env.Registry}); err != nil {
		return err
	}
	defer b.plain.Close()
	b.hosts = []string{env.Registry, b.shaped.Addr(), b.plain.Addr()}
	// Leave the node as found: none of the benchmark's images stay.
	defer func() {
		for _, s := range b.sets {
			if err := b.rt.removeAll(context.WithoutCancel(ctx), b.allRefs(s)); err != nil {
				log.Printf("cleanup: %v", err)
			}
		}
	}()

	fmt.Fprintf(b.out, "# prefetchbench %s\n\n", time.Now().UTC().Format(time.RFC3339))
	fmt.Fprintf(b.out, "runtime: %s %s on %s; registry %s; %d rounds; shaping: +%s each way (round trip +%s), %d Mbit/s\n\n",
		client.RuntimeName, client.RuntimeVersion, env.CRISocket, env.Registry, o.rounds, o.delay, 2*o.delay, o.mbit)
	if b.want("experiment") {
		if err := b.concurrentPull(ctx); err != nil {
			return err
		}
	}
	if b.want("pulls") {
		if err := b.pulls(ctx); err != nil {
			return err
		}
	}
	if b.want("stall") {
		if err := b.stalls(ctx); err != nil {
			return err
		}
	}
	if b.want("midstall") {
		if err := b.midStall(ctx); err != nil {
			return err
		}
	}
	if b.want("big") {
		if err := b.bigImage(ctx); err != nil {
			return err
		}
	}
	if b.want("artifact") {
		if err := b.artifact(ctx); err != nil {
			return err
		}
	}
	if b.want("resources") {
		if err := b.resources(ctx); err != nil {
			return err
		}
	}
	return nil
}

// allRefs is every name the set's images may have on the node.
func (b *bench) allRefs(s imageset.Set) []string {
	var out []string
	for _, h := range b.hosts {
		out = append(out, s.Refs(h)...)
	}
	return out
}

// agent runs the agent's fetch command in this process, as the binary would
// (same flag parsing, CRI dial, engine), with extra flags; it returns the
// wall time and fails when the pass did not make every image present.
func (b *bench) agent(ctx context.Context, refs []string, extra ...string) (time.Duration, error) {
	took, _, err := b.agentRun(ctx, refs, append([]string{"--log-level", "warn"}, extra...)...)
	return took, err
}

// agentRun is agent that also returns the agent's log.
func (b *bench) agentRun(ctx context.Context, refs []string, extra ...string) (time.Duration, string, error) {
	list := filepath.Join(b.dir, "images.txt")
	if err := os.WriteFile(list, []byte(strings.Join(refs, "\n")+"\n"), 0o644); err != nil {
		return 0, "", err
	}
	args := append([]string{"fetch", "--label=false", "--cri-socket", b.env.CRIEndpoint, "--image-list-file", list}, extra...)
	var stderr syncBuilder
	begin := time.Now()
	code := app.Main(args, io.Discard, &stderr)
	took := time.Since(begin)
	if code != app.ExitOK {
		return took, stderr.String(), fmt.Errorf("agent %s: exit %d: %s", strings.Join(extra, " "), code, lastLines(stderr.String(), 5))
	}
	return took, stderr.String(), ctx.Err()
}

// syncBuilder is the agent's log: its pulls write to it from goroutines.
type syncBuilder struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuilder) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuilder) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func mib(n int) string { return strconv.FormatFloat(float64(n)/imageset.MiB, 'f', 0, 64) + " MiB" }
