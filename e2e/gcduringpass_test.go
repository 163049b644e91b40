// An image of the list removed while the agent pulls the others, as the kubelet's image GC does when the
// pass's own pulls fill the disk: the node must never claim the list while the image is missing.
package e2e_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"k8s.io/apimachinery/pkg/util/wait"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/testimage"
)

// gcPassImages are n distinct small images on the plain registry (e2e/gcpass:00, :01, ...), pushed by this
// test: the catalogue has fewer distinct images than a 40-image list needs, and an image under a second name
// (a proxy's) is the same image to CRI, removed with the first. Their content is seeded by name, so a second
// run finds them in the registry and pushes nothing.
func gcPassImages(t *testing.T, env *clusterenv.Env, n int) []string {
	t.Helper()
	refs := make([]string, n)
	for i := range refs {
		tag := fmt.Sprintf("%02d", i)
		refs[i] = env.Registry + "/e2e/gcpass:" + tag
		ref, err := name.ParseReference(refs[i], name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		layer, err := testimage.RandomLayer("gcpass-"+tag, 64<<10)
		if err != nil {
			t.Fatal(err)
		}
		img, err := testimage.Image(v1.Config{}, layer)
		if err != nil {
			t.Fatal(err)
		}
		digest, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		if desc, err := remote.Head(ref, remote.WithAuth(authn.Anonymous)); err == nil && desc.Digest == digest {
			continue
		}
		if err := remote.Write(ref, img, remote.WithAuth(authn.Anonymous)); err != nil {
			t.Fatalf("push %s: %v", refs[i], err)
		}
	}
	return refs
}

// claimWatcher polls the instance's label every 50 ms and, whenever it says succeeded for the list, asks CRI
// for every image of the list: a missing one is a false claim.
type claimWatcher struct {
	mu     sync.Mutex
	seen   int // polls that found succeeded
	claims []string
}

func (w *claimWatcher) follow(ctx context.Context, in *faultInstance, images runtimeapi.ImageServiceClient, digest string, refs []string) {
	_ = wait.PollUntilContextCancel(ctx, 50*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		s, ok := in.state(ctx)
		if !ok || s.label != "succeeded" || s.list != digest {
			return false, nil
		}
		var gone []string
		for _, r := range refs {
			st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: r}})
			if err == nil && st.GetImage() == nil {
				gone = append(gone, r)
			}
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		w.seen++
		if len(gone) > 0 {
			w.claims = append(w.claims, fmt.Sprintf("%s: label succeeded with %v missing", s.at.Format("15:04:05.000"), gone))
		}
		return false, nil
	})
}

// TestGCDuringPassNeverClaimsAMissingImage reproduces the report of a 40-image list, half of it present,
// one of the present ones removed shortly after the pass starts, which ended with exit 0, `succeeded` and 39 of
// 40 images present. Here the image is removed through CRI once the agent has pulled the first missing image
// (it pulls them one at a time, so 19 are still to come). The label must never say succeeded while an image of
// the list is missing, and the pass ends succeeded with all 40 present: its presence check at the end finds the
// hole and pulls the image again.
func TestGCDuringPassNeverClaimsAMissingImage(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 10*time.Minute)
	_, images := env.CRI(t)
	refs := gcPassImages(t, env, 40)
	removeImages(ctx, t, images, refs)
	t.Cleanup(func() { removeImages(context.Background(), t, images, refs) })
	have, missing := refs[:20], refs[20:]
	for _, r := range have {
		if _, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: r}}); err != nil {
			t.Fatalf("pull %s: %v", r, err)
		}
	}
	// The present half first: the agent is done with it at once and then pulls the other half in list order.
	victim := have[0]
	in := newFaultInstance(t, env, "gcpass")
	list, digest := writeImageList(t, refs...)

	watchCtx, stopWatching := context.WithCancel(ctx)
	var w claimWatcher
	watched := make(chan struct{})
	go func() { defer close(watched); w.follow(watchCtx, in, images, digest, refs) }()
	defer func() { stopWatching(); <-watched }()

	agent := startAgent(t, append([]string{"fetch", "--max-parallel-pulls", "1"}, in.flags(list)...)...)
	err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		st, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: missing[0]}})
		return err == nil && st.GetImage() != nil, nil
	})
	if err != nil {
		t.Fatalf("the agent did not pull %s: %v\n%s", missing[0], err, agent.out)
	}
	removeImages(ctx, t, images, []string{victim})
	removedAt := time.Since(agent.start)
	_, still := present(ctx, t, images, missing)
	if !agent.running() || len(still) == 0 {
		t.Fatalf("the pass had pulled every image before %s was removed (%d still to pull, agent running %v): "+
			"nothing is proven\n%s", victim, len(still), agent.running(), agent.out)
	}
	t.Logf("%s removed %s into the pass, with %d of %d missing images still to pull", victim,
		removedAt.Round(time.Millisecond), len(still), len(missing))

	code := agent.wait(5 * time.Minute)
	out := agent.out.String()
	stopWatching()
	<-watched
	if code != 0 {
		t.Errorf("fetch exited %d, want 0 (the removed image pulled again within the pass)\n%s", code, out)
	}
	if s, ok := in.state(ctx); !ok || s.label != "succeeded" || s.list != digest {
		t.Errorf("node state %v (API answered: %v), want succeeded for list %.12s", s, ok, digest)
	}
	requirePresent(t, images, refs)
	w.mu.Lock()
	for _, c := range w.claims {
		t.Errorf("false claim: %s", c)
	}
	t.Logf("the label was seen saying succeeded in %d polls, each with the whole list present", w.seen-len(w.claims))
	w.mu.Unlock()
	if n := attemptsFor(out, victim); n != 1 {
		t.Errorf("%d pull attempts for the removed %s, want 1 (pulled again once, within the pass)\n%s", n, victim, out)
	}
	if !strings.Contains(out, "removedDuringPass=1") {
		t.Errorf("the pass summary does not count the image removed during the pass:\n%s", out)
	}
}
