package main

import (
	"context"
	"fmt"
	"log"
	"strings"
	"sync"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/bench/imageset"
	"github.com/nodeprefetch/image-prefetcher/bench/shaper"
)

// store reaches containerd's own API on the CRI socket: the leftovers of a
// case (partial blobs, the agent's leases) are measured and cleared before
// the next, so that no case resumes from another's bytes. On other runtimes
// it is nil and nothing is cleared (CRI-O keeps no partial blobs).
type store struct {
	conn    *grpc.ClientConn
	content contentapi.ContentClient
	leases  leasesapi.LeasesClient
}

func dialStore(path string) (*store, error) {
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("containerd API on %s: %w", path, err)
	}
	return &store{conn: conn, content: contentapi.NewContentClient(conn), leases: leasesapi.NewLeasesClient(conn)}, nil
}

func (s *store) ctx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, pin.NamespaceHeader, pin.Namespace)
}

// leftovers returns the bytes of the partial blobs in the content store and
// the agent's leases.
func (s *store) leftovers(ctx context.Context) (partial int64, leases int, err error) {
	if s == nil {
		return 0, 0, nil
	}
	st, err := s.content.ListStatuses(s.ctx(ctx), &contentapi.ListStatusesRequest{})
	if err != nil {
		return 0, 0, fmt.Errorf("list ingests: %w", err)
	}
	for _, x := range st.GetStatuses() {
		partial += x.GetOffset()
	}
	ls, err := s.leases.List(s.ctx(ctx), &leasesapi.ListRequest{})
	if err != nil {
		return 0, 0, fmt.Errorf("list leases: %w", err)
	}
	for _, l := range ls.GetLeases() {
		if strings.HasPrefix(l.GetID(), progress.LeasePrefix) {
			leases++
		}
	}
	return partial, leases, nil
}

// clear deletes the agent's leases and aborts every partial blob.
func (s *store) clear(ctx context.Context) error {
	if s == nil {
		return nil
	}
	ls, err := s.leases.List(s.ctx(ctx), &leasesapi.ListRequest{})
	if err != nil {
		return fmt.Errorf("list leases: %w", err)
	}
	for _, l := range ls.GetLeases() {
		if strings.HasPrefix(l.GetID(), progress.LeasePrefix) {
			if _, err := s.leases.Delete(s.ctx(ctx), &leasesapi.DeleteRequest{ID: l.GetID(), Sync: true}); err != nil {
				return fmt.Errorf("delete lease %s: %w", l.GetID(), err)
			}
		}
	}
	st, err := s.content.ListStatuses(s.ctx(ctx), &contentapi.ListStatusesRequest{})
	if err != nil {
		return fmt.Errorf("list ingests: %w", err)
	}
	for _, x := range st.GetStatuses() {
		if _, err := s.content.Abort(s.ctx(ctx), &contentapi.AbortRequest{Ref: x.GetRef()}); err != nil {
			return fmt.Errorf("abort ingest %s: %w", x.GetRef(), err)
		}
	}
	return nil
}

// gapMeter polls the node's ingests while healthy pulls run and keeps the
// longest pause of a blob that had begun to arrive, and the longest wait of
// an opened blob for its first byte: what the no-progress window must stay
// clear of.
type gapMeter struct {
	s    *store
	stop chan struct{}
	done chan struct{}

	mu                 sync.Mutex
	maxPause, maxFirst time.Duration
}

func (s *store) meter() *gapMeter {
	g := &gapMeter{s: s, stop: make(chan struct{}), done: make(chan struct{})}
	if s == nil {
		close(g.done)
		return g
	}
	go g.run()
	return g
}

func (g *gapMeter) run() {
	defer close(g.done)
	type seen struct {
		off     int64
		opened  time.Time
		changed time.Time
	}
	refs := map[string]*seen{}
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-g.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := g.s.content.ListStatuses(g.s.ctx(ctx), &contentapi.ListStatusesRequest{})
		cancel()
		if err != nil {
			continue
		}
		now := time.Now()
		open := map[string]bool{}
		g.mu.Lock()
		for _, x := range st.GetStatuses() {
			open[x.GetRef()] = true
			r := refs[x.GetRef()]
			if r == nil {
				refs[x.GetRef()] = &seen{off: x.GetOffset(), opened: now, changed: now}
				continue
			}
			if x.GetOffset() != r.off {
				if r.off == 0 {
					g.maxFirst = max(g.maxFirst, now.Sub(r.opened))
				}
				r.off, r.changed = x.GetOffset(), now
				continue
			}
			if r.off > 0 {
				g.maxPause = max(g.maxPause, now.Sub(r.changed))
			} else {
				g.maxFirst = max(g.maxFirst, now.Sub(r.opened))
			}
		}
		g.mu.Unlock()
		for ref := range refs {
			if !open[ref] {
				delete(refs, ref)
			}
		}
	}
}

