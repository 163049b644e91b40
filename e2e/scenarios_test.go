// The end-to-end scenarios of the bundle on the real single-node cluster: each deploys real
// manifests built from the repository's overlays (plus the e2e layer of e2e/deploy) with kubectl,
// and asserts on the real API server, kubelet and containerd. They run one after another (the
// node is shared) and use their own instance names, namespaces and images.
package e2e_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/deploy"
)

// workload runs a Deployment of one sleeping container of image in the instance's namespace,
// scheduled only where the instance's label says succeeded, and checks that the kubelet started
// it without pulling: its Pulled event says "already present on machine" and there is no
// Pulling event.
func workload(ctx context.Context, t *testing.T, in *instance, name, image string, policy corev1.PullPolicy) {
	t.Helper()
	createSleeper(ctx, t, in, name, image, policy, map[string]string{in.labelKey(): "succeeded"})
	requireStartedWithoutPull(ctx, t, in, name, image, policy)
}

// createSleeper creates the Deployment of workload, with nodeSelector (none: nil).
func createSleeper(ctx context.Context, t *testing.T, in *instance, name, image string, policy corev1.PullPolicy, nodeSelector map[string]string) {
	t.Helper()
	replicas := int32(1)
	grace := int64(1)
	labels := map[string]string{"app": name}
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					NodeSelector:                  nodeSelector,
					TerminationGracePeriodSeconds: &grace,
					AutomountServiceAccountToken:  new(bool),
					Containers: []corev1.Container{{
						Name: "app", Image: image, ImagePullPolicy: policy,
						Command: []string{"/bin/sleep", "3600"},
					}},
				},
			},
		},
	}
	if _, err := in.cs.AppsV1().Deployments(in.opts.Namespace).Create(ctx, d, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create deployment %s: %v", name, err)
	}
}

// requireStartedWithoutPull waits for the running pod of createSleeper's Deployment name and checks
// that the kubelet started it on the node without pulling.
func requireStartedWithoutPull(ctx context.Context, t *testing.T, in *instance, name, image string, policy corev1.PullPolicy) {
	t.Helper()
	cs := in.cs
	ns := in.opts.Namespace
	var pod corev1.Pod
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		l, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + name})
		if err != nil {
			return false, err
		}
		for _, p := range l.Items {
			pod = p
			for _, c := range p.Status.ContainerStatuses {
				if c.State.Running != nil {
					return true, nil
				}
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("deployment %s (%s, %s): no running pod: %v; last pod %s status %+v", name, image, policy, err, pod.Name, pod.Status)
	}
	if pod.Spec.NodeName != in.node {
		t.Errorf("pod %s on node %q, want %q", pod.Name, pod.Spec.NodeName, in.node)
	}
	// The kubelet records Pulled right before creating the container; the event can land a
	// moment after the container runs.
	var pulled []string
	err = wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		l, err := cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.kind=Pod,involvedObject.name=" + pod.Name})
		if err != nil {
			return false, err
		}
		pulled = nil
		for _, e := range l.Items {
			switch e.Reason {
			case "Pulling":
				return false, fmt.Errorf("the kubelet pulled %s: %s", image, e.Message)
			case "Pulled":
				pulled = append(pulled, e.Message)
			}
		}
		return len(pulled) > 0, nil
	})
	if err != nil {
		t.Fatalf("pod %s: %v", pod.Name, err)
	}
	for _, m := range pulled {
		if !strings.Contains(m, "already present on machine") {
			t.Errorf("pod %s (%s): Pulled event %q, want \"already present on machine\"", pod.Name, policy, m)
		}
	}
	t.Logf("pod %s (%s, imagePullPolicy %s) started from the prefetched image: %q", pod.Name, image, policy, pulled)
}

