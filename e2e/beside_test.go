package e2e_test

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"

	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/pullslots"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// logTime is the slog time of the first line of logs that holds msg (zero when none).
func logTime(t *testing.T, logs, msg string) time.Time {
	t.Helper()
	for _, line := range strings.Split(logs, "\n") {
		if !strings.Contains(line, msg) {
			continue
		}
		m := regexp.MustCompile(`\btime=(\S+)`).FindStringSubmatch(line)
		if m == nil {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil {
			t.Fatalf("log time %q: %v", m[1], err)
		}
		return at
	}
	return time.Time{}
}

// TestScenarioFetchBesideRun: a `fetch` of the instance on the node while its DaemonSet's agent pulls (an init
// container or a Job would do the same). One pull slot (max-concurrent-nodes, K=1) and pin-images; the agent
// pulls a 16 MiB image through a 16 Mbit/s link and holds the slot meanwhile. The fetch, with a list of its
// own and no --release-pins, waits for that slot instead of taking it over (it names another process), takes
// it only after the agent freed it, and releases none of the agent's pins; the agent's pass still ends
// succeeded with every image of its list pinned.
func TestScenarioFetchBesideRun(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	if env.Runtime != clusterenv.RuntimeContainerd {
		t.Fatalf("this scenario runs on containerd 2.x (pins and pull progress), not %s", env.Runtime)
	}
	ctx := ctxFor(t, 5*time.Minute)
	_, images := env.CRI(t)
	cs := env.Clientset(t)
	recs := containerdRecords(t, env)
	proxy := progressProxy(t, env, 16)
	slow := viaProgressProxy(ctx, t, env, images, proxy, "e2e/random:16mib")
	runList := append([]string{slow}, refs(t, env, "e2e/small:05")...)
	fetchList := refs(t, env, "e2e/small:06")
	removeImages(ctx, t, images, append(runList[1:], fetchList...))

	in := newInstance(t, env, "beside", runList, "max-concurrent-nodes", "pin-images")
	in.opts.ExtraArgs = []string{"--max-concurrent-nodes=1"}
	in.apply()

	// The agent holds the slot while it pulls the slow image.
	slot := in.name() + "-pull-slot-0"
	var runProcess string
	err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		le, err := cs.CoordinationV1().Leases(in.opts.Namespace).Get(ctx, slot, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		runProcess = le.Annotations[pullslots.ProcessAnnotation]
		return ptr.Deref(le.Spec.HolderIdentity, "") == env.NodeName && runProcess != "", nil
	})
	if err != nil {
		t.Fatalf("the agent never held %s: %v\n%s", slot, err, in.diagnose())
	}

	list := filepath.Join(t.TempDir(), "images.txt")
	if err := os.WriteFile(list, []byte(strings.Join(fetchList, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fetch := startAgent(t, "fetch", "--cri-socket", env.CRISocket, "--image-list-file", list, "--label=false",
		"--instance", in.name(), "--namespace", in.opts.Namespace, "--node-name", env.NodeName,
		"--max-concurrent-nodes=1", "--kubeconfig", env.Kubeconfig, "--pin-images")
	if code := fetch.wait(3 * time.Minute); code != 0 {
		t.Fatalf("fetch beside the agent exited %d\n%s", code, fetch.out)
	}
	in.waitLabel(ctx, "succeeded")

	released := logTime(t, in.logs(), `msg="pull slot released"`)
	acquired := logTime(t, fetch.out.String(), `msg="pull slot acquired"`)
	t.Logf("agent (%s) released the slot at %s; the fetch started at %s and acquired it at %s", runProcess,
		released.Format(time.StampMilli), fetch.start.Format(time.StampMilli), acquired.Format(time.StampMilli))
	if released.IsZero() || acquired.IsZero() {
		t.Fatalf("no slot release in the agent's log or no acquisition in the fetch's\n%s\n%s", in.logs(), fetch.out)
	}
	if !released.After(fetch.start) {
		t.Fatalf("the agent freed its slot before the fetch started (the link was faster than planned?): nothing shows the fetch waiting")
	}
	if acquired.Before(released) {
		t.Errorf("the fetch acquired the slot at %s while the agent held it until %s", acquired.Format(time.StampMilli), released.Format(time.StampMilli))
	}

	// Every image of both lists is pinned by the instance: the fetch added its own and released none.
	owned := map[string]bool{}
	for _, name := range recs.ownedBy(in.name()) {
		owned[name] = true
	}
	for _, ref := range append(runList, fetchList...) {
		name, err := pin.RecordName(ref)
		if err != nil {
			t.Fatal(err)
		}
		if !owned[name] {
			t.Errorf("%s is not pinned by %s after the fetch beside its agent (owned: %v)", name, in.name(), owned)
		}
	}
}
