package nodelabel

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	testingclock "k8s.io/utils/clock/testing"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

func listEvents(t *testing.T, client kubernetes.Interface) []corev1.Event {
	t.Helper()
	list, err := client.CoreV1().Events(metav1.NamespaceDefault).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return list.Items
}

func failed(image string, reason pull.Reason, err error) pull.Result {
	return pull.Result{Image: image, Outcome: pull.OutcomeFailed, Reason: reason, Err: err}
}

func TestEventsForFailures(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset()
	ev := &Events{Client: client, Node: nodeName, Instance: instance, Backoff: &fastBackoff}
	results := []pull.Result{
		{Image: "127.0.0.1:5000/ok:1", Outcome: pull.OutcomePulled},
		failed("127.0.0.1:5000/x:missing", pull.ReasonNotFound,
			errors.New("rpc error: code = NotFound desc = not found")),
		{Image: "not a ref", Line: 7, Outcome: pull.OutcomeFailed, Reason: pull.ReasonInvalidReference,
			Err: errors.New("invalid reference format")},
	}
	// The pass's context is already cancelled: events are still delivered.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := ev.Report(ctx, Outcome{Digest: digestA, Results: results}); err != nil {
		t.Fatal(err)
	}
	events := listEvents(t, client)
	if len(events) != 2 {
		t.Fatalf("%d events, want 2: %+v", len(events), events)
	}
	messages := map[string]bool{}
	for _, e := range events {
		messages[e.Message] = true
		if e.Type != corev1.EventTypeWarning || e.Reason != EventReasonFailed {
			t.Errorf("event type %q reason %q, want Warning %s", e.Type, e.Reason, EventReasonFailed)
		}
		io := e.InvolvedObject
		if io.Kind != "Node" || io.Name != nodeName || string(io.UID) != nodeName || io.APIVersion != "v1" {
			t.Errorf("involvedObject %+v, want Node %s with uid = name", io, nodeName)
		}
		if e.Namespace != "default" || e.Count != 1 || e.FirstTimestamp.IsZero() || e.LastTimestamp.IsZero() {
			t.Errorf("event %s: namespace %q count %d timestamps %v %v", e.Name, e.Namespace, e.Count,
				e.FirstTimestamp, e.LastTimestamp)
		}
		if e.Source.Component != "image-prefetcher/"+instance || e.Source.Host != nodeName {
			t.Errorf("source %+v", e.Source)
		}
		if !strings.HasPrefix(e.Name, nodeName+".") {
			t.Errorf("event name %q, want it to start with the node name", e.Name)
		}
	}
	for _, want := range []string{
		"pull 127.0.0.1:5000/x:missing: NotFound: rpc error: code = NotFound desc = not found",
		"pull not a ref (line 7): InvalidReference: invalid reference format",
	} {
		if !messages[want] {
			t.Errorf("no event with message %q; got %v", want, messages)
		}
	}
}

func TestEventsSuccessAndRepeat(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset()
	clk := testingclock.NewFakePassiveClock(time.Unix(1000, 0))
	ev := &Events{Client: client, Node: nodeName, Instance: instance, Backoff: &fastBackoff, Clock: clk}
	ctx := context.Background()
	ok := []pull.Result{{Image: "a", Outcome: pull.OutcomePresent}, {Image: "b", Outcome: pull.OutcomePulled}}
	bad := []pull.Result{ok[0], failed("b", pull.ReasonUnauthorized, errors.New("401 Unauthorized"))}

	count := func(eventType string) int {
		n := 0
		for _, e := range listEvents(t, client) {
			if e.Type == eventType {
				n++
			}
		}
		return n
	}
	// changed: the pass changed the node's label (the labeler wrote it).
	step := func(results []pull.Result, digest string, changed bool, warnings, normals int) {
		t.Helper()
		if err := ev.Report(ctx, Outcome{Digest: digest, Results: results, LabelChanged: changed}); err != nil {
			t.Fatal(err)
		}
		if got := count(corev1.EventTypeWarning); got != warnings {
			t.Errorf("%d warnings, want %d", got, warnings)
		}
		if got := count(corev1.EventTypeNormal); got != normals {
			t.Errorf("%d normal events, want %d", got, normals)
		}
	}

	step(ok, digestA, true, 0, 1)   // whole list present, label just written
	step(ok, digestA, false, 0, 1)  // steady state: nothing new
	step(bad, digestA, true, 1, 1)  // a failure
	step(bad, digestA, false, 1, 1) // the same failure again soon: not repeated
	clk.SetTime(clk.Now().Add(DefaultRepeatAfter))
	step(bad, digestA, false, 2, 1) // still failing much later: reported again
	step(ok, digestA, true, 2, 2)   // recovered
	step(ok, digestB, true, 2, 3)   // a new list fully present
	step(bad, digestB, true, 3, 3)  // failing again after recovery: reported at once
	step(ok, digestB, false, 3, 3)  // the node already said succeeded (another process wrote it): no event
	for _, e := range listEvents(t, client) {
		if e.Type == corev1.EventTypeNormal {
			if e.Reason != EventReasonSucceeded || !strings.Contains(e.Message, "all 2 images") {
				t.Errorf("normal event %q %q", e.Reason, e.Message)
			}
		}
	}
}

func TestEventsCapped(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset()
	ev := &Events{Client: client, Node: nodeName, Instance: instance, MaxFailureEvents: 3, Backoff: &fastBackoff}
	var results []pull.Result
	for i := range 10 {
		results = append(results, failed(fmt.Sprintf("img%d", i), pull.ReasonNotFound, nil))
	}
	if err := ev.Report(context.Background(), Outcome{Digest: digestA, Results: results}); err != nil {
		t.Fatal(err)
	}
	events := listEvents(t, client)
	if len(events) != 4 {
		t.Fatalf("%d events, want 3 failures and 1 summary", len(events))
	}
	summary := 0
	for _, e := range events {
		if e.Message == "7 more images failed; see the agent's log and metrics" {
			summary++
		}
	}
	if summary != 1 {
		t.Errorf("no summary event among %v", events)
	}
}

