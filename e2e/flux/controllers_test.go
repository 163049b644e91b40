// Flux's own controllers on the harness's cluster: source-controller and kustomize-controller of
// one release, built by build-controllers.sh, run as processes of the test against the API server
// with their CRDs; the source is a GitRepository on a Git server of the test (git http-backend,
// the smart HTTP protocol), the instance a Kustomization with wait, timeout and prune, as a user
// writes them (docs/bundle.md).
package flux_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	kustomizev1 "github.com/fluxcd/kustomize-controller/api/v1"
	"github.com/fluxcd/pkg/apis/meta"
	sourcev1 "github.com/fluxcd/source-controller/api/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// ControllersVar names the directory build-controllers.sh printed (bin/ and crds/); the Makefile
// sets it.
const ControllersVar = "IMAGE_PREFETCHER_FLUX_CONTROLLERS"

// TestFleetFluxControllersRollTheBundleOut: Flux's source-controller and kustomize-controller, as
// released, reconcile the bundle from a Git repository onto the fleet (nodes of every runtime):
//  1. one node cannot reach the registry: the Kustomization's health check fails at its timeout naming
//     the DaemonSet, that node says failed, the others succeeded; the node reaches the registry again:
//     Ready, and not before every node said succeeded;
//  2. the list changed in Git: the DaemonSet rolls through every node, no node says succeeded for the
//     old list once its new one started, Ready comes after every node said succeeded for the new list,
//     the old list's ConfigMap is pruned;
//  3. the instance removed from Git: every object goes but its Namespace, and each node keeps its
//     label and annotation or both were withdrawn.
func TestFleetFluxControllersRollTheBundleOut(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	nodes := env.RequireFleet(t)
	dir := os.Getenv(ControllersVar)
	if dir == "" {
		t.Fatalf("%s is not set: run `e2e/flux/build-controllers.sh` and set it to the directory it prints (make e2e-fleet does)", ControllersVar)
	}
	ctx := ctxFor(t, 12*time.Minute)
	c := fluxClient(t, env)
	installCRDs(ctx, t, env, c, filepath.Join(dir, "crds"))
	ensureNamespace(ctx, t, c, fluxNamespace)
	startControllers(ctx, t, env, filepath.Join(dir, "bin"))

	oldList := refs(t, env, "e2e/small:14", "e2e/small:16", "e2e/random:8mib")
	newList := refs(t, env, "e2e/small:14", "e2e/small:17", "e2e/random:12mib")
	// Long enough for a rollout through the fleet one node at a time (the base's maxUnavailable).
	const timeout = 45 * time.Second
	in := newInstance(t, env, "ctl", timeout, oldList)
	// A pass that gives up on an unreachable registry within seconds, and a node that looks again
	// soon after (the defaults retry for minutes, during which the node claims nothing either way).
	in.opts.RecheckInterval = "10s"
	in.opts.ExtraArgs = []string{"--max-attempts=3", "--max-pull-attempt-delay=2s"}
	in.removeImages(ctx, append(oldList, newList...))
	repo := newGitRepo(t)

	// 1. One node cut off from the registry (the agent's own images are there already).
	cut := nodes[len(nodes)-1]
	env.PullAgentImages(ctx, t, cut)
	clusterenv.RunHarness(t, "node-registry", cut.Name, "block")
	t.Cleanup(func() { clusterenv.RunHarness(t, "node-registry", cut.Name, "allow") })
	rev := repo.commit(in, true, "image prefetcher instance")
	gitRepo := &sourcev1.GitRepository{
		ObjectMeta: metav1.ObjectMeta{Name: in.name(), Namespace: fluxNamespace},
		Spec: sourcev1.GitRepositorySpec{
			URL:       repo.url,
			Interval:  metav1.Duration{Duration: 10 * time.Minute},
			Reference: &sourcev1.GitRepositoryRef{Branch: "main"},
		},
	}
	rec := in.record(ctx)
	start := time.Now()
	if err := c.Create(ctx, gitRepo); err != nil {
		t.Fatalf("create GitRepository: %v", err)
	}
	t.Cleanup(func() { deleteAndWait(t, c, gitRepo) })
	if err := c.Create(ctx, in.kust.DeepCopy()); err != nil {
		t.Fatalf("create Kustomization: %v", err)
	}
	t.Cleanup(func() { deleteAndWait(t, c, in.kust.DeepCopy()) }) // its finalizer prunes what is left
	k := waitKustomization(ctx, t, c, in, rev, false)
	t.Logf("flux controllers: %s Ready=False %s after the GitRepository and Kustomization were created, node %s cut off (%s): %q",
		rev, time.Since(start).Round(100*time.Millisecond), cut.Name, lastReconcile(k), readyMessage(k))
	cond := apimeta.FindStatusCondition(k.Status.Conditions, meta.ReadyCondition)
	ds := "DaemonSet/" + in.opts.Namespace + "/" + in.name()
	if cond.Reason != meta.HealthCheckFailedReason || !strings.Contains(cond.Message, ds) {
		t.Errorf("Ready=False with reason %s and message %q, want %s naming %s", cond.Reason, cond.Message, meta.HealthCheckFailedReason, ds)
	}
	for _, n := range nodes {
		if n.Name == cut.Name {
			// polled: a re-check pass (every 10 s here) may be under way at any one read
			short, cancel := context.WithTimeout(ctx, time.Minute)
			in.waitNodeLabel(short, n.Name, "failed")
			cancel()
		} else if s := in.nodeState(ctx, n.Name); s.label != "succeeded" {
			t.Errorf("node %s (%s) while %s is cut off: %s, want succeeded", n.Name, n.Runtime, cut.Name, s)
		}
	}
	requireFailedEvent(ctx, t, in, cut.Name, oldList...)

	clusterenv.RunHarness(t, "node-registry", cut.Name, "allow")
	allowed := time.Now()
	in.waitNodeLabel(ctx, cut.Name, "succeeded")
	requestReconcile(ctx, t, c, in.kust.DeepCopy()) // as `flux reconcile kustomization` does
	k = waitKustomization(ctx, t, c, in, rev, true)
	ready := time.Now()
	states := rec.finish(t)
	t.Logf("flux controllers: %s Ready %s after node %s reached the registry again (%s): %q", rev, ready.Sub(allowed).Round(100*time.Millisecond), cut.Name, lastReconcile(k), readyMessage(k))
	for _, n := range nodes {
		if first := firstSucceeded(states[n.Name], ""); first.IsZero() || first.After(ready) {
			t.Errorf("the Kustomization was Ready at %s before node %s said succeeded: %v", ready.Format(time.StampMilli), n.Name, states[n.Name])
		}
	}
	in.requirePresent(ctx, oldList)
	healthy := apimeta.FindStatusCondition(k.Status.Conditions, meta.HealthyCondition)
	if healthy == nil || healthy.Status != metav1.ConditionTrue {
		t.Errorf("Kustomization %s: Healthy condition %+v, want True", in.name(), healthy)
	}
	oldCM := inventoryConfigMap(t, k)

	// 2. The list changed in Git.
	before := map[string]nodeState{}
	for _, n := range nodes {
		before[n.Name] = in.nodeState(ctx, n.Name)
	}
	in.opts.Images = newList
	rec = in.record(ctx)
	start = time.Now()
	rev = repo.commit(in, true, "new image list")
	requestReconcile(ctx, t, c, gitRepo)
	k = waitKustomization(ctx, t, c, in, rev, true)
	ready = time.Now()
	states = rec.finish(t)
	t.Logf("flux controllers: list change %s Ready %s after the commit (%s)", rev, ready.Sub(start).Round(100*time.Millisecond), lastReconcile(k))
	for _, n := range nodes {
		old := before[n.Name].list
		t.Logf("node %s (%s) label states: %v", n.Name, n.Runtime, states[n.Name])
		newStarted := false
		for i, s := range states[n.Name][1:] {
			if s.list != old {
				newStarted = true
			}
			if newStarted && s.list == old && s.label == "succeeded" {
				t.Errorf("node %s, state %d: succeeded for the old list after the new list started: %v", n.Name, i+1, states[n.Name])
			}
		}
		first := firstSucceeded(states[n.Name], old)
		if first.IsZero() || first.After(ready) {
			t.Errorf("Ready at %s without node %s saying succeeded for the new list first: %v", ready.Format(time.StampMilli), n.Name, states[n.Name])
		} else {
			t.Logf("node %s said succeeded for the new list %s after the commit", n.Name, first.Sub(start).Round(100*time.Millisecond))
		}
	}
	in.requirePresent(ctx, newList)
	if newCM := inventoryConfigMap(t, k); newCM == oldCM {
		t.Errorf("the list ConfigMap kept its name %s", oldCM)
	}
	if err := c.Get(ctx, client.ObjectKey{Namespace: in.opts.Namespace, Name: oldCM}, &corev1.ConfigMap{}); !apierrors.IsNotFound(err) {
		t.Errorf("old list ConfigMap %s: %v, want pruned (NotFound)", oldCM, err)
	}

	// 3. The instance removed from Git: every object goes but its Namespace, which the overlays
	// mark for Flux never to prune (another instance may share it).
	applied := inventoryIDs(k)
	start = time.Now()
	rev = repo.commit(in, false, "remove the instance")
	requestReconcile(ctx, t, c, gitRepo)
	k = waitKustomization(ctx, t, c, in, rev, true)
	t.Logf("flux controllers: removal %s Ready %s after the commit (%s)", rev, time.Since(start).Round(100*time.Millisecond), lastReconcile(k))
	if left := inventoryIDs(k); len(left) != 0 {
		t.Errorf("inventory after the removal: %v", left)
	}
	err := wait.PollUntilContextCancel(ctx, 500*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		var ds appsv1.DaemonSet
		err := c.Get(ctx, client.ObjectKey{Namespace: in.opts.Namespace, Name: in.name()}, &ds)
		return apierrors.IsNotFound(err), nil
	})
	if err != nil {
		t.Errorf("DaemonSet %s/%s of the removed instance still there: %v (inventory was %v)", in.opts.Namespace, in.name(), err, applied)
	}
	var ns corev1.Namespace
	if err := c.Get(ctx, client.ObjectKey{Name: in.opts.Namespace}, &ns); err != nil || ns.DeletionTimestamp != nil {
		t.Errorf("namespace %s after the removal: %v (deleting: %v), want it kept (prune disabled)", in.opts.Namespace, err, ns.DeletionTimestamp)
	} else if err := c.Delete(ctx, &ns); err != nil {
		t.Errorf("delete namespace %s: %v", in.opts.Namespace, err)
	}
	// The stopping agents withdraw them when their RBAC outlived the DaemonSet (Flux prunes them in
	// one go, so either may happen, node by node); nothing else may be there.
	for _, n := range nodes {
		if s := in.nodeState(ctx, n.Name); (s.label != "succeeded" || s.list == "") && (s.hasLabel || s.list != "") {
			t.Errorf("node %s after the removal: %s, want label and annotation left as they were, or both withdrawn", n.Name, s)
		}
	}
}

