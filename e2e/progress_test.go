// Progress-aware pulling on the real containerd (issue 13): the agent follows its pulls through
// containerd's leases and content API on the CRI socket. A registry connection that goes silent in the
// middle of a layer ends the attempt after the no-progress window, not after the attempt's timeout, and
// the next attempt resumes where the ingest stopped; an attempt cut by --max-pull-attempt-timeout while
// bytes flow loses nothing either. The shaping proxy of the benchmark stands between containerd and the
// registry. The precise figures are the benchmark's (docs/benchmarks.md); these tests hold generous bounds.
package e2e_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"k8s.io/apimachinery/pkg/util/wait"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/bench/shaper"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

const mib = 1 << 20

// viaProgressProxy is viaProxy for these tests: the image under the proxy's name is removed again when
// the test ends, so that no later test finds its content present under another proxy's name.
func viaProgressProxy(ctx context.Context, t *testing.T, env *clusterenv.Env, images runtimeapi.ImageServiceClient, p *shaper.Proxy, name string) string {
	t.Helper()
	// Other tests pull the same catalogue image, under the registry's own name or their own proxy's: remove
	// it under every name (by image ID), so that its blobs are gone and the pull below starts from nothing.
	path := strings.TrimPrefix(env.Image(t, name).Ref, env.Registry)
	list, err := images.ListImages(ctx, &runtimeapi.ListImagesRequest{})
	if err != nil {
		t.Fatalf("list images: %v", err)
	}
	for _, img := range list.GetImages() {
		for _, tag := range img.GetRepoTags() {
			if strings.HasSuffix(tag, path) {
				removeImages(ctx, t, images, []string{img.GetId()})
				break
			}
		}
	}
	ref := viaProxy(ctx, t, env, images, p, name)
	t.Cleanup(func() { removeImages(context.Background(), t, images, []string{ref}) })
	return ref
}

// progressProxy is a shaping proxy in front of the plain registry, on containerd only: CRI-O has no API
// that shows a pull's bytes, so the agent does not follow progress there.
func progressProxy(t *testing.T, env *clusterenv.Env, mbit int64) *shaper.Proxy {
	t.Helper()
	if !env.IsContainerd() {
		t.Skipf("runtime %s: only containerd shows pull progress (its content API); CRI-O has its own pull_progress_timeout", env.Runtime)
	}
	p, err := shaper.Listen("127.0.0.1:0", shaper.Config{Upstream: env.Registry, BitsPerSecond: mbit * 1_000_000})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// containerdAPI is a connection to the node's containerd (closed when the test ends) and ctx in the
// namespace CRI uses.
func containerdAPI(ctx context.Context, t *testing.T, env *clusterenv.Env) (*grpc.ClientConn, context.Context) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+env.CRISocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, metadata.AppendToOutgoingContext(ctx, pin.NamespaceHeader, pin.Namespace)
}

// agentLeases lists the leases the agent made on the node's containerd for image (other tests' failed
// images keep theirs, by design).
func agentLeases(ctx context.Context, t *testing.T, env *clusterenv.Env, image string) []string {
	t.Helper()
	conn, ctx := containerdAPI(ctx, t, env)
	resp, err := leasesapi.NewLeasesClient(conn).List(ctx, &leasesapi.ListRequest{})
	if err != nil {
		t.Fatalf("list containerd leases: %v", err)
	}
	var ours []string
	for _, l := range resp.GetLeases() {
		if strings.HasPrefix(l.GetID(), progress.LeasePrefix) && l.GetLabels()[progress.LeaseImageLabel] == image {
			ours = append(ours, l.GetID()+" "+l.GetLabels()[progress.LeaseImageLabel])
		}
	}
	return ours
}

