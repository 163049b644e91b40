package main

import (
	"context"
	"fmt"
	"log"
	"strings"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	"github.com/nodeprefetch/image-prefetcher/bench/imageset"
	"github.com/nodeprefetch/image-prefetcher/bench/shaper"
)

// artifact: a model shipped as an OCI artifact (set (e), as image volumes
// mount model weights), pushed by the benchmark, through a shaped link with
// --max-pull-attempt-timeout shorter than the transfer, so attempts are cut
// while bytes flow and each next one must resume. The baseline is a raw CRI
// PullImage of the same artifact through the same proxy in the same run.
// A runtime that refuses artifacts (containerd 1.x) fails the raw pull; the
// agent then runs once to show how it classifies the failure.
func (b *bench) artifact(ctx context.Context) error {
	s := imageset.Model(b.o.artifactMiB * imageset.MiB)
	begin := time.Now()
	n, err := imageset.Push(b.env.Registry, s)
	if err != nil {
		return err
	}
	size, err := imageset.Size(b.env.Registry, s.Images[0])
	if err != nil {
		return err
	}
	log.Printf("set %s: %d bytes, %d pushed now (%s)", s.Name, size, n, time.Since(begin).Round(time.Millisecond))
	p, err := shaper.Listen("127.0.0.1:0", shaper.Config{Upstream: b.env.Registry, Delay: b.o.delay, BitsPerSecond: b.o.artifactMbit * 1_000_000})
	if err != nil {
		return err
	}
	defer p.Close()
	b.hosts = append(b.hosts, p.Addr())
	b.sets = append(b.sets, s) // removed again at the end of the run, whatever happens here
	if err := b.rt.removeAll(ctx, b.allRefs(s)); err != nil {
		return err
	}
	if err := b.store.clear(ctx); err != nil {
		return err
	}

	p.ResetStats()
	begin = time.Now()
	rawErr := b.rt.pull(ctx, s.Refs(p.Addr())[0])
	raw := time.Since(begin)
	rawStats := p.Stats()
	log.Printf("%s: raw CRI pull %.2fs, %.1f MiB through the proxy (err %v)", s.Name, raw.Seconds(), float64(rawStats.BytesDown)/imageset.MiB, rawErr)

	fmt.Fprintf(b.out, "## OCI artifact on a slow link\n\n%s (%s; %d bytes as stored, %.1f MiB) through the shaping proxy at %d Mbit/s (+%s each way). ",
		s.Name, s.About, size, float64(size)/imageset.MiB, b.o.artifactMbit, b.o.delay)
	// The agent refuses a cap below the first attempt's timeout: a cap
	// shorter than the default first timeout is that too.
	capFlags := []string{"--max-pull-attempt-timeout=" + b.o.artifactCap.String()}
	if b.o.artifactCap < pull.DefaultConfig().InitialAttemptTimeout {
		capFlags = append(capFlags, "--initial-pull-attempt-timeout="+b.o.artifactCap.String())
	}
	capFlag := strings.Join(capFlags, " ")
	if rawErr != nil {
		r := b.progressCase(ctx, s, p, "default flags", nil, "--overall-timeout=2m")
		fmt.Fprintf(b.out, "The raw CRI PullImage failed after %.2f s: %s\n\n", raw.Seconds(), firstLine(rawErr.Error()))
		fmt.Fprintln(b.out, caseHeader)
		fmt.Fprintln(b.out, r.row(size, 0))
		if r.err != nil {
			fmt.Fprintf(b.out, "\nThe agent: %s\n", lastLines(r.err.Error(), 1))
		}
		fmt.Fprintln(b.out)
		return b.rt.removeAll(ctx, b.allRefs(s))
	}
	// Every agent run gets the same bound: enough for the artifact to arrive
	// twice over.
	overall := fmt.Sprintf("--overall-timeout=%s", (2*raw + 30*time.Second).Round(time.Second))
	results := []caseResult{b.progressCase(ctx, s, p, "default flags, "+capFlag, nil, append(capFlags, overall)...)}
	if b.o.artifactOff {
		results = append(results, b.progressCase(ctx, s, p, "today's behaviour: --pull-progress-timeout=0, "+capFlag, nil,
			append([]string{"--pull-progress-timeout=0", overall}, capFlags...)...))
	}
	fmt.Fprintf(b.out, "Ratio = agent / raw CRI PullImage of the same artifact through the same proxy in this run (%.2f s, %.1f MiB through the proxy); agent runs with %s. Beyond the image = bytes the proxy served past the artifact's size (fetched twice).\n\n",
		raw.Seconds(), float64(rawStats.BytesDown)/imageset.MiB, overall)
	fmt.Fprintln(b.out, caseHeader)
	for _, r := range results {
		fmt.Fprintln(b.out, r.row(size, raw))
	}
	fmt.Fprintln(b.out)
	// A reused runtime keeps no partial gigabyte of this case.
	if err := b.store.clear(ctx); err != nil {
		return err
	}
	return b.rt.removeAll(ctx, b.allRefs(s))
}
