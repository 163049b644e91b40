// Helpers of the scenario tests: an image prefetcher instance deployed on the real cluster with
// kubectl, from the repository's overlays plus the e2e layer of e2e/deploy, and cleaned up
// (objects, node label and annotation) when the test ends.
package e2e_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/deploy"
)

const (
	labelPrefix      = "image-prefetcher.stackrox.io/"
	annotationPrefix = "list.image-prefetcher.stackrox.io/"
)

// instance is one image prefetcher instance of a scenario test.
type instance struct {
	t    *testing.T
	env  *clusterenv.Env
	cs   kubernetes.Interface
	opts deploy.Options
	// node is the node whose label, events and pods the single-node helpers look at (the harness's
	// first node unless a fleet test points them at another)
	node string
	// applied is every manifest applied so far (deleted at the end).
	applied [][]byte
}

func suffix(t *testing.T) string { return clusterenv.Suffix(t) }

func freePort(t *testing.T) int { return clusterenv.FreePort(t) }

// newInstance prepares (does not apply) an instance named e2e-<base>-<random> in a namespace of the
// same name, and registers its cleanup.
func newInstance(t *testing.T, env *clusterenv.Env, base string, images []string, components ...string) *instance {
	t.Helper()
	return newNamedInstance(t, env, "e2e-"+base+"-"+suffix(t), images, components...)
}

// newNamedInstance is newInstance with a fixed name, for what the node knows by name before the
// instance exists (a startup taint it registered with).
func newNamedInstance(t *testing.T, env *clusterenv.Env, name string, images []string, components ...string) *instance {
	t.Helper()
	if env.AgentImage == "" {
		t.Fatalf("no agent image in the env file: run `e2e/cluster.sh push-agent-image`")
	}
	in := &instance{
		t: t, env: env, cs: env.Clientset(t), node: env.NodeName,
		opts: deploy.Options{
			Namespace:  name,
			Instance:   name,
			Images:     images,
			Components: components,
			AgentImage: env.AgentImage,
			ListenPort: freePort(t),
		},
	}
	if env.Runtime == clusterenv.RuntimeCRIO {
		// A CRI-O node is an OpenShift node: the ocp overlay's agent settings (socket mount, SELinux type,
		// SCC). The SCC is applied through a minimal CRD but not enforced: that needs OpenShift.
		in.opts.Flavor = bundle.FlavorOCP
		installMinimalCRDs(t, env, sccCRD)
	}
	in.opts.UseHarness(env)
	t.Cleanup(in.cleanup)
	return in
}

func (in *instance) name() string          { return in.opts.Instance }
func (in *instance) labelKey() string      { return labelPrefix + in.opts.Instance }
func (in *instance) annotationKey() string { return annotationPrefix + in.opts.Instance }

// manifests builds the instance as it is now configured.
func (in *instance) manifests() []byte {
	in.t.Helper()
	root, err := bundle.Root()
	if err != nil {
		in.t.Fatal(err)
	}
	out, err := deploy.Build(root, in.t.TempDir(), in.opts)
	if err != nil {
		in.t.Fatal(err)
	}
	return out
}

// apply applies the instance's current manifests (or the given ones).
func (in *instance) apply(manifests ...[]byte) {
	in.t.Helper()
	var data []byte
	if len(manifests) > 0 {
		data = manifests[0]
	} else {
		data = in.manifests()
	}
	in.applied = append(in.applied, data)
	if out, err := kubectl(in.t, in.env, data, "apply", "-f", "-"); err != nil {
		in.t.Fatalf("kubectl apply %s: %v\n%s", in.name(), err, out)
	}
}

// rollout runs `kubectl rollout status` and returns its error (nil: complete).
func (in *instance) rollout(timeout time.Duration) (string, error) {
	in.t.Helper()
	return kubectl(in.t, in.env, nil, "-n", in.opts.Namespace, "rollout", "status", "daemonset/"+in.name(), "--timeout="+timeout.String())
}

func (in *instance) requireRollout(timeout time.Duration) {
	in.t.Helper()
	start := time.Now()
	if out, err := in.rollout(timeout); err != nil {
		in.t.Fatalf("rollout of %s: %v\n%s\n%s", in.name(), err, out, in.diagnose())
	}
	in.t.Logf("rollout of %s complete in %s", in.name(), time.Since(start).Round(100*time.Millisecond))
}

// waitLabel waits until the node's label of the instance has the value want.
func (in *instance) waitLabel(ctx context.Context, want string) *corev1.Node {
	in.t.Helper()
	var node *corev1.Node
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		n, err := in.cs.CoreV1().Nodes().Get(ctx, in.node, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		node = n
		return n.Labels[in.labelKey()] == want, nil
	})
	if err != nil {
		got := "(no node)"
		if node != nil {
			got = fmt.Sprintf("%q", node.Labels[in.labelKey()])
		}
		in.t.Fatalf("label %s: want %q, have %s: %v\n%s", in.labelKey(), want, got, err, in.diagnose())
	}
	return node
}

// pods lists the instance's agent pods.
func (in *instance) pods(ctx context.Context) []corev1.Pod {
	in.t.Helper()
	l, err := in.cs.CoreV1().Pods(in.opts.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + in.name()})
	if err != nil {
		in.t.Fatalf("list pods of %s: %v", in.name(), err)
	}
	return l.Items
}

