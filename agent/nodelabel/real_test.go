package nodelabel

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	utilrand "k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/client-go/kubernetes"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// writeCounter counts the requests that are not reads.
type writeCounter struct {
	next   http.RoundTripper
	writes atomic.Int64
}

func (c *writeCounter) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Method != http.MethodGet {
		c.writes.Add(1)
	}
	return c.next.RoundTrip(req)
}

// realClient returns a client for the e2e harness's real cluster; the test
// skips without IMAGE_PREFETCHER_E2E and fails when it is set but the cluster
// is not up (see e2e/clusterenv).
func realClient(t *testing.T) (kubernetes.Interface, *writeCounter) {
	t.Helper()
	env := clusterenv.Require(t, clusterenv.Full)
	cfg, err := env.RESTConfig()
	if err != nil {
		t.Fatalf("e2e kubeconfig: %v", err)
	}
	counter := &writeCounter{}
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { counter.next = rt; return counter })
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return client, counter
}

// TestRealAPIServer proves against a real kube-apiserver that `failed` is
// really written when the pass's context has expired, that only this
// instance's keys change, that a steady state costs no write, and that the
// failure events are stored.
func TestRealAPIServer(t *testing.T) {
	client, writes := realClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Work on the cluster's node under a throwaway instance name, so nothing
	// another test relies on is touched; create a node when there is none.
	nodes, err := client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var node string
	if len(nodes.Items) > 0 {
		node = nodes.Items[0].Name
	} else {
		node = "nodelabel-test-" + utilrand.String(6)
		if _, err := client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}},
			metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = client.CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{})
		})
	}
	inst := "nodelabel-test-" + utilrand.String(6)
	other := inst + "-other"
	// Another instance's label and annotation, which must survive.
	patch := `{"metadata":{"labels":{"` + Key(other) + `":"succeeded"},"annotations":{"` + AnnotationKey(other) + `":"cccc"}}}`
	if _, err := client.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cleanup := `{"metadata":{"labels":{"` + Key(other) + `":null,"` + Key(inst) + `":null},"annotations":{"` +
			AnnotationKey(other) + `":null,"` + AnnotationKey(inst) + `":null}}}`
		_, _ = client.CoreV1().Nodes().Patch(context.Background(), node, types.MergePatchType, []byte(cleanup),
			metav1.PatchOptions{})
	})
	before, err := client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	l := &Labeler{Client: client, Node: node, Instance: inst}
	expired, cancelExpired := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancelExpired()
	if err := l.Begin(expired, digestA); err != nil {
		t.Fatalf("Begin: %v", err)
	}
	if _, err := l.Set(expired, digestA, Failed); err != nil {
		t.Fatalf("Set failed on an expired context: %v", err)
	}

	after, err := client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := after.Labels[Key(inst)]; got != "failed" {
		t.Errorf("label %s = %q, want failed", Key(inst), got)
	}
	if got := after.Annotations[AnnotationKey(inst)]; got != digestA {
		t.Errorf("annotation %s = %q, want %s", AnnotationKey(inst), got, digestA)
	}
	for k, v := range before.Labels {
		if after.Labels[k] != v {
			t.Errorf("label %s changed from %q to %q", k, v, after.Labels[k])
		}
	}
	for k, v := range before.Annotations {
		// Components such as the kubelet may update their own annotations
		// meanwhile; only ours and the other instance's are checked exactly.
		if strings.Contains(k, Domain) && after.Annotations[k] != v {
			t.Errorf("annotation %s changed from %q to %q", k, v, after.Annotations[k])
		}
	}

	// A steady state costs no write.
	n := writes.writes.Load()
	for range 3 {
		if err := l.Begin(ctx, digestA); err != nil {
			t.Fatal(err)
		}
		if _, err := l.Set(ctx, digestA, Failed); err != nil {
			t.Fatal(err)
		}
	}
	if got := writes.writes.Load() - n; got != 0 {
		t.Errorf("%d API writes in a steady state, want 0", got)
	}

	// A new list clears the label and records the new digest.
	if err := l.Begin(ctx, digestB); err != nil {
		t.Fatal(err)
	}
	cur, err := client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := cur.Labels[Key(inst)]; ok || cur.Annotations[AnnotationKey(inst)] != digestB {
		t.Errorf("after Begin(%s): label %q annotation %q, want no label and the new digest",
			digestB, cur.Labels[Key(inst)], cur.Annotations[AnnotationKey(inst)])
	}
	if cur.Labels[Key(other)] != "succeeded" || cur.Annotations[AnnotationKey(other)] != "cccc" {
		t.Errorf("other instance's keys changed: %v %v", cur.Labels, cur.Annotations)
	}

	// Events reach the API server and carry the image and reason.
	ev := &Events{Client: client, Node: node, Instance: inst}
	image := "127.0.0.1:5000/" + inst + ":missing"
	if err := ev.Report(expired, Outcome{Digest: digestB, Results: []pull.Result{{Image: image, Outcome: pull.OutcomeFailed,
		Reason: pull.ReasonNotFound, Err: errors.New("not found")}}}); err != nil {
		t.Fatalf("Report: %v", err)
	}
	events, err := client.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + node + ",reason=" + EventReasonFailed,
	})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range events.Items {
		if e.Message == "pull "+image+": NotFound: not found" && e.Type == corev1.EventTypeWarning {
			found = true
			_ = client.CoreV1().Events(metav1.NamespaceDefault).Delete(context.Background(), e.Name, metav1.DeleteOptions{})
		}
	}
	if !found {
		t.Errorf("no PrefetchFailed event for %s among %d events", image, len(events.Items))
	}

	if err := l.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	cur, err = client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := cur.Labels[Key(inst)]; ok {
		t.Error("label still present after Remove")
	}
	if _, ok := cur.Annotations[AnnotationKey(inst)]; ok {
		t.Error("annotation still present after Remove")
	}
}
