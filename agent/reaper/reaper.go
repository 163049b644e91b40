// Package reaper lets the agent run as PID 1 without an init: it collects the
// orphans the kernel hands to PID 1 (a credential plugin's children that
// outlive it) so they do not stay zombies, and never takes the exit status of a
// child that os/exec waits for.
//
// Race-free by construction: children started through Start are registered
// under a read lock held from before fork until their PID is recorded, and a
// reaping scan holds the write lock, so it never sees a child of ours that is
// not yet registered. A scan waits only for PIDs that are our children (their
// parent in /proc is this process) and not registered; os/exec keeps its own.
package reaper

import (
	"os/exec"
	"sync"
)

var (
	// forking is held for reading from before a Start forks until its PID is
	// registered, and for writing by a scan.
	forking sync.RWMutex
	// mu guards own, which concurrent Starts (read lock only) all write.
	mu sync.Mutex
	// own counts the registered children by PID (a count: a PID may be reused
	// by a new child before the old one's release).
	own = map[int]int{}
	// kick asks the reaper for a scan outside SIGCHLD: a released PID may
	// belong to an orphan the last scan skipped.
	kick = make(chan struct{}, 1)
)

// Start starts cmd as a child the reaper leaves to cmd.Wait. Call release once
// cmd.Wait has returned.
func Start(cmd *exec.Cmd) (release func(), err error) {
	forking.RLock()
	defer forking.RUnlock()
	if err := cmd.Start(); err != nil {
		return func() {}, err
	}
	pid := cmd.Process.Pid
	mu.Lock()
	own[pid]++
	mu.Unlock()
	return func() {
		mu.Lock()
		if own[pid]--; own[pid] <= 0 {
			delete(own, pid)
		}
		mu.Unlock()
		select {
		case kick <- struct{}{}:
		default:
		}
	}, nil
}

// Run is cmd.Run for a child the reaper leaves alone.
func Run(cmd *exec.Cmd) error {
	release, err := Start(cmd)
	if err != nil {
		return err
	}
	defer release()
	return cmd.Wait()
}

func registered(pid int) bool {
	mu.Lock()
	defer mu.Unlock()
	return own[pid] > 0
}
