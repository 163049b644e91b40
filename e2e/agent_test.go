// Real-component tests of the agent binary: `image-prefetcher fetch` against
// the harness's containerd and registries (runtime mode), and its node label
// against the real kube-apiserver (full mode).
package e2e_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

var (
	agentOnce sync.Once
	agentBin  string
	agentErr  error
)

// TestMain removes the agent binary built for the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if agentBin != "" {
		os.RemoveAll(filepath.Dir(agentBin))
	}
	os.Exit(code)
}

// agentBinary builds the agent once per test binary.
func agentBinary(t *testing.T) string {
	t.Helper()
	agentOnce.Do(func() {
		dir, err := os.MkdirTemp("", "image-prefetcher-e2e-bin")
		if err != nil {
			agentErr = err
			return
		}
		agentBin = filepath.Join(dir, "image-prefetcher")
		out, err := exec.Command("go", "build", "-o", agentBin, "github.com/nodeprefetch/image-prefetcher/agent/cmd/image-prefetcher").CombinedOutput()
		if err != nil {
			agentErr = fmt.Errorf("go build agent: %v\n%s", err, out)
		}
	})
	if agentErr != nil {
		t.Fatal(agentErr)
	}
	return agentBin
}

type fetchRun struct {
	code   int
	output string
	took   time.Duration
}

// fetch runs `image-prefetcher fetch` with the list and extra flags.
func fetch(t *testing.T, env *clusterenv.Env, images []string, flags ...string) fetchRun {
	t.Helper()
	list := filepath.Join(t.TempDir(), "images.txt")
	if err := os.WriteFile(list, []byte("# e2e list\n"+strings.Join(images, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"fetch", "--cri-socket", env.CRISocket, "--image-list-file", list}, flags...)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, agentBinary(t), args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	run := fetchRun{output: out.String(), took: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		run.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run agent: %v", err)
	}
	t.Logf("image-prefetcher %s: exit %d in %s", strings.Join(args, " "), run.code, run.took.Round(time.Millisecond))
	return run
}

func removeAll(t *testing.T, images runtimeapi.ImageServiceClient, refs []string) {
	t.Helper()
	ctx := ctxFor(t, time.Minute)
	for _, r := range refs {
		removeImage(ctx, t, images, r)
	}
}

func requirePresent(t *testing.T, images runtimeapi.ImageServiceClient, refs []string) {
	t.Helper()
	ctx := ctxFor(t, time.Minute)
	for _, r := range refs {
		st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: r}})
		if err != nil {
			t.Fatalf("image status %s: %v", r, err)
		}
		if st.Image == nil {
			t.Errorf("%s is not present on the node", r)
		}
	}
}

// attemptsFor returns how many pull attempts the agent logged for image.
func attemptsFor(output, image string) int {
	// Other attributes (instance, node) may stand between the message and the image.
	re := regexp.MustCompile(`msg="pull attempt (succeeded|failed)"[^\n]*? image=` + regexp.QuoteMeta(image) + ` `)
	return len(re.FindAllString(output, -1))
}

func TestAgentFetchTwentyImagesFromRealRegistry(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	_, images := env.CRI(t)
	var refs []string
	for i := 0; i < 20; i++ {
		refs = append(refs, env.Image(t, fmt.Sprintf("e2e/small:%02d", i)).Ref)
	}
	removeAll(t, images, refs)

	run := fetch(t, env, refs, "--label=false")
	if run.code != 0 {
		t.Fatalf("fetch exited %d, want 0:\n%s", run.code, run.output)
	}
	requirePresent(t, images, refs)

	// Warm pass: everything present, so no pull at all.
	warm := fetch(t, env, refs, "--label=false")
	if warm.code != 0 {
		t.Fatalf("warm fetch exited %d:\n%s", warm.code, warm.output)
	}
	if n := strings.Count(warm.output, "pull attempt"); n != 0 {
		t.Errorf("warm pass made %d pull attempts, want 0:\n%s", n, warm.output)
	}
}