// Scenario 1: the README's quick start on the real cluster.
func TestScenarioQuickStart(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	_, images := env.CRI(t)
	list := refs(t, env, "e2e/family:a", "e2e/family:b", "e2e/family:c", "e2e/random:4mib", "e2e/random:8mib")
	removeImages(ctx, t, images, list)

	in := newInstance(t, env, "quick", list)
	in.apply()
	in.requireRollout(3 * time.Minute)
	node := in.waitLabel(ctx, "succeeded")
	if node.Annotations[in.annotationKey()] == "" {
		t.Errorf("no list annotation %s next to the label", in.annotationKey())
	}
	requireAllPresent(ctx, t, images, list)

	workload(ctx, t, in, "app-ifnotpresent", list[0], corev1.PullIfNotPresent)
	workload(ctx, t, in, "app-never", list[1], corev1.PullNever)
}

// Scenario 2: a missing tag fails the node's label, stops the rollout and is named in a Node event.
func TestScenarioMissingTag(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	missing := env.Registry + "/e2e/random:no-such-tag"
	list := append(refs(t, env, "e2e/small:10"), missing)

	in := newInstance(t, env, "missing", list)
	in.apply()
	in.waitLabel(ctx, "failed")

	var found bool
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		for _, e := range in.events(ctx) {
			if e.Type == corev1.EventTypeWarning && e.Reason == "PrefetchFailed" &&
				strings.Contains(e.Message, missing) && strings.Contains(e.Message, "NotFound") {
				found = true
			}
		}
		return found, nil
	})
	if err != nil {
		t.Fatalf("no PrefetchFailed Node event of %s names %s with reason NotFound: %v", in.name(), missing, err)
	}

	// The rollout does not complete: the pod runs but is not Ready.
	if out, err := in.rollout(10 * time.Second); err == nil {
		t.Fatalf("rollout of %s completed with a missing image:\n%s", in.name(), out)
	}
	pods := in.pods(ctx)
	if len(pods) != 1 {
		t.Fatalf("%d agent pods, want 1", len(pods))
	}
	for _, c := range pods[0].Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			t.Errorf("agent pod %s is Ready with a missing image", pods[0].Name)
		}
	}
	if pods[0].Status.Phase != corev1.PodRunning {
		t.Errorf("agent pod %s is %s, want Running (not ready, not crashing)", pods[0].Name, pods[0].Status.Phase)
	}
}

// nodeState is the instance's label and list annotation as one watch event showed them.
type nodeState struct {
	label, list string
	hasLabel    bool
	at          time.Time
}

func (s nodeState) String() string {
	l := "(no label)"
	if s.hasLabel {
		l = s.label
	}
	d := s.list
	if len(d) > 12 {
		d = d[:12]
	}
	return fmt.Sprintf("%s list=%s at %s", l, d, s.at.Format("15:04:05.000"))
}