// resumedFrom returns the resumedFromBytes of the agent's successful attempt of image, -1 when absent.
func resumedFrom(output, image string) int64 {
	re := regexp.MustCompile(`msg="pull attempt succeeded" image=` + regexp.QuoteMeta(image) + ` .*resumedFromBytes=(\d+)`)
	m := re.FindStringSubmatch(output)
	if m == nil {
		return -1
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}

// The proxy forwards the first 5 MiB of the 20 MiB layer's connection and then holds it silent. With a
// 15 s no-progress window and a 5-minute attempt timeout, the first attempt ends for lack of progress, the
// hedge due at 10 s is not sent behind it, and the second resumes from the bytes the first left: done long
// before the attempt timeout, and the registry sends the layer once.
func TestAgentProgressMidLayerStallEndsWithinTheWindow(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	ctx := ctxFor(t, 5*time.Minute)
	_, images := env.CRI(t)
	proxy := progressProxy(t, env, 0)
	ref := viaProgressProxy(ctx, t, env, images, proxy, "e2e/random:20mib")
	proxy.HoldAfter(5 * mib)

	run := fetch(t, env, []string{ref}, "--label=false", "--pull-progress-timeout=15s",
		"--initial-pull-attempt-timeout=5m", "--max-pull-attempt-timeout=5m")
	if run.code != 0 {
		t.Fatalf("fetch exited %d\n%s", run.code, run.output)
	}
	requirePresent(t, images, []string{ref})
	// Generous: the window is 15 s; without progress watching the first attempt would last 5 minutes.
	if run.took > 2*time.Minute {
		t.Errorf("fetch took %s after a mid-layer stall, want well within the 5m attempt timeout", run.took)
	}
	st := proxy.Stats()
	if st.Held != 1 {
		t.Fatalf("the proxy held %d connections mid-transfer, want 1: the stall did not happen\n%s", st.Held, run.output)
	}
	if !strings.Contains(run.output, `msg="pull made no progress: ending the attempt"`) {
		t.Errorf("no attempt ended for lack of progress\n%s", run.output)
	}
	if n := attemptsFor(run.output, ref); n != 2 {
		t.Errorf("%d attempts, want 2 (the stalled one, then the resumed one)\n%s", n, run.output)
	}
	if strings.Contains(run.output, "hedges=") {
		t.Errorf("a hedge was sent behind the stalled layer\n%s", run.output)
	}
	if n := resumedFrom(run.output, ref); n < 4*mib {
		t.Errorf("the second attempt resumed from %d bytes, want the ~5 MiB the first left\n%s", n, run.output)
	}
	if st.BytesDown > 21*mib {
		t.Errorf("%.1f MiB crossed the proxy for a 20 MiB image: bytes were fetched twice", float64(st.BytesDown)/mib)
	}
	if l := agentLeases(ctx, t, env, ref); len(l) != 0 {
		t.Errorf("agent leases left after the image was pulled: %v", l)
	}
}

// 16 MiB through a 16 Mbit/s link takes about 8 s; every attempt is capped at 4 s. Bytes flow the whole
// time, so no attempt is ended for lack of progress; the cap still ends each one, and each next attempt
// goes on from where the last stopped: the image completes, and the registry sends it about once.
func TestAgentProgressCappedAttemptsResume(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	ctx := ctxFor(t, 5*time.Minute)
	_, images := env.CRI(t)
	proxy := progressProxy(t, env, 16)
	ref := viaProgressProxy(ctx, t, env, images, proxy, "e2e/random:16mib")

	run := fetch(t, env, []string{ref}, "--label=false", "--pull-progress-timeout=30s",
		"--initial-pull-attempt-timeout=4s", "--max-pull-attempt-timeout=4s", "--max-attempts=10",
		"--pull-progress-log-interval=1s")
	if run.code != 0 {
		t.Fatalf("fetch exited %d\n%s", run.code, run.output)
	}
	requirePresent(t, images, []string{ref})
	if n := attemptsFor(run.output, ref); n < 2 {
		t.Errorf("%d attempts: the 4 s cap never ended one (the link was faster than planned?)\n%s", n, run.output)
	}
	if strings.Contains(run.output, `msg="pull made no progress`) {
		t.Errorf("an attempt whose bytes flowed was ended as stalled\n%s", run.output)
	}
	if n := resumedFrom(run.output, ref); n <= 0 {
		t.Errorf("the successful attempt resumed from %d bytes, want what the capped ones fetched\n%s", n, run.output)
	}
	if st := proxy.Stats(); st.BytesDown > 17*mib {
		t.Errorf("%.1f MiB crossed the proxy for a 16 MiB image: capped attempts were fetched again", float64(st.BytesDown)/mib)
	}
	if !regexp.MustCompile(`msg="pull progress" image=` + regexp.QuoteMeta(ref) + ` attempt=\d+ bytes=\d+ total=\d+ percent=`).MatchString(run.output) {
		t.Errorf("no progress line with bytes and total\n%s", run.output)
	}
	if l := agentLeases(ctx, t, env, ref); len(l) != 0 {
		t.Errorf("agent leases left after the image was pulled: %v", l)
	}
}

// An image whose tag is missing fails at once and leaves no lease behind: a lease is kept for a resume only
// when it holds something.
func TestAgentProgressFailedImageLeavesNoEmptyLease(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	ctx := ctxFor(t, 2*time.Minute)
	proxy := progressProxy(t, env, 0)
	ref := proxy.Addr() + "/e2e/random:no-such-tag"
	run := fetch(t, env, []string{ref}, "--label=false")
	if run.code == 0 {
		t.Fatalf("fetch of a missing tag exited 0\n%s", run.output)
	}
	if n := attemptsFor(run.output, ref); n != 1 {
		t.Errorf("%d attempts of a missing tag, want 1\n%s", n, run.output)
	}
	if l := agentLeases(ctx, t, env, ref); len(l) != 0 {
		t.Errorf("agent leases left for a missing tag: %v", l)
	}
}

// leaseHeldBytes sums what containerd holds under the agent's lease of image: the blobs committed under it
// and the partial downloads (ingests) it holds.
func leaseHeldBytes(ctx context.Context, t *testing.T, env *clusterenv.Env, instance, image string) int64 {
	t.Helper()
	conn, ctx := containerdAPI(ctx, t, env)
	res, err := leasesapi.NewLeasesClient(conn).ListResources(ctx, &leasesapi.ListResourcesRequest{ID: progress.LeaseID(instance, image)})
	if err != nil {
		return 0
	}
	content := contentapi.NewContentClient(conn)
	var n int64
	for _, r := range res.GetResources() {
		switch r.GetType() {
		case "content":
			if info, err := content.Info(ctx, &contentapi.InfoRequest{Digest: r.GetID()}); err == nil {
				n += info.GetInfo().GetSize()
			}
		case "ingests":
			if st, err := content.Status(ctx, &contentapi.StatusRequest{Ref: r.GetID()}); err == nil {
				n += st.GetStatus().GetOffset()
			}
		}
	}
	return n
}

// A 20 MiB image that stalls after 5 MiB and fails (one attempt): its lease keeps what was fetched, for a
// resume. The agent's next pass, with the image gone from the list, deletes that lease. One `run` process
// makes both passes: a lease another process made is left alone for an hour (it may be pulling under it).
func TestAgentProgressLeaseOfAnImageThatLeftTheListGoes(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	ctx := ctxFor(t, 3*time.Minute)
	instance := "e2e-lease-" + suffix(t)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	ref, list, agent := runStallingAfterFiveMiB(ctx, t, env, instance, "--listen-address="+addr, "--recheck-interval=2s")
	writeFile := func(refs ...string) {
		t.Helper()
		if err := os.WriteFile(list, []byte(strings.Join(refs, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// metric reads one gauge of the agent's /metrics (-1 when absent).
	metric := func(name string) float64 {
		t.Helper()
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			t.Fatalf("GET /metrics: %v", err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindSubmatch(body)
		if m == nil {
			return -1
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		return v
	}
	waitOutput := func(what string) {
		t.Helper()
		err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 90*time.Second, true, func(context.Context) (bool, error) {
			return strings.Contains(agent.out.String(), what), nil
		})
		if err != nil {
			t.Fatalf("the agent never logged %q\n%s", what, agent.out)
		}
	}
	waitOutput(`msg="pass finished" state=failed`)
	held := leaseHeldBytes(ctx, t, env, instance, ref)
	t.Logf("bytes held by the lease of the failed image: %d (%.1f MiB)", held, float64(held)/mib)
	if len(agentLeases(ctx, t, env, ref)) != 1 || held < 4*mib {
		t.Fatalf("after the failed pass: leases %v holding %d bytes, want one holding the ~5 MiB fetched\n%s",
			agentLeases(ctx, t, env, ref), held, agent.out)
	}
	if got := metric("image_prefetcher_lease_held_bytes"); got < 4*mib {
		t.Errorf("image_prefetcher_lease_held_bytes = %v after the failed pass, want the ~5 MiB its lease holds", got)
	}

	writeFile(refs(t, env, "e2e/small:00")...)
	waitOutput(`msg="lease of an image that left the list deleted`)
	if l := agentLeases(ctx, t, env, ref); len(l) != 0 {
		t.Errorf("the lease of %s, gone from the list, is still there: %v\n%s", ref, l, agent.out)
	}
	t.Logf("bytes held by the lease after the pass without the image: %d", leaseHeldBytes(ctx, t, env, instance, ref))
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		return metric("image_prefetcher_lease_held_bytes") == 0, nil
	})
	if err != nil {
		t.Errorf("image_prefetcher_lease_held_bytes = %v after the lease went, want 0", metric("image_prefetcher_lease_held_bytes"))
	}
	// Last, since the failing image would complete if it were retried for long: containerd's CRI
	// computes the snapshotter's usage every stats_collect_period (10 s), so right after the runtime
	// started it reports 0; each pass (every 2 s here) reads it again.
	if err := wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, 45*time.Second, true, func(context.Context) (bool, error) {
		return metric("image_prefetcher_image_fs_used_bytes") > 0, nil
	}); err != nil {
		t.Errorf("image_prefetcher_image_fs_used_bytes = %v, want what containerd reports", metric("image_prefetcher_image_fs_used_bytes"))
	}
}

// runStallingAfterFiveMiB starts `run` of instance on a list of one 20 MiB image served through a proxy
// that stalls after 5 MiB: each of its passes fails (one attempt, 3 s without progress) with about
// 5 MiB fetched under the image's lease. It returns the image, the list file and the agent.
func runStallingAfterFiveMiB(ctx context.Context, t *testing.T, env *clusterenv.Env, instance string, flags ...string) (string, string, *agentProc) {
	t.Helper()
	_, images := env.CRI(t)
	proxy := progressProxy(t, env, 0)
	ref := viaProgressProxy(ctx, t, env, images, proxy, "e2e/random:20mib")
	proxy.HoldAfter(5 * mib)
	list := filepath.Join(t.TempDir(), "images.txt")
	if err := os.WriteFile(list, []byte(ref+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"run", "--label=false", "--instance=" + instance, "--cri-socket", env.CRISocket,
		"--image-list-file", list, "--pull-progress-timeout=3s", "--max-attempts=1"}, flags...)
	return ref, list, startAgent(t, args...)
}

// TestAgentProgressLeasesKeepNoMoreThanMaxResumeBytes: with --max-resume-bytes below what a failed
// pull fetched, the pass that failed lets its lease go at its end (and says so): what failed
// images keep for a resume is bounded in bytes.
func TestAgentProgressLeasesKeepNoMoreThanMaxResumeBytes(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Runtime)
	ctx := ctxFor(t, 3*time.Minute)
	instance := "e2e-trim-" + suffix(t)
	ref, _, agent := runStallingAfterFiveMiB(ctx, t, env, instance, fmt.Sprintf("--listen-address=127.0.0.1:%d", freePort(t)),
		"--recheck-interval=1h", "--max-resume-bytes=1Mi")
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 90*time.Second, true, func(context.Context) (bool, error) {
		return strings.Contains(agent.out.String(), `msg="pass finished" state=failed`), nil
	})
	if err != nil {
		t.Fatalf("no failed pass:\n%s", agent.out)
	}
	if !strings.Contains(agent.out.String(), `msg="lease of a failed image let go: the next pass pulls it from the start" image=`+ref) {
		t.Errorf("the agent did not say it let the lease of %s go:\n%s", ref, agent.out)
	}
	if l := agentLeases(ctx, t, env, ref); len(l) != 0 {
		t.Errorf("leases %v of %s kept beyond --max-resume-bytes=1Mi holding %d bytes\n%s", l, ref,
			leaseHeldBytes(ctx, t, env, instance, ref), agent.out)
	}
}