func TestAgentMissingTagFailsWithoutRetriesAndOthersArePulled(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	_, images := env.CRI(t)
	var refs []string
	for _, s := range []string{"8mib", "12mib", "16mib"} {
		refs = append(refs, env.Image(t, "e2e/random:"+s).Ref)
	}
	missing := env.Registry + "/e2e/random:no-such-tag"
	removeAll(t, images, refs)

	run := fetch(t, env, append(append([]string{}, refs[:1]...), append([]string{missing}, refs[1:]...)...), "--label=false")
	if run.code == 0 {
		t.Fatalf("fetch with a missing tag exited 0:\n%s", run.output)
	}
	if !strings.Contains(run.output, "missing image") || !strings.Contains(run.output, missing) || !strings.Contains(run.output, "reason=NotFound") {
		t.Errorf("output does not name the missing image with reason NotFound:\n%s", run.output)
	}
	if n := attemptsFor(run.output, missing); n != 1 {
		t.Errorf("the missing tag got %d pull attempts, want exactly 1 (NotFound is permanent)", n)
	}
	requirePresent(t, images, refs)
}

func TestAgentPrivateImageCredentials(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	_, images := env.CRI(t)
	private := env.Image(t, env.AuthRegistry+"/e2e/private:latest").Ref
	password := env.AuthPassword(t)
	removeAll(t, images, []string{private})

	anon := fetch(t, env, []string{private}, "--label=false")
	if anon.code == 0 {
		t.Fatalf("a private image was pulled without credentials:\n%s", anon.output)
	}
	if !strings.Contains(anon.output, "reason=Unauthorized") {
		t.Errorf("anonymous pull of a private image not classified Unauthorized:\n%s", anon.output)
	}
	if n := attemptsFor(anon.output, private); n != 1 {
		t.Errorf("anonymous pull was attempted %d times, want 1 (Unauthorized is permanent)", n)
	}

	// A wrong secret for the same registry first, then the right one: the
	// agent must move on to the next credential at once.
	dir := t.TempDir()
	wrong := filepath.Join(dir, "wrong.json")
	auth := base64.StdEncoding.EncodeToString([]byte(env.AuthUser + ":not-the-password"))
	if err := os.WriteFile(wrong, []byte(`{"auths":{"`+env.AuthRegistry+`":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	withCreds := fetch(t, env, []string{private}, "--label=false", "--docker-config", wrong, "--docker-config", env.AuthDockerConfig, "--log-format", "json")
	if withCreds.code != 0 {
		t.Fatalf("fetch with the right secret among wrong ones exited %d:\n%s", withCreds.code, withCreds.output)
	}
	requirePresent(t, images, []string{private})
	if n := strings.Count(withCreds.output, `"msg":"pull attempt`); n != 2 {
		t.Errorf("%d attempts with a wrong then a right secret, want 2:\n%s", n, withCreds.output)
	}
	for _, r := range []fetchRun{anon, withCreds} {
		if strings.Contains(r.output, password) {
			t.Fatalf("the registry password appears in the agent's output")
		}
	}
}

func TestAgentWritesFailedLabelOnRealAPIServer(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	cs := env.Clientset(t)
	_, images := env.CRI(t)
	const instance = "e2e-agent-label"
	key := "image-prefetcher.stackrox.io/" + instance
	ctx := ctxFor(t, 3*time.Minute)
	t.Cleanup(func() {
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:null},"annotations":{%q:null}}}`, key, "list.image-prefetcher.stackrox.io/"+instance)
		cs.CoreV1().Nodes().Patch(context.Background(), env.NodeName, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	})
	good := env.Image(t, "e2e/random:20mib").Ref
	missing := env.Registry + "/e2e/random:no-such-tag"
	removeAll(t, images, []string{good})
	flags := []string{"--kubeconfig", env.Kubeconfig, "--node-name", env.NodeName, "--instance", instance}

	run := fetch(t, env, []string{good, missing}, flags...)
	if run.code == 0 {
		t.Fatalf("fetch with a missing tag exited 0:\n%s", run.output)
	}
	node, err := cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := node.Labels[key]; got != "failed" {
		t.Fatalf("node label %s = %q, want failed\n%s", key, got, run.output)
	}
	if node.Labels["kubernetes.io/hostname"] == "" {
		t.Errorf("the node's other labels were lost: %v", node.Labels)
	}
	evs, err := cs.CoreV1().Events("default").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + env.NodeName})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range evs.Items {
		if strings.Contains(e.Message, missing) && strings.Contains(e.Message, "NotFound") {
			found = true
		}
	}
	if !found {
		t.Errorf("no Node event names %s with reason NotFound", missing)
	}

	run = fetch(t, env, []string{good}, flags...)
	if run.code != 0 {
		t.Fatalf("fetch of a good list exited %d:\n%s", run.code, run.output)
	}
	node, err = cs.CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := node.Labels[key]; got != "succeeded" {
		t.Fatalf("node label %s = %q after a complete list, want succeeded", key, got)
	}
}