// Scenario 3: a list change rolls the DaemonSet and the label never claims the old list once the
// new pod works on the new one.
func TestScenarioListChange(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	_, images := env.CRI(t)
	oldList := refs(t, env, "e2e/small:11", "e2e/small:12")
	newList := refs(t, env, "e2e/small:11", "e2e/small:13", "e2e/random:12mib")
	removeImages(ctx, t, images, newList[1:])

	in := newInstance(t, env, "change", oldList)
	in.apply()
	in.requireRollout(3 * time.Minute)
	node := in.waitLabel(ctx, "succeeded")
	oldDigest := node.Annotations[in.annotationKey()]
	if oldDigest == "" {
		t.Fatalf("no list annotation after succeeded")
	}
	oldPods := in.pods(ctx)

	w, err := in.cs.CoreV1().Nodes().Watch(ctx, metav1.ListOptions{
		FieldSelector:   "metadata.name=" + env.NodeName,
		ResourceVersion: node.ResourceVersion,
	})
	if err != nil {
		t.Fatalf("watch node: %v", err)
	}
	defer w.Stop()

	in.opts.Images = newList
	in.apply()

	var states []nodeState
	done := false
	for !done {
		select {
		case <-ctx.Done():
			t.Fatalf("no succeeded for the new list; states seen: %+v\n%s", states, in.diagnose())
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatalf("node watch closed; states seen: %+v", states)
			}
			if ev.Type == watch.Error {
				t.Fatalf("node watch: %+v", ev.Object)
			}
			n, ok := ev.Object.(*corev1.Node)
			if !ok {
				continue
			}
			label, has := n.Labels[in.labelKey()]
			s := nodeState{label: label, hasLabel: has, list: n.Annotations[in.annotationKey()], at: time.Now()}
			if len(states) > 0 && states[len(states)-1].label == s.label && states[len(states)-1].list == s.list && states[len(states)-1].hasLabel == s.hasLabel {
				continue // another instance's or the kubelet's update
			}
			states = append(states, s)
			done = s.list != oldDigest && s.label == "succeeded"
			if s.list != oldDigest && s.label == "failed" {
				t.Fatalf("the new list failed; states: %+v\n%s", states, in.diagnose())
			}
		}
	}
	t.Logf("old list %.12s; label/annotation states after the new list was applied: %v", oldDigest, states)

	// From the first state that names the new list on, the old list is never claimed, and that
	// first state carries no label (removed in the same update that recorded the new digest).
	first := -1
	for i, s := range states {
		if s.list != oldDigest && first < 0 {
			first = i
			if s.hasLabel {
				t.Errorf("the new list's digest appeared with label %q: want the label removed in the same update", s.label)
			}
		}
		if first >= 0 && s.list == oldDigest && s.label == "succeeded" {
			t.Errorf("state %d: succeeded for the old list after the new list started: %+v", i, states)
		}
	}
	final := states[len(states)-1]
	if final.list == oldDigest || final.list == "" {
		t.Errorf("final list annotation %q, want the new list's digest (old %q)", final.list, oldDigest)
	}
	requireAllPresent(ctx, t, images, newList)
	in.requireRollout(2 * time.Minute)

	// The DaemonSet really rolled: a new pod from a new template.
	newPods := in.pods(ctx)
	if len(newPods) != 1 || len(oldPods) != 1 || newPods[0].UID == oldPods[0].UID {
		t.Errorf("pods before %v, after %v: want one new pod", podNames(oldPods), podNames(newPods))
	} else if newPods[0].Labels["controller-revision-hash"] == oldPods[0].Labels["controller-revision-hash"] {
		t.Errorf("new pod %s has the old revision", newPods[0].Name)
	}
}

func podNames(pods []corev1.Pod) []string {
	var n []string
	for _, p := range pods {
		n = append(n, p.Name)
	}
	return n
}

// Scenario 4: a private image needs the pull-secret component; the password never leaks into
// pod logs or events. Also what the kubelet's ensure-secret-pulled-images check does with an image
// the agent pulled with credentials.
func TestScenarioPrivateImage(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	_, images := env.CRI(t)
	private := env.Image(t, env.AuthRegistry+"/e2e/private:latest").Ref
	list := []string{private}
	removeImages(ctx, t, images, list)
	secret, err := os.ReadFile(env.AuthDockerConfig)
	if err != nil {
		t.Fatalf("read the auth registry's dockerconfigjson: %v", err)
	}
	password := env.AuthPassword(t)

	in := newInstance(t, env, "private", list)
	// Without credentials: failed, with the reason in a Node event.
	in.apply()
	in.waitLabel(ctx, "failed")
	err = wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		for _, e := range in.events(ctx) {
			if e.Reason == "PrefetchFailed" && strings.Contains(e.Message, private) && strings.Contains(e.Message, "Unauthorized") {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Errorf("no PrefetchFailed event names %s with reason Unauthorized: %v", private, err)
	}

	// With the pull-secret component and the real credentials: succeeded.
	in.opts.Components = []string{"pull-secret"}
	in.opts.PullSecret = secret
	in.apply()
	in.requireRollout(3 * time.Minute)
	in.waitLabel(ctx, "succeeded")
	requireAllPresent(ctx, t, images, list)

	// A pod without imagePullSecrets runs the private image the agent pulled: with the kubelet's
	// default imagePullCredentialsVerificationPolicy NeverVerifyPreloadedImages (1.35, feature
	// KubeletEnsureSecretPulledImages on by default), an image the kubelet did not pull itself is
	// not re-verified. See e2e/README.md.
	workload(ctx, t, in, "private-ifnotpresent", private, corev1.PullIfNotPresent)
	workload(ctx, t, in, "private-never", private, corev1.PullNever)

	// The password (and its base64 form in the secret) is in no pod log and no event.
	logs := in.logs()
	if logs == "" {
		t.Fatalf("no agent log files under %s for %s", env.PodLogsDir, in.opts.Namespace)
	}
	leaks := []string{password}
	for _, field := range strings.Split(string(secret), `"`) {
		if len(field) > 16 && !strings.ContainsAny(field, "{}:") {
			leaks = append(leaks, field) // the base64 user:password "auth" value
		}
	}
	var all []corev1.Event
	for _, ns := range []string{metav1.NamespaceDefault, in.opts.Namespace} {
		l, err := in.cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, l.Items...)
	}
	for _, leak := range leaks {
		if strings.Contains(logs, leak) {
			t.Errorf("a credential appears in the agent's pod logs")
		}
		for _, e := range all {
			if strings.Contains(e.Message, leak) {
				t.Errorf("a credential appears in event %s/%s", e.Namespace, e.Name)
			}
		}
	}
	if !strings.Contains(logs, private) {
		t.Errorf("the agent's logs never name %s: the leak check read the wrong files", private)
	}
}

