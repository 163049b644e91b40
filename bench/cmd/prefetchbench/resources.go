package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nodeprefetch/image-prefetcher/bench/imageset"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times (100 on Linux).
const clockTicks = 100

// resources runs the agent binary as a subprocess: cold fetches of the
// 100-image set (peak RSS from VmHWM, CPU from rusage), with the default flags
// and with progress following off, interleaved for -rounds rounds (the order
// alternates), then `run` with a short present list, sampled while it idles
// between re-checks. Following progress is judged by its ratio to progress
// off in the same round: the machine's load moves both.
func (b *bench) resources(ctx context.Context) error {
	bin, err := filepath.Abs(b.o.agentBin)
	if err != nil {
		return err
	}
	s := b.sets[2]
	refs := s.Refs(b.env.Registry)
	list := filepath.Join(b.dir, "many.txt")
	if err := os.WriteFile(list, []byte(strings.Join(refs, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	variants := []struct {
		name  string
		extra []string
	}{
		{"default flags (progress followed)", nil},
		{"`--pull-progress-timeout=0` (progress off)", []string{"--pull-progress-timeout=0"}},
	}
	got := make([][]fetchUsage, len(variants)) // [variant][round]
	for r := range b.o.rounds {
		for k := range variants {
			vi := (k + r) % len(variants)
			if err := b.rt.removeAll(ctx, b.allRefs(s)); err != nil {
				return err
			}
			u, err := b.fetchResources(ctx, bin, list, len(refs), variants[vi].extra)
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", r+1, variants[vi].name, err)
			}
			got[vi] = append(got[vi], u)
			log.Printf("resources: round %d %-45s wall %.2fs cpu %.2fs peak %.1f MiB", r+1, variants[vi].name,
				u.wall.Seconds(), u.cpu.Seconds(), float64(u.peakKiB)/1024)
		}
	}
	w := b.out
	fmt.Fprintf(w, "## Agent resources\n\n")
	fmt.Fprintf(w, "`fetch` of set %s (%s, cold, loopback) as a subprocess, %d rounds: median (min-max). CPU is user+system from rusage; "+
		"peak RSS is VmHWM polled every 20 ms until exit. Ratio = default flags / progress off of the same round (median, then every round).\n\n",
		s.Name, s.About, b.o.rounds)
	fmt.Fprintln(w, "| flags | wall s | CPU s | peak RSS MiB |")
	fmt.Fprintln(w, "|---|---|---|---|")
	for vi, v := range variants {
		us := got[vi]
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", v.name, spread(us, fetchUsage.wallS), spread(us, fetchUsage.cpuS), spread(us, fetchUsage.peakMiB))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| progress followed / off | ratio median | ratios per round |")
	fmt.Fprintln(w, "|---|---|---|")
	for _, m := range []struct {
		name string
		f    func(fetchUsage) float64
	}{{"wall", fetchUsage.wallS}, {"CPU", fetchUsage.cpuS}, {"peak RSS", fetchUsage.peakMiB}} {
		ratios := make([]float64, b.o.rounds)
		for r := range ratios {
			ratios[r] = m.f(got[0][r]) / m.f(got[1][r])
		}
		fmt.Fprintf(w, "| %s | %.2f | %s |\n", m.name, medianF(ratios), joinF(ratios))
	}
	fmt.Fprintln(w)
	return b.idleResources(ctx, bin, refs, s)
}

// fetchUsage is what one `fetch` used.
type fetchUsage struct {
	wall, cpu time.Duration
	peakKiB   int64
}

func (u fetchUsage) wallS() float64   { return u.wall.Seconds() }
func (u fetchUsage) cpuS() float64    { return u.cpu.Seconds() }
func (u fetchUsage) peakMiB() float64 { return float64(u.peakKiB) / 1024 }

// spread formats the median and range of f over us.
func spread(us []fetchUsage, f func(fetchUsage) float64) string {
	vs := make([]float64, len(us))
	for i, u := range us {
		vs[i] = f(u)
	}
	if len(vs) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f (%.2f-%.2f)", medianF(vs), slices.Min(vs), slices.Max(vs))
}

// fetchResources measures one cold `fetch` of the list as a subprocess.
func (b *bench) fetchResources(ctx context.Context, bin, list string, n int, extra []string) (fetchUsage, error) {
	args := append([]string{"fetch", "--label=false", "--cri-socket", b.env.CRIEndpoint, "--image-list-file", list, "--log-level", "warn"}, extra...)
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	begin := time.Now()
	if err := cmd.Start(); err != nil {
		return fetchUsage{}, fmt.Errorf("start %s: %w", bin, err)
	}
	hwm := watchHWM(cmd.Process.Pid)
	err := cmd.Wait()
	took := time.Since(begin)
	peak := hwm()
	if err != nil {
		return fetchUsage{}, fmt.Errorf("agent fetch of %d images: %w: %s", n, err, lastLines(stderr.String(), 5))
	}
	// rusage's maxrss is not used: for a child started by Go it counts the
	// parent's pages shared between clone(CLONE_VM|CLONE_VFORK) and exec.
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	return fetchUsage{wall: took, cpu: time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), peakKiB: peak}, nil
}

// idleResources samples `run` between re-checks.
func (b *bench) idleResources(ctx context.Context, bin string, refs []string, s imageset.Set) error {
	// Idle: `run` with 10 present images, default re-check interval, metrics
	// server on; sampled after its first pass.
	short := filepath.Join(b.dir, "short.txt")
	if err := os.WriteFile(short, []byte(strings.Join(refs[:10], "\n")+"\n"), 0o644); err != nil {
		return err
	}
	run := exec.CommandContext(ctx, bin, "run", "--label=false", "--cri-socket", b.env.CRIEndpoint, "--image-list-file", short, "--listen-address", "127.0.0.1:0")
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	run.Stderr = pw
	if err := run.Start(); err != nil {
		pw.Close()
		pr.Close()
		return fmt.Errorf("start %s run: %w", bin, err)
	}
	pw.Close()
	defer func() {
		run.Process.Signal(syscall.SIGTERM) //nolint:errcheck // it may have exited
		run.Wait()                          //nolint:errcheck // its exit status is not measured
	}()
	passDone := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		once := sync.Once{}
		for sc.Scan() {
			if strings.Contains(sc.Text(), "pass finished") {
				once.Do(func() { close(passDone) })
			}
		}
		pr.Close()
	}()
	select {
	case <-passDone:
	case <-time.After(60 * time.Second):
		return fmt.Errorf("agent run: no pass finished within a minute")
	}
	time.Sleep(time.Second)
	const window = 5 * time.Second
	t0, rss0, err := procCPU(run.Process.Pid)
	if err != nil {
		return err
	}
	time.Sleep(window)
	t1, rss1, err := procCPU(run.Process.Pid)
	if err != nil {
		return err
	}
	idle := float64(t1-t0) / clockTicks / window.Seconds() * 100
	anon, _ := statusField(run.Process.Pid, "RssAnon:")
	file, _ := statusField(run.Process.Pid, "RssFile:")
	heap, _ := statusField(run.Process.Pid, "VmHWM:")
	fmt.Fprintf(b.out, "| `run` idle between re-checks (10 present images, default 5m interval, metrics server on, %s sampled) | CPU %.2f %%; RSS %.1f then %.1f MiB (anonymous %.1f, file-backed %.1f; peak %.1f) |\n\n",
		window, idle, float64(rss0)/1024, float64(rss1)/1024, float64(anon)/1024, float64(file)/1024, float64(heap)/1024)
	log.Printf("resources: idle cpu %.2f%% rss %d KiB", idle, rss1)
	return b.rt.removeAll(ctx, b.allRefs(s))
}

// watchHWM polls /proc/<pid>/status VmHWM until the process is gone and
// returns a function giving the highest value seen, in KiB.
func watchHWM(pid int) func() int64 {
	var mu sync.Mutex
	var peak int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			v, ok := statusField(pid, "VmHWM:")
			if !ok {
				return // gone (a zombie has no Vm lines)
			}
			mu.Lock()
			peak = max(peak, v)
			mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return func() int64 {
		<-done
		mu.Lock()
		defer mu.Unlock()
		return peak
	}
}

func statusField(pid int, field string) (int64, bool) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, field); ok {
			v, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return v, err == nil
		}
	}
	return 0, false
}

// procCPU returns utime+stime in clock ticks and VmRSS in KiB.
func procCPU(pid int) (int64, int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// Fields after the command name (which may hold spaces) start at state.
	rest := string(data[bytes.LastIndexByte(data, ')')+2:])
	f := strings.Fields(rest)
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14 overall
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	rss, _ := statusField(pid, "VmRSS:")
	return ut + st, rss, nil
}
