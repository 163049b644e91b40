//go:build linux

package reaper

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

// TestMain makes the test process a child subreaper: orphans of its children's
// children come to it, as they come to PID 1 in the agent's container.
func TestMain(m *testing.M) {
	const prSetChildSubreaper = 36
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
		fmt.Fprintln(os.Stderr, "prctl(PR_SET_CHILD_SUBREAPER):", errno)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// orphan starts a shell that leaves a background sleep behind and exits, so the
// sleep is reparented to this process; it returns the sleep's PID.
func orphan(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("sh", "-c", "sleep 300 </dev/null >/dev/null 2>&1 & echo $!")
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := Run(cmd); err != nil {
		t.Fatalf("start an orphan: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(out.String()))
	if err != nil {
		t.Fatalf("orphan pid %q: %v", out.String(), err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	// The shell has been waited for, so its child already has its new parent.
	if ppid, ok := parent(pid); !ok || ppid != os.Getpid() {
		t.Fatalf("orphan %d has parent %d (found: %v), want this process %d", pid, ppid, ok, os.Getpid())
	}
	return pid
}

// state is the process state letter of pid ('Z' for a zombie), 0 when gone.
func state(pid int) byte {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	f := bytes.Fields(b[bytes.LastIndexByte(b, ')')+1:])
	if len(f) == 0 {
		return 0
	}
	return f[0][0]
}

// poll waits until cond holds; the deadline only bounds a broken run.
func poll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	err := wait.PollUntilContextTimeout(t.Context(), 5*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		return cond(), nil
	})
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// reap runs Reap until the test ends, and waits for it to stop: a reaper left
// over from one test must not reap another test's children.
func reap(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Reap(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

func TestReapsAnOrphanOnSIGCHLD(t *testing.T) {
	reap(t)
	pid := orphan(t)
	if s := state(pid); s == 'Z' || s == 0 {
		t.Fatalf("orphan %d already exited (state %q)", pid, s)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Without a reaper the orphan stays a zombie of this process forever.
	poll(t, fmt.Sprintf("orphan %d is still a child of this process (a zombie)", pid), func() bool {
		ppid, ok := parent(pid)
		return !ok || ppid != os.Getpid()
	})
}

func TestLeavesItsOwnChildrenToWait(t *testing.T) {
	stray := orphan(t)
	if err := syscall.Kill(stray, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", "exit 7")
	release, err := Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	own := cmd.Process.Pid
	poll(t, "both children exit", func() bool { return state(own) == 'Z' && state(stray) == 'Z' })

	reaped, err := Orphans()
	if err != nil {
		t.Fatal(err)
	}
	if len(reaped) != 1 || reaped[0] != stray {
		t.Errorf("reaped %v, want only the orphan %d (the started child is %d)", reaped, stray, own)
	}
	var exit *exec.ExitError
	if err := cmd.Wait(); !errors.As(err, &exit) || exit.ExitCode() != 7 {
		t.Errorf("Wait of the started child: %v, want exit status 7", err)
	}
}

// Many children started and finishing while orphans keep SIGCHLD coming: every
// Run gets its own child's status (a scan between fork and registration would
// take some of them: "no child processes").
func TestConcurrentRunsKeepTheirStatus(t *testing.T) {
	reap(t)
	var wg sync.WaitGroup
	errs := make(chan error, 400)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 25 {
				code := (g*25+i)%100 + 1
				// Each run also leaves an orphan that exits at once.
				cmd := exec.Command("sh", "-c", fmt.Sprintf("true & exit %d", code))
				var exit *exec.ExitError
				if err := Run(cmd); !errors.As(err, &exit) || exit.ExitCode() != code {
					errs <- fmt.Errorf("run %d: %v, want exit status %d", g*25+i, err, code)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// And the orphans were all collected.
	poll(t, "no zombie children left", func() bool {
		return len(zombieChildren(t)) == 0
	})
}

func zombieChildren(t *testing.T) []int {
	t.Helper()
	names, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var z []int
	for _, n := range names {
		pid, err := strconv.Atoi(n.Name())
		if err != nil {
			continue
		}
		if ppid, ok := parent(pid); ok && ppid == os.Getpid() && state(pid) == 'Z' {
			z = append(z, pid)
		}
	}
	return z
}