// fluxClient is a controller-runtime client that knows Flux's types.
func fluxClient(t *testing.T, env *clusterenv.Env) client.Client {
	t.Helper()
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, kustomizev1.AddToScheme, sourcev1.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatalf("scheme: %v", err)
		}
	}
	cfg, err := env.RESTConfig()
	if err != nil {
		t.Fatalf("rest config: %v", err)
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	return c
}

// installCRDs applies the controllers' CRDs server-side and waits until they are established;
// CRDs that were not there before are deleted at the end.
func installCRDs(ctx context.Context, t *testing.T, env *clusterenv.Env, c client.Client, dir string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no CRDs in %s (%v): run e2e/flux/build-controllers.sh", dir, err)
	}
	if out, err := kubectl(ctx, env, "get", "crd", "kustomizations.kustomize.toolkit.fluxcd.io"); err != nil {
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if out, err := kubectl(ctx, env, "delete", "-f", dir, "--ignore-not-found", "--wait=true"); err != nil {
				t.Logf("delete Flux CRDs: %v\n%s", err, out)
			}
		})
	} else {
		t.Logf("Flux CRDs already installed, applying this release's over them: %s", strings.TrimSpace(out))
	}
	if out, err := kubectl(ctx, env, "apply", "--server-side", "--force-conflicts", "-f", dir); err != nil {
		t.Fatalf("apply Flux CRDs: %v\n%s", err, out)
	}
	if out, err := kubectl(ctx, env, "wait", "--for=condition=Established", "--timeout=60s", "-f", dir); err != nil {
		t.Fatalf("Flux CRDs not established: %v\n%s", err, out)
	}
}