// Scenario 5: two instances on one node, each with its own label; removing one leaves the other.
func TestScenarioTwoInstances(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	a := newInstance(t, env, "two-a", refs(t, env, "e2e/small:15"))
	b := newInstance(t, env, "two-b", refs(t, env, "e2e/small:16"), "max-concurrent-nodes")
	a.apply()
	b.apply()
	a.requireRollout(3 * time.Minute)
	b.requireRollout(3 * time.Minute)
	a.waitLabel(ctx, "succeeded")
	node := b.waitLabel(ctx, "succeeded")
	if node.Labels[a.labelKey()] != "succeeded" {
		t.Fatalf("label %s = %q once b succeeded", a.labelKey(), node.Labels[a.labelKey()])
	}
	if node.Annotations[a.annotationKey()] == "" || node.Annotations[b.annotationKey()] == "" ||
		node.Annotations[a.annotationKey()] == node.Annotations[b.annotationKey()] {
		t.Errorf("list annotations a=%q b=%q: want one per instance, different lists",
			node.Annotations[a.annotationKey()], node.Annotations[b.annotationKey()])
	}
	bList := node.Annotations[b.annotationKey()]

	// Delete a's objects (as docs/bundle.md's uninstall says) and its label; b is untouched.
	a.cleanup()
	a.applied = nil
	if out, err := kubectl(t, env, nil, "wait", "--for=delete", "namespace/"+a.opts.Namespace, "--timeout=2m"); err != nil {
		t.Fatalf("namespace %s not deleted: %v\n%s", a.opts.Namespace, err, out)
	}
	if out, err := b.rollout(time.Minute); err != nil {
		t.Fatalf("b's rollout after a was deleted: %v\n%s", err, out)
	}
	n, err := b.cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Labels[b.labelKey()] != "succeeded" || n.Annotations[b.annotationKey()] != bList {
		t.Errorf("after deleting a: b's label %q annotation %q, want succeeded and %q",
			n.Labels[b.labelKey()], n.Annotations[b.annotationKey()], bList)
	}
	if _, has := n.Labels[a.labelKey()]; has {
		t.Errorf("a's label is still on the node after its removal")
	}
}