// end stops the meter and returns the longest pause of a started blob and
// the longest wait for a first byte.
func (g *gapMeter) end() (pause, first time.Duration) {
	select {
	case <-g.done:
	default:
		close(g.stop)
		<-g.done
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.maxPause, g.maxFirst
}

// caseResult is one agent run of a progress case.
type caseResult struct {
	name     string
	took     time.Duration
	err      error
	attempts int // attempt lines in the agent's log
	stalls   int // attempts ended for no progress
	proxy    shaper.Stats
	partial  int64 // bytes of partial blobs left in the content store afterwards
	leases   int   // the agent's leases left
}

// progressCase runs the agent on refs through proxy p from a cold store,
// after arm (which starts the fault), and measures what it left.
func (b *bench) progressCase(ctx context.Context, s imageset.Set, p *shaper.Proxy, name string, arm func(), extra ...string) caseResult {
	paths := make([]string, len(s.Images))
	for i, im := range s.Images {
		paths[i] = im.Path
	}
	if err := b.rt.removeByPath(ctx, paths); err != nil {
		return caseResult{name: name, err: err}
	}
	if err := b.store.clear(ctx); err != nil {
		return caseResult{name: name, err: err}
	}
	p.ResetStats()
	if arm != nil {
		arm()
	}
	took, out, err := b.agentRun(ctx, s.Refs(p.Addr()), append([]string{"--log-level", "info"}, extra...)...)
	r := caseResult{name: name, took: took, err: err, proxy: p.Stats(),
		attempts: strings.Count(out, `msg="pull attempt `), stalls: strings.Count(out, `msg="pull made no progress`)}
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, `msg="pull attempt `) || strings.Contains(line, `msg="pull made no progress`) {
			log.Printf("  %s", line)
		}
	}
	p.HoldAfter(0)
	p.StallFor(0) // drop what is still held
	if r.partial, r.leases, err = b.store.leftovers(ctx); err != nil && r.err == nil {
		r.err = err
	}
	log.Printf("%s: %s in %.2fs, %d attempts, %d stalls, %.1f MiB through the proxy, %d held mid-transfer; left: %.1f MiB partial, %d leases (err %v)",
		s.Name, name, took.Seconds(), r.attempts, r.stalls, float64(r.proxy.BytesDown)/imageset.MiB, r.proxy.Held,
		float64(r.partial)/imageset.MiB, r.leases, r.err)
	return r
}

// row is the case's table row; size is what the image is (the bytes one
// cold pull fetches), base the raw pull's time (0: no ratio).
func (r caseResult) row(size int64, base time.Duration) string {
	done := fmt.Sprintf("%.2f", r.took.Seconds())
	if r.err != nil {
		done = fmt.Sprintf("not done after %.1f (%s)", r.took.Seconds(), firstLine(r.err.Error()))
	}
	ratio := "-"
	if base > 0 && r.err == nil {
		ratio = fmt.Sprintf("%.2f", r.took.Seconds()/base.Seconds())
	}
	twice := float64(r.proxy.BytesDown-size) / imageset.MiB
	return fmt.Sprintf("| %s | %s | %s | %d | %d | %.1f | %+.1f | %.1f |", r.name, done, ratio, r.attempts, r.stalls,
		float64(r.proxy.BytesDown)/imageset.MiB, twice, float64(r.partial)/imageset.MiB)
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 80 {
		s = s[:80] + "..."
	}
	return s
}

const caseHeader = "| agent | time to done s | ratio | attempts | stalled attempts | MiB through the proxy | MiB beyond the image | partial MiB left |\n|---|---|---|---|---|---|---|---|"

