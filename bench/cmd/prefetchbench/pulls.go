package main

import (
	"context"
	"fmt"
	"log"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	"github.com/nodeprefetch/image-prefetcher/bench/imageset"
)

// variant is one way of making a set present.
type variant struct {
	name string
	run  func(ctx context.Context, refs []string) (time.Duration, error)
}

func (b *bench) variants() []variant {
	timed := func(f func(context.Context, []string) error) func(context.Context, []string) (time.Duration, error) {
		return func(ctx context.Context, refs []string) (time.Duration, error) {
			begin := time.Now()
			err := f(ctx, refs)
			return time.Since(begin), err
		}
	}
	vs := []variant{
		{"raw parallel CRI", timed(b.rt.parallel)},
		{"sequential CRI", timed(b.rt.sequential)},
	}
	for _, p := range []int{1, 2, 4, 8, 0} {
		name := "agent p=" + strconv.Itoa(p)
		if p == 0 {
			name = "agent p=unbounded"
		}
		if p == pull.DefaultMaxParallel {
			name += " (default)"
		}
		vs = append(vs, variant{name, func(ctx context.Context, refs []string) (time.Duration, error) {
			return b.agent(ctx, refs, "--max-parallel-pulls", strconv.Itoa(p))
		}})
	}
	// What following pull progress costs a healthy pass.
	vs = append(vs, variant{"agent p=4, --pull-progress-timeout=0 (progress off)", func(ctx context.Context, refs []string) (time.Duration, error) {
		return b.agent(ctx, refs, "--pull-progress-timeout=0")
	}})
	return vs
}

// network is the registry name a case pulls through.
type network struct {
	name string
	host string
}

// pulls runs every variant on every set and network for the rounds, then
// the warm pass, and prints the table.
func (b *bench) pulls(ctx context.Context) error {
	nets := []network{
		{"loopback", b.env.Registry},
		{fmt.Sprintf("shaped %s+%s, %d Mbit/s", b.o.delay, b.o.delay, b.o.mbit), b.shaped.Addr()},
	}
	sets := b.sets[:2]
	vs := b.variants()
	// times[set][net][variant][round]
	times := make([][][][]time.Duration, len(sets))
	down := make([][][]int64, len(sets)) // bytes through the proxy, per variant (last round)
	for si := range sets {
		times[si] = make([][][]time.Duration, len(nets))
		down[si] = make([][]int64, len(nets))
		for ni := range nets {
			times[si][ni] = make([][]time.Duration, len(vs))
			down[si][ni] = make([]int64, len(vs))
		}
	}
	var warm []time.Duration
	var warmReqs, warmConns []int64
	for r := range b.o.rounds {
		for si, s := range sets {
			for ni, n := range nets {
				refs := s.Refs(n.host)
				for k := range vs {
					vi := (k + r) % len(vs) // the order rotates every round
					if err := b.rt.removeAll(ctx, b.allRefs(s)); err != nil {
						return err
					}
					b.shaped.ResetStats()
					took, err := vs[vi].run(ctx, refs)
					if ni == 1 {
						down[si][ni][vi] = b.shaped.Stats().BytesDown
					}
					if err != nil {
						return fmt.Errorf("round %d, %s, %s, %s: %w", r+1, s.Name, n.name, vs[vi].name, err)
					}
					times[si][ni][vi] = append(times[si][ni][vi], took)
					log.Printf("round %d %-12s %-28s %-26s %6.2fs", r+1, s.Name, n.name, vs[vi].name, took.Seconds())
				}
				if si == 0 && ni == 1 {
					// Warm pass: every image is present (the last variant
					// pulled them through the shaping proxy).
					b.shaped.ResetStats()
					took, err := b.agent(ctx, refs)
					if err != nil {
						return fmt.Errorf("round %d warm pass: %w", r+1, err)
					}
					st := b.shaped.Stats()
					warm = append(warm, took)
					warmReqs = append(warmReqs, st.Requests)
					warmConns = append(warmConns, st.Conns)
					log.Printf("round %d warm pass %.3fs, %d requests, %d connections at the proxy", r+1, took.Seconds(), st.Requests, st.Conns)
				}
			}
		}
	}

	w := b.out
	fmt.Fprintf(w, "## Cold pulls\n\nmedian of %d rounds (min-max); ratio = variant / raw parallel CRI of the same round (median, then every round)\n\n", b.o.rounds)
	for si, s := range sets {
		for ni, n := range nets {
			fmt.Fprintf(w, "### %s (%s, %s) via %s\n\n", s.Name, s.About, mib(s.Bytes()), n.name)
			fmt.Fprintln(w, "| variant | median s | min-max s | MiB/s | MiB from registry | ratio median | ratios per round |")
			fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
			raw := times[si][ni][0]
			for vi, v := range vs {
				ts := times[si][ni][vi]
				ratios := make([]float64, len(ts))
				for i := range ts {
					ratios[i] = ts[i].Seconds() / raw[i].Seconds()
				}
				med := median(ts)
				fromRegistry := "-"
				if ni == 1 {
					fromRegistry = strconv.FormatFloat(float64(down[si][ni][vi])/imageset.MiB, 'f', 1, 64)
				}
				fmt.Fprintf(w, "| %s | %.2f | %.2f-%.2f | %.0f | %s | %.2f | %s |\n", v.name, med.Seconds(),
					slices.Min(ts).Seconds(), slices.Max(ts).Seconds(), float64(s.Bytes())/imageset.MiB/med.Seconds(),
					fromRegistry, medianF(ratios), joinF(ratios))
			}
			fmt.Fprintln(w)
		}
	}
	fmt.Fprintf(w, "## Warm pass\n\nset %s through the shaping proxy, every image present, default flags: median %.3f s (%s); requests at the proxy per round: %v; connections: %v\n\n",
		sets[0].Name, median(warm).Seconds(), joinD(warm), warmReqs, warmConns)
	return nil
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func medianF(fs []float64) float64 {
	s := slices.Clone(fs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func joinF(fs []float64) string {
	parts := make([]string, len(fs))
	for i, f := range fs {
		parts[i] = strconv.FormatFloat(f, 'f', 2, 64)
	}
	return strings.Join(parts, " ")
}

func joinD(ds []time.Duration) string {
	parts := make([]string, len(ds))
	for i, d := range ds {
		parts[i] = strconv.FormatFloat(d.Seconds(), 'f', 3, 64)
	}
	return strings.Join(parts, " ")
}