// Scenario 8: an image removed behind the agent's back is pulled again at the next re-check.
func TestScenarioRecheckRepullsRemovedImage(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	_, images := env.CRI(t)
	list := refs(t, env, "e2e/small:18", "e2e/small:19")
	in := newInstance(t, env, "recheck", list)
	in.opts.RecheckInterval = "3s"
	in.apply()
	in.requireRollout(3 * time.Minute)
	in.waitLabel(ctx, "succeeded")

	removeImages(ctx, t, images, list[1:])
	if _, missing := present(ctx, t, images, list[1:]); len(missing) != 1 {
		t.Fatalf("%s still present after RemoveImage", list[1])
	}
	removed := time.Now()
	err := wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		_, missing := present(ctx, t, images, list)
		return len(missing) == 0, nil
	})
	if err != nil {
		t.Fatalf("%s not pulled again: %v\n%s", list[1], err, in.diagnose())
	}
	t.Logf("%s present again %s after its removal", list[1], time.Since(removed).Round(100*time.Millisecond))
	in.waitLabel(ctx, "succeeded")
	if out, err := in.rollout(time.Minute); err != nil {
		t.Errorf("rollout after the re-pull: %v\n%s", err, out)
	}
}

// Scenario 7: the KRM function path: examples/kpt-package rendered with `kpt fn render
// --allow-exec` and applied (with the e2e layer) gives what the quick start gives.
func TestScenarioKptFunction(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	kpt, err := exec.LookPath("kpt")
	if err != nil {
		t.Fatalf("kpt is needed for the KRM function path: %v", err)
	}
	_, images := env.CRI(t)
	list := refs(t, env, "e2e/family:c", "e2e/random:16mib", "e2e/small:07", "e2e/small:08", "e2e/small:09")
	removeImages(ctx, t, images, list)
	in := newInstance(t, env, "kpt", list)

	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	pkg := filepath.Join(tmp, "examples", "kpt-package")
	if err := os.CopyFS(pkg, os.DirFS(filepath.Join(root, "examples", "kpt-package"))); err != nil {
		t.Fatal(err)
	}
	// The Kptfile's exec path is ../../bin/image-prefetcher-fn, as `make fn-build` leaves it.
	build := exec.Command("go", "build", "-o", filepath.Join(tmp, "bin", "image-prefetcher-fn"), "./fn/cmd/image-prefetcher-fn")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the KRM function: %v\n%s", err, out)
	}
	config := fmt.Sprintf(`# The instance; rendered by the e2e test.
apiVersion: fn.image-prefetcher.stackrox.io/v1alpha1
kind: ImagePrefetcher
metadata:
  name: %s
  annotations:
    config.kubernetes.io/local-config: "true"
spec:
  namespace: %s
  agentImage: %s
  images:
  - %s
`, in.name(), in.opts.Namespace, env.AgentImage, strings.Join(list, "\n  - "))
	if err := os.WriteFile(filepath.Join(pkg, "prefetcher.yaml"), []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	render := exec.CommandContext(ctx, kpt, "fn", "render", "--allow-exec")
	render.Dir = pkg
	if out, err := render.CombinedOutput(); err != nil {
		t.Fatalf("kpt fn render --allow-exec: %v\n%s", err, out)
	}
	var rendered []string
	entries, err := os.ReadDir(pkg)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == "Kptfile" || e.Name() == "prefetcher.yaml" || !strings.HasSuffix(e.Name(), ".yaml") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(pkg, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		rendered = append(rendered, string(data))
	}
	if len(rendered) == 0 {
		t.Fatalf("kpt fn render wrote no manifests into %s", pkg)
	}
	wrap := filepath.Join(tmp, "e2e")
	if err := os.MkdirAll(wrap, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(wrap, "rendered.yaml"), []byte(strings.Join(rendered, "\n---\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := deploy.Wrap(wrap, "rendered.yaml", in.opts); err != nil {
		t.Fatal(err)
	}
	manifests, err := bundle.Kustomize(wrap)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(manifests), "app.kubernetes.io/managed-by: image-prefetcher-fn") {
		t.Fatalf("the applied manifests are not the function's output:\n%s", manifests)
	}

	in.apply(manifests)
	in.requireRollout(3 * time.Minute)
	node := in.waitLabel(ctx, "succeeded")
	if node.Annotations[in.annotationKey()] == "" {
		t.Errorf("no list annotation %s next to the label", in.annotationKey())
	}
	requireAllPresent(ctx, t, images, list)
	workload(ctx, t, in, "app", list[0], corev1.PullIfNotPresent)
}
