package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/nodeprefetch/image-prefetcher/bench/imageset"
)

// concurrentPull answers the question hedging depends on: while one
// PullImage of a reference hangs on a registry connection that never
// answers, does a second PullImage of the same reference (which makes its
// own connection) complete, or do containerd's locks make it wait?
func (b *bench) concurrentPull(ctx context.Context) error {
	s := imageset.Large()
	ref := s.Refs(b.plain.Addr())[0]
	if err := b.rt.removeAll(ctx, b.allRefs(s)); err != nil {
		return err
	}
	const window = 3 * time.Second
	b.plain.ResetStats()
	b.plain.StallFor(window)
	firstCtx, cancelFirst := context.WithCancel(ctx)
	defer cancelFirst()
	first := make(chan error, 1)
	go func() { first <- b.rt.pull(firstCtx, ref) }()
	time.Sleep(window + 500*time.Millisecond)
	secondCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	begin := time.Now()
	err := b.rt.pull(secondCtx, ref)
	took := time.Since(begin)
	firstState := "still hung"
	select {
	case e := <-first:
		firstState = fmt.Sprintf("ended: %v", e)
	default:
	}
	cancelFirst()
	fe := <-first
	st := b.plain.Stats()
	fmt.Fprintf(b.out, "## containerd: a second PullImage while the first hangs\n\n")
	fmt.Fprintf(b.out, "%s (%s): the first PullImage's connection is held by the proxy; a second PullImage of the same ref started %s later ", ref, mib(imageset.Large().Bytes()/4), window+500*time.Millisecond)
	if err != nil {
		fmt.Fprintf(b.out, "FAILED after %.2f s: %v. ", took.Seconds(), err)
	} else {
		fmt.Fprintf(b.out, "completed in %.2f s. ", took.Seconds())
	}
	fmt.Fprintf(b.out, "The first was %s when the second ended; cancelled, it returned %v. Proxy: %d held, %d forwarded connections, %d requests.\n\n", firstState, errors.Unwrap(fe), st.Stalled, st.Conns, st.Requests)
	log.Printf("experiment: second pull %v in %s; first %s", err, took.Round(time.Millisecond), firstState)
	return b.rt.removeAll(ctx, b.allRefs(s))
}

// stalls times a pass against a registry that accepts connections and never
// answers those made in its first o.stall, with the default flags (hedging
// on), and for comparison without hedging.
func (b *bench) stalls(ctx context.Context) error {
	s := b.sets[0]
	refs := s.Refs(b.plain.Addr())
	cases := []struct {
		name  string
		extra []string
	}{{"default flags", nil}}
	if b.o.stallNoHedge {
		cases = append(cases, struct {
			name  string
			extra []string
		}{"default flags but --hedge-after=0 (no hedging)", []string{"--hedge-after=0"}})
	}
	fmt.Fprintf(b.out, "## Stalled registry\n\nset %s through the proxy; every connection made in the first %s after the stall begins is accepted and never answered\n\n", s.Name, b.o.stall)
	fmt.Fprintln(b.out, "| agent | time to done s | held connections | forwarded connections |")
	fmt.Fprintln(b.out, "|---|---|---|---|")
	for _, c := range cases {
		if err := b.rt.removeAll(ctx, b.allRefs(s)); err != nil {
			return err
		}
		b.plain.ResetStats()
		b.plain.StallFor(b.o.stall)
		took, err := b.agent(ctx, refs, c.extra...)
		st := b.plain.Stats()
		if err != nil {
			fmt.Fprintf(b.out, "| %s | FAILED after %.1f: %v | %d | %d |\n", c.name, took.Seconds(), err, st.Stalled, st.Conns)
			continue
		}
		log.Printf("stall %s: %.2fs (%d held, %d forwarded)", c.name, took.Seconds(), st.Stalled, st.Conns)
		fmt.Fprintf(b.out, "| %s | %.2f | %d | %d |\n", c.name, took.Seconds(), st.Stalled, st.Conns)
	}
	fmt.Fprintln(b.out)
	b.plain.StallFor(0) // drop the held connections
	return nil
}