// events returns the Node events the instance's agent recorded.
func (in *instance) events(ctx context.Context) []corev1.Event {
	in.t.Helper()
	l, err := in.cs.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + in.node})
	if err != nil {
		in.t.Fatalf("list node events: %v", err)
	}
	var mine []corev1.Event
	for _, e := range l.Items {
		if e.Source.Component == "image-prefetcher/"+in.name() {
			mine = append(mine, e)
		}
	}
	return mine
}

// logs returns the agent containers' log files of the instance (the kubelet's podLogsDir), read
// directly so the check covers every line the runtime wrote.
func (in *instance) logs() string {
	in.t.Helper()
	var b strings.Builder
	dirs, _ := filepath.Glob(filepath.Join(in.env.PodLogsDir, in.opts.Namespace+"_*"))
	for _, d := range dirs {
		_ = filepath.WalkDir(d, func(p string, de os.DirEntry, err error) error {
			if err == nil && !de.IsDir() {
				if data, err := os.ReadFile(p); err == nil {
					fmt.Fprintf(&b, "== %s\n%s", p, data)
				}
			}
			return nil
		})
	}
	return b.String()
}

// diagnose says what a failing test needs to know: pods, the agent's log, the instance's events.
func (in *instance) diagnose() string {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var b strings.Builder
	if l, err := in.cs.CoreV1().Pods(in.opts.Namespace).List(ctx, metav1.ListOptions{}); err == nil {
		for _, p := range l.Items {
			fmt.Fprintf(&b, "pod %s phase=%s node=%s", p.Name, p.Status.Phase, p.Spec.NodeName)
			for _, c := range p.Status.ContainerStatuses {
				fmt.Fprintf(&b, " %s ready=%v restarts=%d state=%+v", c.Name, c.Ready, c.RestartCount, c.State)
			}
			for _, c := range p.Status.Conditions {
				if c.Status != corev1.ConditionTrue {
					fmt.Fprintf(&b, " [%s=%s %s]", c.Type, c.Status, c.Message)
				}
			}
			b.WriteString("\n")
		}
	}
	logs := in.logs()
	if len(logs) > 6000 {
		logs = "...\n" + logs[len(logs)-6000:]
	}
	b.WriteString("agent logs:\n" + logs)
	if l, err := in.cs.CoreV1().Events(in.opts.Namespace).List(ctx, metav1.ListOptions{}); err == nil {
		for _, e := range l.Items {
			fmt.Fprintf(&b, "event %s %s/%s %s: %s\n", e.Type, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Reason, e.Message)
		}
	}
	return b.String()
}

// cleanup deletes the DaemonSet first and waits for its pods (a running agent could rewrite the
// label), then the label and annotation, then everything else the test applied.
func (in *instance) cleanup() {
	if len(in.applied) == 0 {
		return
	}
	t := in.t
	_, _ = kubectl(t, in.env, nil, "-n", in.opts.Namespace, "delete", "daemonset", in.name(), "--ignore-not-found", "--cascade=foreground", "--wait", "--timeout=90s")
	in.removeLabel()
	for i := len(in.applied) - 1; i >= 0; i-- {
		if out, err := kubectl(t, in.env, in.applied[i], "delete", "-f", "-", "--ignore-not-found", "--wait=false"); err != nil {
			t.Logf("cleanup of %s: %v\n%s", in.name(), err, out)
		}
	}
}

func (in *instance) removeLabel() {
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:null},"annotations":{%q:null}}}`, in.labelKey(), in.annotationKey())
	if _, err := in.cs.CoreV1().Nodes().Patch(context.Background(), in.node, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		in.t.Logf("cleanup: remove label of %s: %v", in.name(), err)
	}
}

// kubectl runs kubectl with the environment's admin kubeconfig.
func kubectl(t *testing.T, env *clusterenv.Env, stdin []byte, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return env.Kubectl(ctx, stdin, args...)
}

func refs(t *testing.T, env *clusterenv.Env, names ...string) []string { return env.Refs(t, names...) }

// removeImages removes images through CRI so the agent has to pull them (absent is fine).
func removeImages(ctx context.Context, t *testing.T, images runtimeapi.ImageServiceClient, refs []string) {
	t.Helper()
	for _, r := range refs {
		_, err := images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: r}})
		if err != nil && status.Code(err) != codes.NotFound {
			t.Fatalf("remove %s: %v", r, err)
		}
	}
}

// present reports which of refs are present on the node according to CRI.
func present(ctx context.Context, t *testing.T, images runtimeapi.ImageServiceClient, refs []string) (have, missing []string) {
	t.Helper()
	for _, r := range refs {
		st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: r}})
		if err != nil {
			t.Fatalf("image status %s: %v", r, err)
		}
		if st.Image != nil {
			have = append(have, r)
		} else {
			missing = append(missing, r)
		}
	}
	return have, missing
}

func requireAllPresent(ctx context.Context, t *testing.T, images runtimeapi.ImageServiceClient, refs []string) {
	t.Helper()
	if _, missing := present(ctx, t, images, refs); len(missing) > 0 {
		t.Fatalf("images missing on the node according to CRI: %v", missing)
	}
}
