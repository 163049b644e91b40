package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// collected is one attempt as the collector's /metrics JSON gives it.
type collected struct {
	AttemptID string `json:"attempt_id"`
	Instance  string `json:"instance"`
	Node      string `json:"node"`
	Image     string `json:"image"`
	Error     string `json:"error"`
}

// The results collector on the real cluster: components/metrics-collector deployed with an
// instance whose list has one missing tag; the collector ends up holding the attempts of both
// images, the failed one with its error, each with the real node's name.
func TestScenarioCollectorReceivesEveryImage(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	_, images := env.CRI(t)
	good := refs(t, env, "e2e/small:06")[0]
	missing := env.Registry + "/e2e/random:no-such-tag"
	removeImages(ctx, t, images, []string{good})

	in := newInstance(t, env, "collector", []string{good, missing}, "metrics-collector")
	in.opts.CollectorGRPCPort, in.opts.CollectorHTTPPort = freePort(t), freePort(t)
	in.apply()
	in.waitLabel(ctx, "failed")

	endpoint := fmt.Sprintf("http://127.0.0.1:%d/metrics?instance=%s", in.opts.CollectorHTTPPort, url.QueryEscape(in.name()))
	var got []collected
	err := wait.PollUntilContextCancel(ctx, time.Second, true, func(ctx context.Context) (bool, error) {
		got = nil
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, endpoint, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false, nil // the collector pod may still be starting
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&got) != nil {
			return false, nil
		}
		var sawGood, sawMissing bool
		for _, r := range got {
			sawGood = sawGood || (r.Image == good && r.Error == "")
			sawMissing = sawMissing || (r.Image == missing && r.Error != "")
		}
		return sawGood && sawMissing, nil
	})
	if err != nil {
		t.Fatalf("the collector at %s never held a successful attempt of %s and a failed one of %s; it has %+v\n%s",
			endpoint, good, missing, got, in.diagnose())
	}
	ids := map[string]bool{}
	for _, r := range got {
		if r.Node != env.NodeName {
			t.Errorf("attempt %s of %s names node %q, want %q", r.AttemptID, r.Image, r.Node, env.NodeName)
		}
		if r.Instance != in.name() {
			t.Errorf("attempt %s names instance %q, want %q", r.AttemptID, r.Instance, in.name())
		}
		if ids[r.AttemptID] {
			t.Errorf("attempt %s stored twice", r.AttemptID)
		}
		ids[r.AttemptID] = true
	}
}
