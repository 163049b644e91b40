// Helpers of the Flux tests: an image prefetcher instance kept in a source tree like a user's Git
// repository (the repository's overlay plus the e2e layer of e2e/deploy), reconciled by the
// Reconciler of this package, and cleaned up (objects, node label and annotation) at the end.
package flux_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	kustomizev1 "github.com/fluxcd/kustomize-controller/api/v1"
	sourcev1 "github.com/fluxcd/source-controller/api/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/deploy"
	"github.com/nodeprefetch/image-prefetcher/e2e/flux"
)

const (
	labelPrefix      = "image-prefetcher.stackrox.io/"
	annotationPrefix = "list.image-prefetcher.stackrox.io/"
	// instancePath is where the instance sits in the source tree: a cluster directory listing it,
	// as in a fleet repository (removing it from there is how a user uninstalls through Git).
	instancePath = "clusters/e2e"
	// healthInterval is the kstatus polling interval of the tests: shorter than the controller's
	// 5 s so the measured times say when the objects became ready, not when the next poll came.
	healthInterval = time.Second
	// fluxNamespace is where the Kustomization (and its source) live, as in a Flux installation.
	fluxNamespace = "flux-system"
)

// instance is one image prefetcher instance reconciled the Flux way.
type instance struct {
	t   *testing.T
	env *clusterenv.Env
	cs  kubernetes.Interface
	// nodes are the cluster's nodes, where the instance's agents run (one on the single-node cluster).
	nodes []clusterenv.Node
	opts  deploy.Options
	kust  *kustomizev1.Kustomization
	// rec reconciles kust with Flux's libraries (withReconciler); nil when Flux's controllers do.
	rec *flux.Reconciler
}

// newInstance prepares an instance named flux-<base>-<random> (namespace of the same name) with
// the list images and a Kustomization for it at instancePath with prune, wait and timeout, and
// registers its cleanup. It applies nothing.
func newInstance(t *testing.T, env *clusterenv.Env, base string, timeout time.Duration, images []string) *instance {
	t.Helper()
	if env.AgentImage == "" {
		t.Fatalf("no agent image in the env file: run `e2e/cluster.sh push-agent-image`")
	}
	if !env.IsContainerd() {
		// The vanilla overlay mounts the containerd socket directory; CRI-O nodes take overlays/ocp.
		t.Fatalf("the Flux tests deploy overlays/vanilla and need a containerd node, the cluster runs %s", env.Runtime)
	}
	name := "flux-" + base + "-" + suffix(t)
	nodes, err := env.FleetNodes()
	if err != nil {
		t.Fatal(err)
	}
	in := &instance{
		t: t, env: env, cs: env.Clientset(t), nodes: nodes,
		opts: deploy.Options{
			Namespace:  name,
			Instance:   name,
			Images:     images,
			AgentImage: env.AgentImage,
			ListenPort: freePort(t),
		},
		kust: &kustomizev1.Kustomization{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: fluxNamespace},
			Spec: kustomizev1.KustomizationSpec{
				Interval:  metav1.Duration{Duration: 10 * time.Minute},
				Path:      "./" + instancePath,
				Prune:     true,
				Wait:      true,
				Timeout:   &metav1.Duration{Duration: timeout},
				SourceRef: kustomizev1.CrossNamespaceSourceReference{Kind: sourcev1.GitRepositoryKind, Name: name},
			},
		},
	}
	in.opts.UseHarness(env)
	t.Cleanup(in.cleanup)
	return in
}

// withReconciler gives the instance the library Reconciler of this package for its Kustomization.
func (in *instance) withReconciler() *instance {
	in.t.Helper()
	cfg, err := in.env.RESTConfig()
	if err != nil {
		in.t.Fatalf("rest config: %v", err)
	}
	// No client-side rate limiter. kstatus polling ends on the first failed request, and a limiter's
	// Wait fails as soon as the check's deadline has passed, before the context says so; the check then
	// returns the limiter's error instead of its own timeout, whose message names the object that was
	// not ready. Even kustomize-controller's limits (50 QPS, burst 300) lost that race once on a loaded
	// machine. Without a limiter a request fails on the deadline only through the context.
	cfg.QPS = -1
	in.rec, err = flux.New(cfg, in.kust)
	if err != nil {
		in.t.Fatal(err)
	}
	in.rec.WaitInterval = healthInterval
	return in
}

func (in *instance) name() string          { return in.opts.Instance }
func (in *instance) labelKey() string      { return labelPrefix + in.opts.Instance }
func (in *instance) annotationKey() string { return annotationPrefix + in.opts.Instance }

// source writes the source tree of the instance as now configured into a new directory; see
// writeSource.
func (in *instance) source(withInstance bool) string {
	in.t.Helper()
	dir := in.t.TempDir()
	in.writeSource(dir, withInstance)
	return dir
}