// midStall: the proxy forwards the first o.holdAfter bytes of one
// connection and holds it; today's behaviour (progress off) against the
// default flags and other windows, same run.
func (b *bench) midStall(ctx context.Context) error {
	s := imageset.Large()
	s.Images = s.Images[:1]
	s.Name, s.About = "b1-60MiB", "one image of set (b): 4 layers of 15 MiB"
	arm := func() { b.plain.HoldAfter(b.o.holdAfter) }
	cases := []struct {
		name  string
		extra []string
	}{
		{"today's behaviour: --pull-progress-timeout=0", []string{"--pull-progress-timeout=0"}},
		{"default flags (--pull-progress-timeout=20s)", nil},
	}
	for _, w := range b.o.windows {
		cases = append(cases, struct {
			name  string
			extra []string
		}{fmt.Sprintf("--pull-progress-timeout=%s", w), []string{fmt.Sprintf("--pull-progress-timeout=%s", w)}})
	}
	fmt.Fprintf(b.out, "## Stall in the middle of a layer\n\n%s (%s, %s) through the proxy: the first connection whose answers pass %s gets them and then nothing, held open; new connections work. Time to done, attempts, and what crossed the proxy (beyond the image: fetched twice).\n\n",
		s.Name, s.About, mib(s.Bytes()), mib(int(b.o.holdAfter)))
	fmt.Fprintln(b.out, caseHeader)
	for _, c := range cases {
		r := b.progressCase(ctx, s, b.plain, c.name, arm, c.extra...)
		fmt.Fprintln(b.out, r.row(int64(s.Bytes()), 0))
	}
	fmt.Fprintln(b.out)
	return b.rt.removeAll(ctx, b.allRefs(s))
}

// bigImage: one big image through a slow shaped link, with
// --max-pull-attempt-timeout well below its transfer time; the raw CRI pull
// of the same run is the transfer time.
func (b *bench) bigImage(ctx context.Context) error {
	s := imageset.Big()
	if _, err := imageset.Push(b.env.Registry, s); err != nil {
		return err
	}
	p, err := shaper.Listen("127.0.0.1:0", shaper.Config{Upstream: b.env.Registry, Delay: b.o.delay, BitsPerSecond: b.o.bigMbit * 1_000_000})
	if err != nil {
		return err
	}
	defer p.Close()
	b.hosts = append(b.hosts, p.Addr())
	if err := b.rt.removeAll(ctx, b.allRefs(s)); err != nil {
		return err
	}
	if err := b.store.clear(ctx); err != nil {
		return err
	}
	p.ResetStats()
	gaps := b.store.meter()
	begin := time.Now()
	err = b.rt.parallel(ctx, s.Refs(p.Addr()))
	raw := time.Since(begin)
	pause, first := gaps.end()
	rawStats := p.Stats()
	if err != nil {
		return fmt.Errorf("raw CRI pull of %s: %w", s.Name, err)
	}
	log.Printf("%s: raw CRI pull %.2fs, %.1f MiB through the proxy", s.Name, raw.Seconds(), float64(rawStats.BytesDown)/imageset.MiB)
	capFlag := "--max-pull-attempt-timeout=" + b.o.bigCap.String()
	// Both agent runs get the same bound: enough for the image to arrive
	// twice over.
	overall := fmt.Sprintf("--overall-timeout=%s", (2*raw + 30*time.Second).Round(time.Second))
	withProgress := b.progressCase(ctx, s, p, "default flags, "+capFlag, nil, capFlag, overall)
	today := b.progressCase(ctx, s, p, "today's behaviour: --pull-progress-timeout=0, "+capFlag, nil, "--pull-progress-timeout=0", capFlag, overall)

	fmt.Fprintf(b.out, "## Big image on a slow link\n\n%s (%s, %s) through the shaping proxy at %d Mbit/s (+%s each way); ratio = agent / raw CRI PullImage of the same run (%.2f s, %.1f MiB through the proxy); both agent runs with %s.\n\n",
		s.Name, s.About, mib(s.Bytes()), b.o.bigMbit, b.o.delay, raw.Seconds(), float64(rawStats.BytesDown)/imageset.MiB, overall)
	fmt.Fprintln(b.out, caseHeader)
	fmt.Fprintln(b.out, withProgress.row(int64(s.Bytes()), raw))
	fmt.Fprintln(b.out, today.row(int64(s.Bytes()), raw))
	fmt.Fprintf(b.out, "\nHealthy pauses during the raw CRI pull (the node's ingests polled every 200 ms): longest pause of a blob that had begun to arrive %.1f s; longest wait of an opened blob for its first byte %.1f s (queued for a download slot).\n\n",
		pause.Seconds(), first.Seconds())
	return b.rt.removeAll(ctx, b.allRefs(s))
}
