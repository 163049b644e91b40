package clusterenv

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// recorder stands in for the test handed to Require and stops its goroutine on Skip/Fatal, as testing does.
type recorder struct {
	testing.TB
	skipped, failed string
}

func (r *recorder) Helper() {}
func (r *recorder) Skipf(format string, args ...any) {
	r.skipped = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func require(t *testing.T, mode Mode) *recorder {
	r := &recorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Require(r, mode)
	}()
	<-done
	return r
}

func writeEnv(t *testing.T, dir, mode string) {
	t.Helper()
	text := fmt.Sprintf(`# written by a test
export IMAGE_PREFETCHER_E2E_MODE='%s'
export IMAGE_PREFETCHER_E2E_STATE='%s'
export IMAGE_PREFETCHER_E2E_RUNTIME='cri-o'
export IMAGE_PREFETCHER_E2E_RUNTIME_VERSION='1.35.2'
export IMAGE_PREFETCHER_E2E_CRI_SOCKET='%s'
export IMAGE_PREFETCHER_E2E_REGISTRY='127.0.0.1:5000'
export IMAGE_PREFETCHER_E2E_AUTH_REGISTRY='127.0.0.1:5001'
export IMAGE_PREFETCHER_E2E_AUTH_USER='e2e'
export KUBECONFIG='%[2]s/admin.kubeconfig'
export IMAGE_PREFETCHER_E2E_KUBECONFIG='%[2]s/admin.kubeconfig'
export IMAGE_PREFETCHER_E2E_AGENT_IMAGE_PUSHED='1'
`, mode, dir, filepath.Join(dir, "no.sock"))
	if err := os.WriteFile(filepath.Join(dir, "env.sh"), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestRequireSkipsWhenNotEnabled(t *testing.T) {
	t.Setenv(EnableVar, "")
	r := require(t, Runtime)
	if r.skipped == "" || r.failed != "" {
		t.Fatalf("want a skip, got skipped=%q failed=%q", r.skipped, r.failed)
	}
	if !strings.Contains(r.skipped, "e2e/cluster.sh up runtime") || !strings.Contains(r.skipped, EnableVar) {
		t.Errorf("skip message does not say how to run: %q", r.skipped)
	}
}

func TestRequireFailsWhenEnabledButNotUp(t *testing.T) {
	t.Setenv(EnableVar, "1")
	t.Setenv(StateVar, t.TempDir())
	r := require(t, Full)
	if r.failed == "" {
		t.Fatalf("want a failure, got skipped=%q", r.skipped)
	}
	if !strings.Contains(r.failed, "e2e/cluster.sh up") {
		t.Errorf("failure does not say how to fix it: %q", r.failed)
	}
}

func TestRequireFailsOnTooSmallMode(t *testing.T) {
	dir := t.TempDir()
	writeEnv(t, dir, "runtime")
	t.Setenv(EnableVar, "1")
	t.Setenv(StateVar, dir)
	r := require(t, Full)
	if !strings.Contains(r.failed, `is "runtime"`) {
		t.Fatalf("want a failure naming the mode, got failed=%q skipped=%q", r.failed, r.skipped)
	}
}

func TestRequireFailsWhenComponentsAreDead(t *testing.T) {
	dir := t.TempDir()
	writeEnv(t, dir, "runtime")
	t.Setenv(EnableVar, "1")
	t.Setenv(StateVar, dir)
	r := require(t, Runtime)
	if !strings.Contains(r.failed, "does not answer") || !strings.Contains(r.failed, "no.sock") {
		t.Fatalf("want a failure naming the dead socket, got failed=%q skipped=%q", r.failed, r.skipped)
	}
}

func TestLoadFile(t *testing.T) {
	dir := t.TempDir()
	writeEnv(t, dir, "full")
	env, err := LoadFile(filepath.Join(dir, "env.sh"))
	if err != nil {
		t.Fatal(err)
	}
	if env.Mode != Full || env.Runtime != RuntimeCRIO || env.RuntimeVersion != "1.35.2" || env.IsContainerd() || env.Registry != "127.0.0.1:5000" || env.AuthRegistry != "127.0.0.1:5001" ||
		env.Kubeconfig != dir+"/admin.kubeconfig" || !env.AgentImagePushed || env.Var("KUBECONFIG") != env.Kubeconfig {
		t.Fatalf("parsed %+v", env)
	}

	bad := filepath.Join(dir, "bad.sh")
	for name, text := range map[string]string{
		"no mode":     "export IMAGE_PREFETCHER_E2E_REGISTRY='x'\n",
		"not a var":   "export IMAGE_PREFETCHER_E2E_MODE\n",
		"no registry": "export IMAGE_PREFETCHER_E2E_MODE='runtime'\nexport IMAGE_PREFETCHER_E2E_RUNTIME='containerd'\nexport IMAGE_PREFETCHER_E2E_CRI_SOCKET='/s'\n",
		"no runtime":  "export IMAGE_PREFETCHER_E2E_MODE='runtime'\nexport IMAGE_PREFETCHER_E2E_CRI_SOCKET='/s'\nexport IMAGE_PREFETCHER_E2E_REGISTRY='x'\nexport IMAGE_PREFETCHER_E2E_AUTH_REGISTRY='y'\n",
	} {
		if err := os.WriteFile(bad, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadFile(bad); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