func ensureNamespace(ctx context.Context, t *testing.T, c client.Client, name string) {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	err := c.Create(ctx, ns)
	switch {
	case apierrors.IsAlreadyExists(err):
	case err != nil:
		t.Fatalf("create namespace %s: %v", name, err)
	default:
		t.Cleanup(func() { deleteAndWait(t, c, ns) })
	}
}

// startControllers runs source-controller and kustomize-controller against the cluster, on
// loopback ports of their own, until the test ends; their logs are shown when it fails.
func startControllers(ctx context.Context, t *testing.T, env *clusterenv.Env, bin string) {
	t.Helper()
	storage := freePort(t)
	startController(ctx, t, env, filepath.Join(bin, "source-controller"),
		"--storage-path="+t.TempDir(),
		fmt.Sprintf("--storage-addr=127.0.0.1:%d", storage),
		fmt.Sprintf("--storage-adv-addr=127.0.0.1:%d", storage),
	)
	startController(ctx, t, env, filepath.Join(bin, "kustomize-controller"), "--no-remote-bases=true")
}

func startController(ctx context.Context, t *testing.T, env *clusterenv.Env, path string, args ...string) {
	t.Helper()
	name := filepath.Base(path)
	health := freePort(t)
	args = append(args,
		fmt.Sprintf("--metrics-addr=127.0.0.1:%d", freePort(t)),
		fmt.Sprintf("--health-addr=127.0.0.1:%d", health),
		"--enable-leader-election=false",
		"--log-encoding=console",
	)
	logPath := filepath.Join(t.TempDir(), name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(path, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+env.Kubeconfig, "RUNTIME_NAMESPACE="+fluxNamespace)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Killed with the test binary too (a test timeout), so no controller outlives its test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v (run e2e/flux/build-controllers.sh)", name, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		logFile.Close()
		if t.Failed() {
			t.Logf("%s log (last lines):\n%s", name, tail(logPath, 40))
		}
	})
	url := fmt.Sprintf("http://127.0.0.1:%d/readyz", health)
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		select {
		case err := <-exited:
			return false, fmt.Errorf("exited: %v", err)
		default:
		}
		resp, err := http.Get(url)
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		t.Fatalf("%s not ready: %v\n%s", name, err, tail(logPath, 40))
	}
}