func TestEventsRetryAndForbidden(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset()
	calls := 0
	client.PrependReactor("create", "events", func(k8stesting.Action) (bool, runtime.Object, error) {
		calls++
		if calls == 1 {
			return true, nil, apierrors.NewServiceUnavailable("try again")
		}
		return false, nil, nil
	})
	ev := &Events{Client: client, Node: nodeName, Instance: instance, Backoff: &fastBackoff}
	if err := ev.Report(context.Background(), Outcome{Digest: digestA, Results: []pull.Result{failed("x", pull.ReasonNotFound, nil)}}); err != nil {
		t.Fatal(err)
	}
	if len(listEvents(t, client)) != 1 || calls != 2 {
		t.Errorf("%d create calls, %d events; want 2 calls and the event stored", calls, len(listEvents(t, client)))
	}

	denied := fake.NewClientset()
	denied.PrependReactor("create", "events", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "events"}, "", errors.New("denied"))
	})
	ev = &Events{Client: denied, Node: nodeName, Instance: instance, Backoff: &fastBackoff}
	err := ev.Report(context.Background(), Outcome{Digest: digestA, Results: []pull.Result{failed("x", pull.ReasonNotFound, nil)}})
	if err == nil || !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "needs create on events") {
		t.Errorf("Report = %v, want Forbidden with an RBAC hint", err)
	}
	// Undelivered failures are tried again on the next call.
	denied.ReactionChain = denied.ReactionChain[1:]
	if err := ev.Report(context.Background(), Outcome{Digest: digestA, Results: []pull.Result{failed("x", pull.ReasonNotFound, nil)}}); err != nil {
		t.Fatal(err)
	}
	if n := len(listEvents(t, denied)); n != 1 {
		t.Errorf("%d events after the retry, want 1", n)
	}
}

func TestEventsUseOwnDeadline(t *testing.T) {
	t.Parallel()
	client := &ctxClient{Clientset: fake.NewClientset()}
	ev := &Events{Client: client, Node: nodeName, Instance: instance, WriteTimeout: time.Hour, Backoff: &fastBackoff}
	expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Minute))
	defer cancel()
	if err := ev.Report(expired, Outcome{Digest: digestA, Results: []pull.Result{failed("x", pull.ReasonTimeout, context.DeadlineExceeded)}}); err != nil {
		t.Fatal(err)
	}
	if n := len(listEvents(t, client.Clientset)); n != 1 {
		t.Errorf("%d events, want 1", n)
	}
}

// A warm `fetch` is a new process: its Events has no memory, and the node
// already says succeeded for the list, so the labeler writes nothing and no
// event is recorded either.
func TestEventsWarmFetchRecordsNothing(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset()
	ok := []pull.Result{{Image: "a", Outcome: pull.OutcomePresent}}
	for range 3 {
		ev := &Events{Client: client, Node: nodeName, Instance: instance, Backoff: &fastBackoff}
		if err := ev.Report(context.Background(), Outcome{Digest: digestA, Results: ok}); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(client.Actions()); n != 0 {
		t.Errorf("%d API requests for passes that changed nothing, want 0: %v", n, client.Actions())
	}
}

func TestEventsProblems(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset()
	clk := testingclock.NewFakePassiveClock(time.Unix(1000, 0))
	ev := &Events{Client: client, Node: nodeName, Instance: instance, Backoff: &fastBackoff, Clock: clk}
	bad := Problem{Reason: EventReasonCredentialFileSkipped, Key: "/etc/creds/a", Message: "docker config /etc/creds/a skipped: invalid JSON at byte offset 3"}
	list := Problem{Reason: EventReasonFailed, Key: "list", Message: "image list /etc/list cannot be read: is a directory"}
	ok := []pull.Result{{Image: "a", Outcome: pull.OutcomePulled}}
	report := func(changed bool, problems ...Problem) {
		t.Helper()
		if err := ev.Report(context.Background(), Outcome{Digest: digestA, Results: ok, Problems: problems, LabelChanged: changed}); err != nil {
			t.Fatal(err)
		}
	}
	reasons := func() map[string]int {
		m := map[string]int{}
		for _, e := range listEvents(t, client) {
			m[e.Type+" "+e.Reason+": "+e.Message]++
		}
		return m
	}
	report(true, bad, list)
	got := reasons()
	if got["Warning "+bad.Reason+": "+bad.Message] != 1 || got["Warning "+list.Reason+": "+list.Message] != 1 {
		t.Errorf("events %v: want one Warning per problem", got)
	}
	// A problem does not hide that every image is present.
	if n := count(got, "Normal "+EventReasonSucceeded); n != 1 {
		t.Errorf("%d PrefetchSucceeded events, want 1: %v", n, got)
	}
	report(false, bad, list) // the same problems soon after: not repeated
	if n := len(listEvents(t, client)); n != 3 {
		t.Errorf("%d events after a repeat, want 3", n)
	}
	clk.SetTime(clk.Now().Add(DefaultRepeatAfter))
	report(false, bad) // still there much later: reported again; list problem gone
	report(false, bad, list)
	if n := len(listEvents(t, client)); n != 5 {
		t.Errorf("%d events, want 5 (bad repeated after RepeatAfter, the list's problem reported again once it came back)", n)
	}
}

func count(m map[string]int, prefix string) int {
	n := 0
	for k, v := range m {
		if strings.HasPrefix(k, prefix) {
			n += v
		}
	}
	return n
}
