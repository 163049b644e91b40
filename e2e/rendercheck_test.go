package e2e_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/fn"
)

// A kustomize build that skipped the function (--enable-alpha-plugins without --enable-exec:
// exit 0, no instance) holds the examples' render check. Without it, applying the build of
// examples/workloads-kustomize (the shop's workloads, no instance) would succeed; with it, the
// real API server's kubectl apply exits 1 naming the render check, so a pipeline stops (and
// kubectl skips its prune step after any error).
func TestRenderCheckFailsAnApplyWithoutTheFunction(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	for _, ex := range []string{"workloads", "workloads-kustomize"} {
		if err := os.CopyFS(filepath.Join(tmp, ex), os.DirFS(filepath.Join(root, "examples", ex))); err != nil {
			t.Fatal(err)
		}
	}
	skipped, err := exec.Command(kustomizeCLI(t), "build", "--enable-alpha-plugins", filepath.Join(tmp, "workloads-kustomize")).Output()
	if err != nil {
		t.Fatalf("kustomize build without --enable-exec: %v", err)
	}
	if !strings.Contains(string(skipped), "kind: "+fn.RenderCheckKind) || strings.Contains(string(skipped), "kind: DaemonSet") {
		t.Fatalf("the build is not the workloads and the render check:\n%s", skipped)
	}
	t.Cleanup(func() { _, _ = kubectl(t, env, skipped, "delete", "-f", "-", "--ignore-not-found", "--wait=false") })
	msg, err := kubectl(t, env, skipped, "apply", "-f", "-")
	if err == nil {
		t.Fatalf("kubectl apply of a build without the function succeeded:\n%s", msg)
	}
	if !strings.Contains(msg, fn.RenderCheckKind) {
		t.Errorf("kubectl apply failed without naming the render check:\n%s", msg)
	}
	t.Logf("kubectl apply failed: %s", strings.TrimSpace(msg))
}
