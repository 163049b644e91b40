package collector_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	authenticationv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	testingclock "k8s.io/utils/clock/testing"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	"github.com/nodeprefetch/image-prefetcher/agent/collector/collectortest"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	"github.com/nodeprefetch/image-prefetcher/agent/sender"
	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

const (
	agentUser = "system:serviceaccount:prefetch-images:my-images"
	apiServer = "https://kubernetes.default.svc.cluster.local"
)

// issued is a token the fake API server knows: whom it was issued to, for
// which audiences, bound to a pod on which node ("" for an unbound token).
type issued struct {
	user      string
	audiences []string
	node      string
}

// apiServerReviews answers TokenReviews as kube-apiserver does: an unknown
// token, or one of no requested audience, is not authenticated; the status
// names the audiences both share and the node extra of a pod-bound token.
type apiServerReviews struct {
	mu      sync.Mutex
	tokens  map[string]issued
	reviews []authenticationv1.TokenReviewSpec
}

func (a *apiServerReviews) issue(token string, i issued) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.tokens[token] = i
}

func (a *apiServerReviews) revoke(token string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.tokens, token)
}

func (a *apiServerReviews) count() int { return len(a.specs()) }

func (a *apiServerReviews) specs() []authenticationv1.TokenReviewSpec {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.reviews)
}

func (a *apiServerReviews) react(action k8stesting.Action) (bool, runtime.Object, error) {
	tr := action.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview).DeepCopy()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.reviews = append(a.reviews, tr.Spec)
	i, ok := a.tokens[tr.Spec.Token]
	if !ok {
		tr.Status = authenticationv1.TokenReviewStatus{Error: "invalid bearer token"}
		return true, tr, nil
	}
	want := tr.Spec.Audiences
	if len(want) == 0 {
		want = []string{apiServer}
	}
	var both []string
	for _, aud := range want {
		if slices.Contains(i.audiences, aud) {
			both = append(both, aud)
		}
	}
	if len(both) == 0 {
		tr.Status = authenticationv1.TokenReviewStatus{Error: "token audiences are invalid for the target audiences"}
		return true, tr, nil
	}
	tr.Status = authenticationv1.TokenReviewStatus{Authenticated: true, Audiences: both,
		User: authenticationv1.UserInfo{Username: i.user}}
	if i.node != "" {
		tr.Status.User.Extra = map[string]authenticationv1.ExtraValue{collector.NodeNameExtra: {i.node}}
	}
	return true, tr, nil
}

// authCollector serves a collector that accepts only agentUser's tokens of
// DefaultAudience, reviewed by a fake API server.
func authCollector(t *testing.T) (*collector.Store, *collectortest.Running, *apiServerReviews, *collector.TokenReviewer) {
	t.Helper()
	api := &apiServerReviews{tokens: map[string]issued{}}
	client := fake.NewClientset()
	client.PrependReactor("create", "tokenreviews", api.react)
	store := collector.NewStore(0)
	c := collector.New(store, nil)
	reviewer := &collector.TokenReviewer{Reviews: client.AuthenticationV1().TokenReviews(),
		Audience: collector.DefaultAudience, Username: agentUser}
	c.Auth = reviewer
	return store, collectortest.Start(t, c, "127.0.0.1:0"), api, reviewer
}

// submit sends results with token (none when empty) and returns the call's
// gRPC code.
func submit(t *testing.T, addr, token string, results ...*resultsv1.Result) codes.Code {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	_, err = resultsv1.NewResultsClient(conn).Submit(ctx, &resultsv1.SubmitRequest{Results: results})
	return status.Code(err)
}

func record(id, node string) *resultsv1.Result {
	return &resultsv1.Result{AttemptId: id, Instance: "my-images", Node: node, Image: "registry.test/app:1",
		Outcome: resultsv1.Outcome_OUTCOME_SUCCEEDED}
}

// Only the instance's agents, through tokens of the collector's audience
// bound to a pod on a node, may write; every other caller is refused and
// nothing it sent is stored.
func TestOnlyTheInstancesAgentsMayWrite(t *testing.T) {
	t.Parallel()
	store, srv, api, _ := authCollector(t)
	api.issue("agent-token", issued{user: agentUser, audiences: []string{collector.DefaultAudience}, node: "node-a"})
	api.issue("agent-api-token", issued{user: agentUser, audiences: []string{apiServer}, node: "node-a"})
	api.issue("other-instance", issued{user: "system:serviceaccount:prefetch-images:other-images",
		audiences: []string{collector.DefaultAudience}, node: "node-a"})
	api.issue("other-namespace", issued{user: "system:serviceaccount:team-b:my-images",
		audiences: []string{collector.DefaultAudience}, node: "node-a"})
	api.issue("unbound", issued{user: agentUser, audiences: []string{collector.DefaultAudience}})

	for _, c := range []struct {
		name, token string
		want        codes.Code
	}{
		{"no token", "", codes.Unauthenticated},
		{"forged token", "eyJhbGciOiJSUzI1NiJ9.forged.sig", codes.Unauthenticated},
		{"agent token of the API server's audience", "agent-api-token", codes.Unauthenticated},
		{"another instance's ServiceAccount", "other-instance", codes.PermissionDenied},
		{"same name in another namespace", "other-namespace", codes.PermissionDenied},
		{"token not bound to a pod on a node", "unbound", codes.PermissionDenied},
	} {
		if got := submit(t, srv.GRPC, c.token, record("forged-"+c.name, "node-a")); got != c.want {
			t.Errorf("%s: Submit = %s, want %s", c.name, got, c.want)
		}
	}
	if store.Len() != 0 {
		t.Errorf("refused callers stored %d results: %v", store.Len(), store.List(collector.Filter{}))
	}
	for _, spec := range api.specs() {
		if aud := spec.Audiences; len(aud) != 1 || aud[0] != collector.DefaultAudience {
			t.Errorf("TokenReview asked for audiences %v, want only %s", aud, collector.DefaultAudience)
		}
	}

	if got := submit(t, srv.GRPC, "agent-token", record("good", "node-a")); got != codes.OK {
		t.Fatalf("the agent's own token: Submit = %s, want OK", got)
	}
	if !store.Has("good") {
		t.Error("the agent's record was not stored")
	}
	prom := get(t, srv.HTTP+"/prometheus", nil)
	for _, want := range []string{
		`image_prefetcher_collector_submits_refused_total{reason="unauthenticated"} 3`,
		`image_prefetcher_collector_submits_refused_total{reason="forbidden"} 3`,
	} {
		if !strings.Contains(prom, want+"\n") {
			t.Errorf("/prometheus lacks %q", want)
		}
	}
}

