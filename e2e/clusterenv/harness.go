package clusterenv

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/bundle"
)

// Harness runs e2e/cluster.sh with args: the commands that change the running environment (add-node,
// kill-node, shape-node, node-registry, fleet-registry).
func Harness(ctx context.Context, args ...string) error {
	root, err := bundle.Root()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(root, "e2e", "cluster.sh"), args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("e2e/cluster.sh %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// RunHarness is Harness for a test: it fails the test when the command fails.
func RunHarness(t testing.TB, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := Harness(ctx, args...); err != nil {
		t.Fatal(err)
	}
}