// writeSource writes into dir a copy of the bundle with the instance overlay, the e2e layer over
// it, and clusters/e2e listing that layer (withInstance false: listing nothing, the instance
// removed from Git).
func (in *instance) writeSource(dir string, withInstance bool) {
	in.t.Helper()
	root, err := bundle.Root()
	if err != nil {
		in.t.Fatal(err)
	}
	if _, err := deploy.Overlay(root, dir, in.opts); err != nil {
		in.t.Fatal(err)
	}
	resources := "resources: []\n"
	if withInstance {
		resources = "resources:\n- ../../e2e\n"
	}
	k := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n" + resources
	if err := os.MkdirAll(filepath.Join(dir, instancePath), 0o755); err != nil {
		in.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, instancePath, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		in.t.Fatal(err)
	}
}

// reconcile runs one reconciliation of the current source and logs its measured times.
func (in *instance) reconcile(ctx context.Context, what string, withInstance bool) (flux.Result, error) {
	in.t.Helper()
	res, err := in.rec.Reconcile(ctx, in.source(withInstance))
	outcome := "ready"
	if err != nil {
		outcome = "failed"
	}
	in.t.Logf("flux reconcile %s (%s): %s: %s", in.name(), what, outcome, res)
	return res, err
}

// requireReconciled is reconcile that must succeed.
func (in *instance) requireReconciled(ctx context.Context, what string) flux.Result {
	in.t.Helper()
	res, err := in.reconcile(ctx, what, true)
	if err != nil {
		in.t.Fatalf("%v\n%s", err, in.diagnose())
	}
	return res
}

// node returns the first node's current label and list annotation of the instance.
func (in *instance) node(ctx context.Context) nodeState {
	in.t.Helper()
	return in.nodeState(ctx, in.env.NodeName)
}

// nodeState returns the named node's current label and list annotation of the instance.
func (in *instance) nodeState(ctx context.Context, name string) nodeState {
	in.t.Helper()
	n, err := in.cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		in.t.Fatalf("get node %s: %v", name, err)
	}
	return in.stateOf(n)
}

func (in *instance) stateOf(n *corev1.Node) nodeState {
	label, has := n.Labels[in.labelKey()]
	return nodeState{label: label, hasLabel: has, list: n.Annotations[in.annotationKey()], at: time.Now(), rv: n.ResourceVersion}
}

// waitLabel waits until the first node's label of the instance has the value want.
func (in *instance) waitLabel(ctx context.Context, want string) nodeState {
	in.t.Helper()
	return in.waitNodeLabel(ctx, in.env.NodeName, want)
}

// waitNodeLabel waits until the named node's label of the instance has the value want.
func (in *instance) waitNodeLabel(ctx context.Context, name, want string) nodeState {
	in.t.Helper()
	var s nodeState
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		s = in.nodeState(ctx, name)
		return s.hasLabel && s.label == want, nil
	})
	if err != nil {
		in.t.Fatalf("label %s of node %s: want %q, have %s: %v\n%s", in.labelKey(), name, want, s, err, in.diagnose())
	}
	return s
}

// nodeState is the instance's label and list annotation as the node showed them at one moment.
type nodeState struct {
	label, list string
	hasLabel    bool
	at          time.Time
	rv          string
}

func (s nodeState) String() string {
	l := "(no label)"
	if s.hasLabel {
		l = s.label
	}
	return fmt.Sprintf("%s list=%.12s at %s", l, s.list, s.at.Format("15:04:05.000"))
}

// recorder records every change of the instance's label and annotation on every node of the
// instance from a watch of the Nodes.
type recorder struct {
	mu     sync.Mutex
	states map[string][]nodeState // by node name, the first state the one listed at the start
	stop   func()
	done   chan struct{}
	err    error
}

// record lists the nodes and watches them from the list's resource version (so nothing between the
// two is missed) until stop.
func (in *instance) record(ctx context.Context) *recorder {
	in.t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	l, err := in.cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		cancel()
		in.t.Fatalf("list nodes: %v", err)
	}
	r := &recorder{states: map[string][]nodeState{}, done: make(chan struct{})}
	for i := range l.Items {
		if in.isNode(l.Items[i].Name) {
			r.states[l.Items[i].Name] = []nodeState{in.stateOf(&l.Items[i])}
		}
	}
	w, err := in.cs.CoreV1().Nodes().Watch(ctx, metav1.ListOptions{ResourceVersion: l.ResourceVersion})
	if err != nil {
		cancel()
		in.t.Fatalf("watch nodes: %v", err)
	}
	// Cancelled first: the error event the stop causes then finds ctx done and is not taken for a failure.
	r.stop = func() { cancel(); w.Stop(); <-r.done }
	go func() {
		defer close(r.done)
		for ev := range w.ResultChan() {
			if ctx.Err() != nil {
				return // stopped: a watch ends with an error event then
			}
			if ev.Type == watch.Error {
				r.mu.Lock()
				r.err = fmt.Errorf("node watch: %+v", ev.Object)
				r.mu.Unlock()
				return
			}
			n, ok := ev.Object.(*corev1.Node)
			if !ok || !in.isNode(n.Name) {
				continue
			}
			s := in.stateOf(n)
			r.mu.Lock()
			states := r.states[n.Name]
			if len(states) == 0 {
				r.states[n.Name] = []nodeState{s}
			} else if last := states[len(states)-1]; last.label != s.label || last.hasLabel != s.hasLabel || last.list != s.list {
				r.states[n.Name] = append(states, s) // others' labels and the kubelet's updates are not ours
			}
			r.mu.Unlock()
		}
	}()
	return r
}

