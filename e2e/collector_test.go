package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
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

// collectedAll reads every attempt of the collector at base (http://host:port) for instance,
// following the pages of /metrics. An error means the collector does not answer (yet).
func collectedAll(ctx context.Context, base, instance string) ([]collected, error) {
	var all []collected
	next := ""
	for {
		u := fmt.Sprintf("%s/metrics?instance=%s&continue=%s", base, url.QueryEscape(instance), url.QueryEscape(next))
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, err
		}
		var page []collected
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || err != nil {
			return nil, fmt.Errorf("GET %s: %s %v", u, resp.Status, err)
		}
		all = append(all, page...)
		if next = resp.Header.Get(collector.ContinueHeader); next == "" {
			return all, nil
		}
	}
}

// waitCollected polls the collector until have says it holds what the test waits for.
func waitCollected(ctx context.Context, t *testing.T, in *instance, have func([]collected) bool) []collected {
	t.Helper()
	base := fmt.Sprintf("http://127.0.0.1:%d", in.opts.CollectorHTTPPort)
	var got []collected
	err := wait.PollUntilContextCancel(ctx, time.Second, true, func(ctx context.Context) (bool, error) {
		all, err := collectedAll(ctx, base, in.name())
		if err != nil {
			return false, nil // the collector pod may still be starting
		}
		got = all
		return have(got), nil
	})
	if err != nil {
		t.Fatalf("the collector at %s never held what the test waits for; it has %+v\n%s", base, got, in.diagnose())
	}
	return got
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

	got := waitCollected(ctx, t, in, func(got []collected) bool {
		var sawGood, sawMissing bool
		for _, r := range got {
			sawGood = sawGood || (r.Image == good && r.Error == "")
			sawMissing = sawMissing || (r.Image == missing && r.Error != "")
		}
		return sawGood && sawMissing
	})
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

// Only the instance's agents write to its collector. While the agent's records land (sent with
// the projected token the kubelet gives its pod), the collector refuses: no token, a forged one,
// the agent's ServiceAccount with the API server's audience, another ServiceAccount of the
// namespace with the collector's audience, a record claiming another node with a real agent token
// bound to the agent's pod, and a message over the size limit. Tokens are issued by the real API
// server (TokenRequest), and the collector checks them with real TokenReviews.
func TestScenarioCollectorRefusesAllButItsAgents(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	_, images := env.CRI(t)
	good := refs(t, env, "e2e/small:07")[0]
	removeImages(ctx, t, images, []string{good})

	// network-policy too: the API server accepts its objects (this harness's bridge plugin does not
	// enforce them, so the refusals below are the collector's own).
	in := newInstance(t, env, "collauth", []string{good}, "metrics-collector", "network-policy")
	in.opts.CollectorGRPCPort, in.opts.CollectorHTTPPort = freePort(t), freePort(t)
	in.apply()
	in.waitLabel(ctx, "succeeded")
	waitCollected(ctx, t, in, func(got []collected) bool {
		for _, r := range got {
			if r.Image == good && r.Error == "" && r.Node == env.NodeName {
				return true
			}
		}
		return false
	})

	ns := in.opts.Namespace
	var agentPod *corev1.Pod
	for _, p := range in.pods(ctx) {
		if p.Labels["app.kubernetes.io/component"] == "node-agent" && p.Status.Phase == corev1.PodRunning {
			agentPod = &p
		}
	}
	if agentPod == nil {
		t.Fatalf("no running agent pod\n%s", in.diagnose())
	}
	token := func(sa, audience string, pod *corev1.Pod) string {
		t.Helper()
		req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
			Audiences: []string{audience}, ExpirationSeconds: ptr.To[int64](600)}}
		if pod != nil {
			req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
		}
		tr, err := in.cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("token of %s/%s: %v", ns, sa, err)
		}
		return tr.Status.Token
	}
	if _, err := in.cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "intruder"}},
		metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	agentSA := agentPod.Spec.ServiceAccountName
	agentToken := token(agentSA, collector.DefaultAudience, agentPod)

	conn, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", in.opts.CollectorGRPCPort),
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(16<<20)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := resultsv1.NewResultsClient(conn)
	submit := func(token string, r *resultsv1.Result) codes.Code {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if token != "" {
			cctx = metadata.AppendToOutgoingContext(cctx, "authorization", "Bearer "+token)
		}
		_, err := client.Submit(cctx, &resultsv1.SubmitRequest{Results: []*resultsv1.Result{r}})
		return status.Code(err)
	}
	forged := func(id, node string) *resultsv1.Result {
		return &resultsv1.Result{AttemptId: id, Instance: in.name(), Node: node, Image: "forged.example/evil:" + id,
			Outcome: resultsv1.Outcome_OUTCOME_SUCCEEDED}
	}
	oversized := forged("oversized", env.NodeName)
	oversized.Error = strings.Repeat("x", collector.MaxMessageBytes)

	for _, c := range []struct {
		name, token string
		record      *resultsv1.Result
		want        codes.Code
	}{
		{"no-token", "", forged("no-token", env.NodeName), codes.Unauthenticated},
		{"forged-token", "eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ.eyJzdWIiOiJ4In0.c2ln", forged("forged-token", env.NodeName), codes.Unauthenticated},
		{"agent-api-audience", token(agentSA, "https://kubernetes.default.svc", agentPod), forged("agent-api-audience", env.NodeName), codes.Unauthenticated},
		{"other-service-account", token("intruder", collector.DefaultAudience, nil), forged("other-service-account", env.NodeName), codes.PermissionDenied},
		{"agent-sa-unbound", token(agentSA, collector.DefaultAudience, nil), forged("agent-sa-unbound", env.NodeName), codes.PermissionDenied},
		{"other-node", agentToken, forged("other-node", "some-other-node"), codes.PermissionDenied},
		{"oversized", agentToken, oversized, codes.ResourceExhausted},
	} {
		if got := submit(c.token, c.record); got != c.want {
			t.Errorf("%s: Submit = %s, want %s", c.name, got, c.want)
		}
	}
	// The same agent token with the agent's own node is taken: the refusals above were about
	// who sent what, not a collector that refuses everything.
	if got := submit(agentToken, forged("own-node", "")); got != codes.OK {
		t.Errorf("the agent's pod-bound token, its own node: Submit = %s, want OK\n%s", got, in.diagnose())
	}

	got, err := collectedAll(ctx, fmt.Sprintf("http://127.0.0.1:%d", in.opts.CollectorHTTPPort), in.name())
	if err != nil {
		t.Fatal(err)
	}
	var sawOwn, sawAgent bool
	for _, r := range got {
		switch {
		case r.AttemptID == "own-node":
			sawOwn = r.Node == env.NodeName
		case strings.HasPrefix(r.Image, "forged.example/"):
			t.Errorf("the collector holds refused record %+v", r)
		case r.Image == good:
			sawAgent = true
		}
	}
	if !sawOwn || !sawAgent {
		t.Errorf("collector holds %+v: want the agent's attempts and the record sent with its token, stamped with node %s", got, env.NodeName)
	}
}
