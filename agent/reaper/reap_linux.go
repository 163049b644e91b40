package reaper

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
)

// Reap collects orphaned children on every SIGCHLD until ctx ends. Run it when
// this process is PID 1 of its PID namespace (or a child subreaper), where the
// kernel reparents orphans to it; elsewhere their init reaps them.
func Reap(ctx context.Context) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGCHLD)
	defer signal.Stop(sig)
	for ctx.Err() == nil {
		// Errors are not fatal: the next SIGCHLD tries again, and a zombie
		// costs a PID, not correctness.
		_, _ = Orphans()
		select {
		case <-ctx.Done():
		case <-sig:
		case <-kick:
		}
	}
}

// Orphans waits for every exited child of this process that Start did not
// start, and returns their PIDs.
func Orphans() ([]int, error) {
	forking.Lock()
	defer forking.Unlock()
	self := os.Getpid()
	d, err := os.Open("/proc")
	if err != nil {
		return nil, fmt.Errorf("reap: %w", err)
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return nil, fmt.Errorf("reap: list /proc: %w", err)
	}
	var reaped []int
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil || pid == self {
			continue
		}
		ppid, ok := parent(pid)
		if !ok || ppid != self || registered(pid) {
			continue
		}
		var ws syscall.WaitStatus
		// WNOHANG: a child still running is left for a later SIGCHLD.
		got, err := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		if err == nil && got == pid {
			reaped = append(reaped, pid)
		} else if err != nil && !errors.Is(err, syscall.ECHILD) {
			return reaped, fmt.Errorf("reap: wait for %d: %w", pid, err)
		}
	}
	return reaped, nil
}

// parent reads the parent PID from /proc/<pid>/stat. The command name, field
// 2, is in parentheses and may itself hold spaces and parentheses, so the
// fields are counted from the last ')'.
func parent(pid int) (int, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false // gone, or not a process
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	fields := bytes.Fields(b[i+1:]) // state, ppid, ...
	if len(fields) < 2 {
		return 0, false
	}
	ppid, err := strconv.Atoi(string(fields[1]))
	return ppid, err == nil
}