// finish stops the watch and returns the states it saw, by node name.
func (r *recorder) finish(t *testing.T) map[string][]nodeState {
	t.Helper()
	r.stop()
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.states
}

func (in *instance) isNode(name string) bool {
	for _, n := range in.nodes {
		if n.Name == name {
			return true
		}
	}
	return false
}

// diagnose says what a failing test needs to know: the agent pods and the instance's events.
func (in *instance) diagnose() string {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var b strings.Builder
	if l, err := in.cs.CoreV1().Pods(in.opts.Namespace).List(ctx, metav1.ListOptions{}); err == nil {
		for _, p := range l.Items {
			fmt.Fprintf(&b, "pod %s phase=%s node=%s", p.Name, p.Status.Phase, p.Spec.NodeName)
			for _, c := range p.Status.ContainerStatuses {
				fmt.Fprintf(&b, " %s ready=%v restarts=%d", c.Name, c.Ready, c.RestartCount)
			}
			b.WriteString("\n")
		}
	}
	for _, n := range in.nodes {
		for _, e := range in.nodeEvents(ctx, n.Name) {
			fmt.Fprintf(&b, "node %s event %s %s: %s\n", n.Name, e.Type, e.Reason, e.Message)
		}
	}
	return b.String()
}

// nodeEvents returns the Node events the instance's agents recorded about the named node.
func (in *instance) nodeEvents(ctx context.Context, name string) []corev1.Event {
	l, err := in.cs.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + name,
	})
	if err != nil {
		in.t.Logf("list node events: %v", err)
		return nil
	}
	var mine []corev1.Event
	for _, e := range l.Items {
		if e.Source.Component == "image-prefetcher/"+in.name() {
			mine = append(mine, e)
		}
	}
	return mine
}

// cleanup deletes the DaemonSet first and waits for its pods (a running agent could write the
// label again), then removes the label and annotation, then deletes what the reconciler applied.
func (in *instance) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	fg := metav1.DeletePropagationForeground
	err := in.cs.AppsV1().DaemonSets(in.opts.Namespace).Delete(ctx, in.name(), metav1.DeleteOptions{PropagationPolicy: &fg})
	if err == nil {
		err = wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
			l, err := in.cs.CoreV1().Pods(in.opts.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + in.name()})
			return err == nil && len(l.Items) == 0, nil
		})
		if err != nil {
			in.t.Logf("cleanup of %s: agent pods still there: %v", in.name(), err)
		}
	}
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:null},"annotations":{%q:null}}}`, in.labelKey(), in.annotationKey())
	for _, n := range in.nodes {
		if _, err := in.cs.CoreV1().Nodes().Patch(ctx, n.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			in.t.Logf("cleanup of %s: remove the label of node %s: %v", in.name(), n.Name, err)
		}
	}
	if in.rec == nil {
		return
	}
	if _, err := in.rec.Delete(ctx, time.Second); err != nil {
		in.t.Logf("cleanup of %s: %v", in.name(), err)
	}
}

func suffix(t *testing.T) string { return clusterenv.Suffix(t) }

func freePort(t *testing.T) int { return clusterenv.FreePort(t) }

func refs(t *testing.T, env *clusterenv.Env, names ...string) []string { return env.Refs(t, names...) }

// removeImages removes images from every node through CRI so the agents have to pull them (absent is
// fine).
func (in *instance) removeImages(ctx context.Context, refs []string) {
	in.t.Helper()
	for _, n := range in.nodes {
		images := n.CRI(in.t)
		for _, r := range refs {
			_, err := images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: r}})
			if err != nil && status.Code(err) != codes.NotFound {
				in.t.Fatalf("remove %s from node %s: %v", r, n.Name, err)
			}
		}
	}
}

// requirePresent fails unless CRI reports every image of refs on every node.
func (in *instance) requirePresent(ctx context.Context, refs []string) {
	in.t.Helper()
	for _, n := range in.nodes {
		images := n.CRI(in.t)
		for _, r := range refs {
			st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: r}})
			if err != nil {
				in.t.Fatalf("image status %s on node %s: %v", r, n.Name, err)
			}
			if st.Image == nil {
				in.t.Errorf("%s is not on node %s according to CRI", r, n.Name)
			}
		}
	}
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}
