package e2e_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/deploy"
	"github.com/nodeprefetch/image-prefetcher/internal/recipe"
)

// The names the README's quick start and docs/bundle.md's uninstall recipe use.
const (
	docNamespace = "prefetch-images"
	docInstance  = "my-images"
)

// TestDocQuickStartAndUninstall runs the README's quick start from its own text on the real
// cluster, in a copy of the repository as a user has it, then docs/bundle.md's uninstall recipe,
// also from its text. Two things differ from a user's cluster, both said here: the registry is the
// harness's (the text's example registry is replaced), and `kubectl apply -k overlays/vanilla`
// applies the harness's e2e layer over that same overlay (this cluster has no kube-proxy: see
// e2e/deploy). $EDITOR is a program that writes the list, as a user's editor would.
func TestDocQuickStartAndUninstall(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	readme, err := recipe.ParseFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	quick, err := recipe.Find(readme, "quick-start")
	if err != nil {
		t.Fatal(err)
	}
	docs, err := recipe.ParseFile(filepath.Join(root, "docs", "bundle.md"))
	if err != nil {
		t.Fatal(err)
	}
	uninstall, err := recipe.Find(docs, "uninstall")
	if err != nil {
		t.Fatal(err)
	}

	dir := copyCheckout(t, root)
	list := refs(t, env, "e2e/family:a", "e2e/random:4mib")
	_, images := env.CRI(t)
	ctx := ctxFor(t, 10*time.Minute)
	removeImages(ctx, t, images, list)
	cs := env.Clientset(t)
	t.Cleanup(func() {
		_, _ = kubectl(t, env, nil, "delete", "namespace", docNamespace, "--ignore-not-found", "--wait=false")
		_, _ = kubectl(t, env, nil, "delete", "clusterrole,clusterrolebinding", "-l", "app.kubernetes.io/instance="+docInstance, "--ignore-not-found")
		_, _ = kubectl(t, env, nil, "label", "nodes", "--all", labelPrefix+docInstance+"-")
		_, _ = kubectl(t, env, nil, "annotate", "nodes", "--all", annotationPrefix+docInstance+"-")
	})

	// The quick start up to the apply, as written but for the registry.
	const exampleRegistry = "registry.example.com/platform"
	const apply = "kubectl apply -k overlays/vanilla"
	script := quick.Script()
	before, after, ok := strings.Cut(script, apply)
	if !ok || !strings.Contains(before, exampleRegistry) {
		t.Fatalf("README's quick start no longer has %q and %q where this test substitutes the harness's:\n%s", exampleRegistry, apply, script)
	}
	editor := filepath.Join(t.TempDir(), "editor")
	if err := os.WriteFile(editor, []byte("#!/bin/sh\nprintf '%s\\n' "+strings.Join(list, " ")+" > \"$1\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	shell := func(script string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", script)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "KUBECONFIG="+env.Kubeconfig, "EDITOR="+editor)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			t.Fatalf("%v\n%s\n--- output:\n%s", err, script, out.String())
		}
		return out.String()
	}
	out := shell(strings.ReplaceAll(before, exampleRegistry, env.Registry))
	t.Logf("quick start, before the apply:\n%s", out)

	// make image-push pinned the pushed digest in the overlay: the e2e layer keeps that image.
	pinned := pinnedImage(t, filepath.Join(dir, "overlays", "vanilla", "kustomization.yaml"))
	if !strings.HasPrefix(pinned, env.Registry+"/image-prefetcher@sha256:") || !strings.Contains(out, pinned) {
		t.Fatalf("overlays/vanilla pins %q, want the digest reference make image-push printed", pinned)
	}
	opts := deploy.Options{Namespace: docNamespace, Instance: docInstance, AgentImage: pinned, ListenPort: freePort(t)}
	opts.UseHarness(env)
	if err := deploy.Wrap(filepath.Join(dir, "e2e-layer"), "../overlays/vanilla", opts); err != nil {
		t.Fatal(err)
	}
	out = shell("kubectl apply -k e2e-layer" + after)
	t.Logf("quick start, from the apply:\n%s", out)
	if !strings.Contains(out, "successfully rolled out") {
		t.Errorf("the quick start's rollout status did not complete:\n%s", out)
	}
	node, err := cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := node.Labels[labelPrefix+docInstance]; got != "succeeded" {
		t.Fatalf("after the quick start the node says %s=%q, want succeeded", labelPrefix+docInstance, got)
	}
	requireAllPresent(ctx, t, images, list)
	ds, err := cs.AppsV1().DaemonSets(docNamespace).Get(ctx, docInstance, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := ds.Spec.Template.Spec.Containers[0].Image; got != pinned {
		t.Errorf("the agent runs %s, want the pinned %s", got, pinned)
	}

	// The memory request covers what the agent holds at rest (the kubelet evicts pods over their
	// request first under memory pressure).
	rss := agentRSS(ctx, t, env, docNamespace)
	request := ds.Spec.Template.Spec.Containers[0].Resources.Requests.Memory()
	t.Logf("agent resident memory after the quick start's pass: %.1f MiB; request %s", float64(rss)/(1<<20), request)
	if rss > request.Value() {
		t.Errorf("the agent holds %d bytes at rest, above its memory request %s", rss, request)
	}

	// The uninstall recipe, as written: nothing of the instance is left, the namespace stays.
	out = shell(uninstall.Script())
	t.Logf("uninstall:\n%s", out)
	sel := "app.kubernetes.io/instance=" + docInstance
	if out, err := kubectl(t, env, nil, "get", "-n", docNamespace, "-l", sel, "-o", "name",
		"daemonset,serviceaccount,configmap,secret,role,rolebinding,lease.coordination.k8s.io,clusterrole,clusterrolebinding"); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("after the uninstall recipe (err %v) these objects of the instance are left:\n%s", err, out)
	}
	node, err = cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{labelPrefix + docInstance, annotationPrefix + docInstance} {
		if v, ok := node.Labels[k]; ok {
			t.Errorf("after the uninstall recipe the node keeps the label %s=%s", k, v)
		}
		if v, ok := node.Annotations[k]; ok {
			t.Errorf("after the uninstall recipe the node keeps the annotation %s=%s", k, v)
		}
	}
}