func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

// gitRepo is a Git repository served over smart HTTP by git's own http-backend, and a work tree
// the test commits to, as a user's fleet repository.
type gitRepo struct {
	t    *testing.T
	work string
	url  string
}

func newGitRepo(t *testing.T) *gitRepo {
	t.Helper()
	root := t.TempDir()
	execPath, err := exec.Command("git", "--exec-path").Output()
	if err != nil {
		t.Fatalf("git --exec-path: %v", err)
	}
	r := &gitRepo{t: t, work: t.TempDir()}
	git(t, root, "init", "--bare", "--initial-branch=main", "fleet.git")
	git(t, r.work, "init", "--initial-branch=main")
	git(t, r.work, "remote", "add", "origin", filepath.Join(root, "fleet.git"))
	srv := httptest.NewServer(&cgi.Handler{
		Path: filepath.Join(strings.TrimSpace(string(execPath)), "git-http-backend"),
		Env:  []string{"GIT_PROJECT_ROOT=" + root, "GIT_HTTP_EXPORT_ALL=1"},
	})
	t.Cleanup(srv.Close)
	r.url = srv.URL + "/fleet.git"
	return r
}

// commit replaces the work tree with the instance's source and pushes it; it returns the revision
// as Flux writes it (branch@sha1:hash).
func (r *gitRepo) commit(in *instance, withInstance bool, msg string) string {
	r.t.Helper()
	entries, err := os.ReadDir(r.work)
	if err != nil {
		r.t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != ".git" {
			if err := os.RemoveAll(filepath.Join(r.work, e.Name())); err != nil {
				r.t.Fatal(err)
			}
		}
	}
	in.writeSource(r.work, withInstance)
	git(r.t, r.work, "add", "-A")
	git(r.t, r.work, "-c", "user.name=e2e", "-c", "user.email=e2e@example.invalid", "commit", "-q", "-m", msg)
	git(r.t, r.work, "push", "-q", "origin", "main")
	return "main@sha1:" + strings.TrimSpace(git(r.t, r.work, "rev-parse", "HEAD"))
}