// The node comes from the token: a record without one gets the token's, and
// a batch with a record claiming another node is refused whole.
func TestNodeIsTakenFromTheToken(t *testing.T) {
	t.Parallel()
	store, srv, api, _ := authCollector(t)
	api.issue("token-a", issued{user: agentUser, audiences: []string{collector.DefaultAudience}, node: "node-a"})

	if got := submit(t, srv.GRPC, "token-a", record("mine", "node-a"), record("claims-b", "node-b")); got != codes.PermissionDenied {
		t.Errorf("a batch claiming another node: Submit = %s, want PermissionDenied", got)
	}
	if store.Len() != 0 {
		t.Errorf("a refused batch left %d results", store.Len())
	}
	if got := submit(t, srv.GRPC, "token-a", record("unnamed", "")); got != codes.OK {
		t.Fatalf("Submit = %s", got)
	}
	if got := store.List(collector.Filter{}); len(got) != 1 || got[0].GetNode() != "node-a" {
		t.Errorf("stored %v, want one record of node-a", got)
	}
}

// Accepted tokens are reviewed once per cache period, by hash; refused ones
// every time, and a revoked token stops working when its entry expires.
func TestReviewsAreCachedBriefly(t *testing.T) {
	t.Parallel()
	_, srv, api, reviewer := authCollector(t)
	clk := testingclock.NewFakePassiveClock(time.Unix(1700000000, 0))
	reviewer.Clock = clk
	api.issue("token-a", issued{user: agentUser, audiences: []string{collector.DefaultAudience}, node: "node-a"})

	for i := range 5 {
		if got := submit(t, srv.GRPC, "token-a", record("a"+string(rune('0'+i)), "")); got != codes.OK {
			t.Fatalf("Submit %d = %s", i, got)
		}
	}
	if n := api.count(); n != 1 {
		t.Errorf("5 calls with one token made %d TokenReviews, want 1", n)
	}
	for range 2 {
		submit(t, srv.GRPC, "forged", record("f", ""))
	}
	if n := api.count(); n != 3 {
		t.Errorf("after 2 forged calls: %d TokenReviews, want 3 (refusals are not cached)", n)
	}

	api.revoke("token-a") // its pod was deleted
	if got := submit(t, srv.GRPC, "token-a", record("cached", "")); got != codes.OK {
		t.Errorf("within the cache period: Submit = %s, want OK", got)
	}
	clk.SetTime(clk.Now().Add(collector.DefaultReviewCacheTTL + time.Second))
	if got := submit(t, srv.GRPC, "token-a", record("late", "")); got != codes.Unauthenticated {
		t.Errorf("revoked token after the cache period: Submit = %s, want Unauthenticated", got)
	}
}

// The agent's sender reads the token file for every call: the token the
// kubelet rotates into it is used, the old one may be gone.
func TestSenderFollowsTheRotatedToken(t *testing.T) {
	t.Parallel()
	store, srv, api, _ := authCollector(t)
	file := filepath.Join(t.TempDir(), "token")
	write := func(token string) {
		t.Helper()
		// The kubelet swaps a symlinked directory; a rename is the same to
		// a reader.
		tmp := file + ".new"
		if err := os.WriteFile(tmp, []byte(token), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, file); err != nil {
			t.Fatal(err)
		}
	}
	api.issue("first", issued{user: agentUser, audiences: []string{collector.DefaultAudience}, node: "node-a"})
	write("first")
	s, err := sender.New(sender.Config{Address: srv.GRPC, Node: "node-a", Instance: "my-images", TokenFile: file,
		InitialBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s.AttemptFinished(pull.Attempt{Image: "one:1", Number: 1, Start: time.Now()})
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	api.revoke("first")
	api.issue("second", issued{user: agentUser, audiences: []string{collector.DefaultAudience}, node: "node-a"})
	write("second")
	s.AttemptFinished(pull.Attempt{Image: "two:1", Number: 1, Start: time.Now()})
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := len(store.List(collector.Filter{Node: "node-a"})); got != 2 {
		t.Errorf("collector holds %d results of node-a, want 2", got)
	}
	var tokens []string
	for _, r := range api.specs() {
		tokens = append(tokens, r.Token)
	}
	if !slices.Contains(tokens, "second") {
		t.Errorf("reviewed tokens %v: the rotated one was never sent", tokens)
	}
}