// copyCheckout copies the files git tracks at root (the working tree's content) to a new
// directory: a user's clone, so the recipes may edit it.
func copyCheckout(t *testing.T, root string) string {
	t.Helper()
	out, err := exec.Command("git", "-C", root, "ls-files", "-z").Output()
	if err != nil {
		t.Fatalf("git ls-files: %v", err)
	}
	dir := t.TempDir()
	for _, f := range strings.Split(strings.TrimRight(string(out), "\x00"), "\x00") {
		data, err := os.ReadFile(filepath.Join(root, f))
		if os.IsNotExist(err) {
			continue // deleted in the working tree
		}
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, data, fi.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// pinnedImage is the image the overlay's `images:` sets for the agent, as name@digest.
func pinnedImage(t *testing.T, kustomization string) string {
	t.Helper()
	raw, err := os.ReadFile(kustomization)
	if err != nil {
		t.Fatal(err)
	}
	k, err := yaml.Parse(string(raw))
	if err != nil {
		t.Fatal(err)
	}
	img, err := k.Pipe(yaml.Lookup("images", "[name=image-prefetcher]"))
	if err != nil || img == nil {
		t.Fatalf("%s sets no image-prefetcher image: %v", kustomization, err)
	}
	name, digest := yaml.GetValue(img.Field("newName").Value), ""
	if f := img.Field("digest"); f != nil {
		digest = yaml.GetValue(f.Value)
	}
	return name + "@" + digest
}

// agentRSS is the resident memory of the agent container of the namespace's pod on this node,
// from /proc of the process the runtime reports for it.
func agentRSS(ctx context.Context, t *testing.T, env *clusterenv.Env, namespace string) int64 {
	t.Helper()
	rt, _ := env.CRI(t)
	list, err := rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{
		State: &runtimeapi.ContainerStateValue{State: runtimeapi.ContainerState_CONTAINER_RUNNING},
		LabelSelector: map[string]string{
			"io.kubernetes.pod.namespace":  namespace,
			"io.kubernetes.container.name": "agent",
		},
	}})
	if err != nil || len(list.GetContainers()) != 1 {
		t.Fatalf("the running agent container of %s: %v (%d found)", namespace, err, len(list.GetContainers()))
	}
	st, err := rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: list.Containers[0].Id, Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal([]byte(st.GetInfo()["info"]), &info); err != nil || info.Pid == 0 {
		t.Fatalf("no pid in the runtime's verbose container status (%v): %.300s", err, st.GetInfo()["info"])
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", info.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("VmRSS %q: %v", v, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", info.Pid)
	return 0
}