func git(t *testing.T, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	// The machine's and the user's Git configuration stay out of the test.
	cmd.Env = append(os.Environ(), "GIT_CONFIG_GLOBAL=/dev/null", "GIT_CONFIG_NOSYSTEM=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// requestReconcile asks the object's controller to reconcile it now, as `flux reconcile` (or a
// webhook receiver) does, instead of waiting for the interval.
func requestReconcile(ctx context.Context, t *testing.T, c client.Client, obj client.Object) {
	t.Helper()
	patch := client.MergeFrom(obj.DeepCopyObject().(client.Object))
	a := obj.GetAnnotations()
	if a == nil {
		a = map[string]string{}
	}
	a[meta.ReconcileRequestAnnotation] = time.Now().Format(time.RFC3339Nano)
	obj.SetAnnotations(a)
	if err := c.Patch(ctx, obj, patch); err != nil {
		t.Fatalf("request reconciliation of %T %s: %v", obj, obj.GetName(), err)
	}
}

// waitKustomization waits until the Kustomization's Ready condition is ready (True or False)
// for revision.
func waitKustomization(ctx context.Context, t *testing.T, c client.Client, in *instance, revision string, ready bool) *kustomizev1.Kustomization {
	t.Helper()
	k := &kustomizev1.Kustomization{}
	want := metav1.ConditionFalse
	if ready {
		want = metav1.ConditionTrue
	}
	err := wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		if err := c.Get(ctx, client.ObjectKeyFromObject(in.kust), k); err != nil {
			return false, err
		}
		cond := apimeta.FindStatusCondition(k.Status.Conditions, meta.ReadyCondition)
		if cond == nil || cond.Status != want || cond.ObservedGeneration != k.Generation {
			return false, nil
		}
		if ready {
			return k.Status.LastAppliedRevision == revision, nil
		}
		return k.Status.LastAttemptedRevision == revision, nil
	})
	if err != nil {
		t.Fatalf("Kustomization %s: no Ready=%s for %s: %v; status %+v\n%s", in.name(), want, revision, err, k.Status, in.diagnose())
	}
	return k
}

// lastReconcile is the controller's own record of its last reconciliation (status.history).
func lastReconcile(k *kustomizev1.Kustomization) string {
	h := k.Status.History.Latest()
	if h == nil {
		return "no history"
	}
	return fmt.Sprintf("controller's last reconciliation %s, %s", h.LastReconciledDuration.Round(time.Millisecond), h.LastReconciledStatus)
}

func readyMessage(k *kustomizev1.Kustomization) string {
	if c := apimeta.FindStatusCondition(k.Status.Conditions, meta.ReadyCondition); c != nil {
		return c.Message
	}
	return ""
}

// firstSucceeded is when the node first said succeeded for a list other than notList.
func firstSucceeded(states []nodeState, notList string) time.Time {
	for _, s := range states {
		if s.hasLabel && s.label == "succeeded" && s.list != notList {
			return s.at
		}
	}
	return time.Time{}
}

// inventoryIDs lists the Kustomization's inventory ("namespace_name_group_kind" each).
func inventoryIDs(k *kustomizev1.Kustomization) []string {
	var ids []string
	if k.Status.Inventory != nil {
		for _, e := range k.Status.Inventory.Entries {
			ids = append(ids, e.ID)
		}
	}
	return ids
}

// inventoryConfigMap is the name of the list ConfigMap in the Kustomization's inventory (entries
// are "namespace_name_group_kind").
func inventoryConfigMap(t *testing.T, k *kustomizev1.Kustomization) string {
	t.Helper()
	for _, id := range inventoryIDs(k) {
		if strings.HasSuffix(id, "__ConfigMap") {
			return strings.Split(id, "_")[1]
		}
	}
	t.Fatalf("no ConfigMap in the inventory of %s: %+v", k.Name, k.Status.Inventory)
	return ""
}

// requireFailedEvent waits for the agent's PrefetchFailed event about the node that names one of
// images.
func requireFailedEvent(ctx context.Context, t *testing.T, in *instance, node string, images ...string) {
	t.Helper()
	var event string
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		for _, e := range in.nodeEvents(ctx, node) {
			for _, image := range images {
				if e.Type == corev1.EventTypeWarning && e.Reason == "PrefetchFailed" && strings.Contains(e.Message, image) {
					event = e.Message
				}
			}
		}
		return event != "", nil
	})
	if err != nil {
		t.Fatalf("no PrefetchFailed event of %s about node %s names one of %v: %v\n%s", in.name(), node, images, err, in.diagnose())
	}
	t.Logf("node %s event of the failing DaemonSet: %s", node, event)
}

// deleteAndWait deletes obj and waits until it is gone (finalizers done).
func deleteAndWait(t *testing.T, c client.Client, obj client.Object) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := c.Delete(ctx, obj); err != nil && !apierrors.IsNotFound(err) {
		t.Logf("cleanup: delete %T %s: %v", obj, obj.GetName(), err)
		return
	}
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		err := c.Get(ctx, client.ObjectKeyFromObject(obj), obj)
		return apierrors.IsNotFound(err), nil
	})
	if err != nil {
		t.Logf("cleanup: %T %s still there: %v", obj, obj.GetName(), errors.Join(err, ctx.Err()))
	}
}

// kubectl runs kubectl with the environment's admin kubeconfig.
func kubectl(ctx context.Context, env *clusterenv.Env, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "kubectl", args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+env.Kubeconfig)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
