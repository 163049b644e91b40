//go:build unix

package credentials

import (
	"os/exec"
	"syscall"
)

// killProcessGroup starts the plugin in its own process group and kills the
// whole group on timeout, so a shell-script plugin's children die with it.
func killProcessGroup(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
}
