// Smoke tests of the e2e environment itself: before any agent test runs, prove that the real stack pulls,
// authenticates and runs pods. They need `e2e/cluster.sh up` and IMAGE_PREFETCHER_E2E=1 (see clusterenv).
package e2e_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// removeImage makes sure the next pull really goes to the registry.
func removeImage(ctx context.Context, t *testing.T, images runtimeapi.ImageServiceClient, ref string) {
	t.Helper()
	_, err := images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil && status.Code(err) != codes.NotFound {
		t.Fatalf("remove %s: %v", ref, err)
	}
	st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		t.Fatalf("image status %s: %v", ref, err)
	}
	if st.Image != nil {
		t.Fatalf("%s still present after RemoveImage", ref)
	}
}

func TestCRIPullsFromLocalRegistry(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	ctx := ctxFor(t, 2*time.Minute)
	_, images := env.CRI(t)
	img := env.Image(t, "e2e/smoke:latest")
	removeImage(ctx, t, images, img.Ref)

	resp, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: img.Ref}})
	if err != nil {
		t.Fatalf("pull %s: %v", img.Ref, err)
	}
	st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: img.Ref}})
	if err != nil {
		t.Fatalf("image status %s: %v", img.Ref, err)
	}
	if st.Image == nil {
		t.Fatalf("%s not present after a successful pull (pull returned %q)", img.Ref, resp.ImageRef)
	}
	if st.Image.Id != resp.ImageRef {
		t.Errorf("ImageStatus id %q, PullImage returned %q", st.Image.Id, resp.ImageRef)
	}
	if !contains(st.Image.RepoDigests, img.DigestRef) {
		t.Errorf("repo digests %v do not include %s", st.Image.RepoDigests, img.DigestRef)
	}
	if st.Image.GetSize() < uint64(img.LayersBytes) {
		t.Errorf("size %d is less than the image's compressed layers (%d)", st.Image.GetSize(), img.LayersBytes)
	}

	// A digest reference pulls the same image.
	byDigest, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: img.DigestRef}})
	if err != nil {
		t.Fatalf("pull %s: %v", img.DigestRef, err)
	}
	if byDigest.ImageRef != resp.ImageRef {
		t.Errorf("pull by digest gave %q, by tag %q", byDigest.ImageRef, resp.ImageRef)
	}
}

func TestCRIPrivateImageNeedsCredentials(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	ctx := ctxFor(t, 2*time.Minute)
	_, images := env.CRI(t)
	img := env.Image(t, env.AuthRegistry+"/e2e/private:smoke")
	if !img.Private {
		t.Fatalf("%s is not marked private in the catalogue", img.Ref)
	}
	removeImage(ctx, t, images, img.Ref)
	spec := &runtimeapi.ImageSpec{Image: img.Ref}

	_, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: spec})
	assertUnauthorized(t, "anonymous pull", err)

	wrong := env.AuthConfig(t)
	wrong.Password += "-wrong"
	_, err = images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: spec, Auth: wrong})
	assertUnauthorized(t, "pull with a wrong password", err)

	if _, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: spec, Auth: env.AuthConfig(t)}); err != nil {
		t.Fatalf("pull %s with the right credentials: %v", img.Ref, err)
	}
	st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: spec})
	if err != nil || st.Image == nil {
		t.Fatalf("%s not present after an authenticated pull: %v", img.Ref, err)
	}
	if !contains(st.Image.RepoDigests, img.DigestRef) {
		t.Errorf("repo digests %v do not include %s", st.Image.RepoDigests, img.DigestRef)
	}
}

// assertUnauthorized checks that the agent's classifier reads what the runtime says for missing or bad
// credentials as Unauthorized (containerd and CRI-O word it differently: see runtime_test.go).
func assertUnauthorized(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s succeeded; want 401 Unauthorized", what)
	}
	if got := pull.Classify(err); got != pull.ReasonUnauthorized {
		t.Fatalf("%s: classified %s, want %s; error: %v", what, got, pull.ReasonUnauthorized, err)
	}
}

func TestNodeIsReady(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, time.Minute)
	node, err := env.Clientset(t).CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get node %s: %v", env.NodeName, err)
	}
	ready := false
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady {
			ready = c.Status == corev1.ConditionTrue
		}
	}
	if !ready {
		t.Fatalf("node %s is not Ready: %+v", env.NodeName, node.Status.Conditions)
	}
	if got := node.Status.NodeInfo.KubeletVersion; got != env.KubeVersion {
		t.Errorf("kubelet version %s, want %s", got, env.KubeVersion)
	}
	// The kubelet reports "<runtime name>://<version>" as the runtime answers CRI Version.
	want := "containerd://"
	if env.Runtime == clusterenv.RuntimeCRIO {
		want = "cri-o://"
	}
	// The kubelet parses the version as semver: containerd's leading "v" and a distribution suffix such as
	// Debian's "~ds1" are gone.
	v := strings.TrimPrefix(env.RuntimeVersion, "v")
	if i := strings.IndexAny(v, "~+-"); i >= 0 {
		v = v[:i]
	}
	want += v
	if got := node.Status.NodeInfo.ContainerRuntimeVersion; got != want {
		t.Errorf("runtime %q, want %s", got, want)
	}
}

func TestPodRunsOnNode(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 3*time.Minute)
	cs := env.Clientset(t)
	ns, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "e2e-smoke-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	t.Cleanup(func() {
		_ = cs.CoreV1().Namespaces().Delete(context.Background(), ns.Name, metav1.DeleteOptions{})
	})
	// Pods need the namespace's default ServiceAccount, which the controller-manager creates shortly after.
	if err := wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		_, err := cs.CoreV1().ServiceAccounts(ns.Name).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, client(err)
	}); err != nil {
		t.Fatalf("default ServiceAccount in %s: %v", ns.Name, err)
	}

	const greeting = "hello from the e2e node"
	busybox := env.Image(t, "e2e/busybox:latest")
	grace := int64(1)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "busybox"},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name: "sh", Image: busybox.Ref, ImagePullPolicy: corev1.PullIfNotPresent,
				Command: []string{"/bin/sh", "-c", "echo " + greeting + "; exec sleep 3600"},
			}},
		},
	}
	if _, err := cs.CoreV1().Pods(ns.Name).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	var running *corev1.Pod
	if err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		p, err := cs.CoreV1().Pods(ns.Name).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, client(err)
		}
		running = p
		if p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded {
			return false, nil
		}
		return p.Status.Phase == corev1.PodRunning, nil
	}); err != nil {
		t.Fatalf("pod did not run: %v; last status: %+v", err, running.Status)
	}
	if running.Spec.NodeName != env.NodeName {
		t.Errorf("pod on node %q, want %q", running.Spec.NodeName, env.NodeName)
	}
	// The pod network (CNI bridge) gave it an address of its own.
	if running.Status.PodIP == "" || running.Status.PodIP == env.NodeIP {
		t.Errorf("pod IP %q: want an address from the CNI bridge", running.Status.PodIP)
	}
	// Logs through the API server prove the kubelet's server is reachable and authenticates it.
	var logs []byte
	if err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		logs, err = cs.CoreV1().Pods(ns.Name).GetLogs(pod.Name, &corev1.PodLogOptions{}).DoRaw(ctx)
		return err == nil && strings.Contains(string(logs), greeting), nil
	}); err != nil {
		t.Fatalf("pod logs through the API server: %v (last: %q)", err, logs)
	}
}

// client turns "not yet there" answers into a retry and everything else into a failure.
func client(err error) error {
	if err == nil || apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
