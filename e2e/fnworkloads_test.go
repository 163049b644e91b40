package e2e_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/kustomize/kyaml/kio"

	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/deploy"
)

// TestScenarioWorkloadImages: an application's kustomization runs the KRM function as an exec
// transformer (fn/README.md, "kustomize: a transformer in the application's kustomization")
// with spec.fromWorkloads. The built application and instance are applied; the node ends
// `succeeded` for exactly the application's images (the agent's list digest on the node is the
// digest of those images alone), the opted-out workload's image is not in the list, and the
// application's pods, scheduled on the label, start without pulling. The storefront mounts a
// model as an image volume (Kubernetes 1.36+, containerd 2.1+): the function lists it, the agent
// prefetches it like an image, and the pod starts without pulling it and reads its weights.
func TestScenarioWorkloadImages(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 6*time.Minute)
	kustomize := kustomizeCLI(t)
	_, images := env.CRI(t)

	storefront, initImage := env.Image(t, "e2e/family:a").Ref, env.Image(t, "e2e/family:b").Ref
	// By digest: the list keeps it whole and the agent pulls it as written.
	report := env.Image(t, "e2e/random:12mib").DigestRef
	optedOut := env.Image(t, "e2e/small:10").Ref
	model := env.Image(t, "e2e/model:image").Ref
	appImages := []string{storefront, initImage, report, model}
	removeImages(ctx, t, images, appImages)

	in := newInstance(t, env, "workloads", nil)
	appNS := in.opts.Namespace + "-app"
	flavor := in.opts.Flavor
	if flavor == "" {
		flavor = bundle.FlavorVanilla
	}

	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	// The exec path in the configuration is relative to the kustomization, as `make fn-build`
	// and examples/workloads-kustomize lay it out.
	build := exec.Command("go", "build", "-o", filepath.Join(tmp, "bin", "image-prefetcher-fn"), "./fn/cmd/image-prefetcher-fn")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the KRM function: %v\n%s", err, out)
	}
	app := filepath.Join(tmp, "examples", "app")
	files := map[string]string{
		"kustomization.yaml": `apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- app.yaml
transformers:
- prefetcher.yaml
`,
		"prefetcher.yaml": fmt.Sprintf(`apiVersion: fn.image-prefetcher.stackrox.io/v1alpha1
kind: ImagePrefetcher
metadata:
  name: %s
  annotations:
    config.kubernetes.io/function: |
      exec:
        path: ../../bin/image-prefetcher-fn
spec:
  namespace: %s
  flavor: %s
  agentImage: %s
  fromWorkloads:
    namespaces: [%s]
`, in.name(), in.opts.Namespace, flavor, env.AgentImage, appNS),
		"app.yaml": appManifests(appNS, in.labelKey(), storefront, initImage, report, optedOut, model),
	}
	if err := os.MkdirAll(app, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(app, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	built := exec.CommandContext(ctx, kustomize, "build", "--enable-alpha-plugins", "--enable-exec", app)
	var stderr strings.Builder
	built.Stderr = &stderr
	rendered, err := built.Output()
	if err != nil {
		t.Fatalf("kustomize build --enable-alpha-plugins --enable-exec: %v\n%s", err, stderr.String())
	}

	// The list is the application's images, no more: not the opted-out one, not the agent's.
	list := renderedList(t, rendered, in.name())
	parsed := imagelist.Parse(strings.NewReader(list), "images.txt")
	var want []string
	for _, img := range appImages {
		ref, err := imagelist.Normalize(img)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, ref)
	}
	slices.Sort(want)
	if got := parsed.Refs(); !slices.Equal(got, want) || len(parsed.Errors) > 0 {
		t.Fatalf("the rendered list is %q (errors %v), want the application's images %q:\n%s", got, parsed.Errors, want, list)
	}
	wantDigest := imagelist.Parse(strings.NewReader(strings.Join(want, "\n")), "app").Digest

	wrap := filepath.Join(tmp, "e2e")
	if err := os.MkdirAll(wrap, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(wrap, "rendered.yaml"), rendered, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := deploy.Wrap(wrap, "rendered.yaml", in.opts); err != nil {
		t.Fatal(err)
	}
	manifests, err := bundle.Kustomize(wrap)
	if err != nil {
		t.Fatal(err)
	}
	in.apply(manifests)
	in.requireRollout(3 * time.Minute)
	node := in.waitLabel(ctx, "succeeded")
	if got := node.Annotations[in.annotationKey()]; got != wantDigest {
		t.Errorf("the node's list digest %q, want %q: the digest of exactly the application's images", got, wantDigest)
	}
	requireAllPresent(ctx, t, images, appImages)
	// Three images: the init container's, the web container's and the image volume's (the
	// kubelet says of each that it is already present).
	requireAppStartedWithoutPull(ctx, t, in, appNS, "app.kubernetes.io/name=storefront", 3)
}

// appManifests is a small shop: a storefront with an init container and a model mounted as an
// image volume (it starts only if the weights are there), scheduled only where the instance's
// label says succeeded; a suspended CronJob (its image by digest, never run); and an opted-out
// load test scaled to zero.
func appManifests(ns, labelKey, storefront, initImage, report, optedOut, model string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata:
  name: %[1]s
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: storefront
  namespace: %[1]s
  labels:
    app.kubernetes.io/name: storefront
spec:
  replicas: 1
  selector:
    matchLabels:
      app.kubernetes.io/name: storefront
  template:
    metadata:
      labels:
        app.kubernetes.io/name: storefront
    spec:
      nodeSelector:
        %[2]s: succeeded
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 1
      initContainers:
      - name: init
        image: %[4]s
        imagePullPolicy: IfNotPresent
        command: [/bin/true]
      containers:
      - name: web
        image: %[3]s
        imagePullPolicy: IfNotPresent
        command: [/bin/sh, -c, "test -s /models/model/weights.safetensors && exec /bin/sleep 3600"]
        volumeMounts:
        - name: model
          mountPath: /models
          readOnly: true
      volumes:
      - name: model
        image:
          reference: %[7]s
          pullPolicy: IfNotPresent
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: report
  namespace: %[1]s
spec:
  schedule: "0 3 * * *"
  suspend: true
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: report
            image: %[5]s
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: loadtest
  namespace: %[1]s
  annotations:
    image-prefetcher.stackrox.io/prefetch: "false"
spec:
  replicas: 0
  selector:
    matchLabels:
      app.kubernetes.io/name: loadtest
  template:
    metadata:
      labels:
        app.kubernetes.io/name: loadtest
    spec:
      containers:
      - name: k6
        image: %[6]s
`, ns, labelKey, storefront, initImage, report, optedOut, model)
}

// kustomizeCLI finds the kustomize CLI: $KUSTOMIZE (make e2e sets it) or kustomize on PATH.
func kustomizeCLI(t *testing.T) string {
	t.Helper()
	for _, c := range []string{os.Getenv("KUSTOMIZE"), "kustomize"} {
		if c == "" {
			continue
		}
		if p, err := exec.LookPath(c); err == nil {
			return p
		}
	}
	t.Fatalf("the kustomize CLI is needed to run exec functions (kubectl kustomize cannot): `make fn-tools`, then set KUSTOMIZE to the path it prints")
	return ""
}

// renderedList returns images.txt of the instance's list ConfigMap in manifests.
func renderedList(t *testing.T, manifests []byte, instance string) string {
	t.Helper()
	nodes, err := kio.FromBytes(manifests)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.GetKind() == "ConfigMap" && n.GetLabels()["app.kubernetes.io/instance"] == instance && strings.HasPrefix(n.GetName(), instance+"-images-") {
			return n.GetDataMap()["images.txt"]
		}
	}
	t.Fatalf("no list ConfigMap of %s in:\n%s", instance, manifests)
	return ""
}

// requireAppStartedWithoutPull waits for a running pod matching selector in ns and checks that the
// kubelet pulled none of its images (imgs in all: containers, init containers and image volumes):
// a Pulled "already present on machine" event each, no Pulling event.
func requireAppStartedWithoutPull(ctx context.Context, t *testing.T, in *instance, ns, selector string, imgs int) {
	t.Helper()
	cs := in.cs
	var pod corev1.Pod
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		l, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, err
		}
		for _, p := range l.Items {
			pod = p
			if p.Status.Phase == corev1.PodRunning {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("no running pod %s in %s: %v; last pod %s status %+v\n%s", selector, ns, err, pod.Name, pod.Status, in.diagnose())
	}
	if pod.Spec.NodeName != in.node {
		t.Errorf("pod %s on node %q, want %q", pod.Name, pod.Spec.NodeName, in.node)
	}
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
				return false, fmt.Errorf("the kubelet pulled for %s: %s", e.InvolvedObject.FieldPath, e.Message)
			case "Pulled":
				pulled = append(pulled, e.Message)
			}
		}
		return len(pulled) >= imgs, nil
	})
	if err != nil {
		t.Fatalf("pod %s: %v (Pulled events: %q)", pod.Name, err, pulled)
	}
	for _, m := range pulled {
		if !strings.Contains(m, "already present on machine") {
			t.Errorf("pod %s: Pulled event %q, want \"already present on machine\"", pod.Name, m)
		}
	}
	t.Logf("pod %s started from prefetched images: %q", pod.Name, pulled)
}
