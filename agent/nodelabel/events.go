package nodelabel

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	utilrand "k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Event reasons (the Event's reason field).
const (
	EventReasonFailed    = "PrefetchFailed"
	EventReasonSucceeded = "PrefetchSucceeded"
	// EventReasonCredentialFileSkipped: a --docker-config file (or an entry in
	// it, or the credential provider config) could not be used; the pulls went
	// on without it.
	EventReasonCredentialFileSkipped = "PrefetchCredentialFileSkipped"
	// EventReasonNodeGated: the node still carries the instance's startup
	// taint because images of the list are missing; the message names them.
	EventReasonNodeGated = "PrefetchNodeGated"
)

// Defaults used when the corresponding Events field is zero.
const (
	DefaultMaxFailureEvents = 10
	DefaultRepeatAfter      = 30 * time.Minute
	// maxMessage keeps messages within the limit of the events.k8s.io API.
	maxMessage = 1024
)

// eventNamespace is where Node events live: nodes are cluster scoped and the
// kubelet records their events in "default", where `kubectl describe node`
// looks for them.
const eventNamespace = metav1.NamespaceDefault

// Events records Kubernetes Events on the Node: a Warning per failed image
// with the classified reason, a Warning per problem with the agent's inputs
// (unreadable list, unusable credential file), and a Normal event when the
// node's label has just become `succeeded`.
//
// Events are created synchronously, within WriteTimeout detached from the
// caller's cancellation, so they are delivered before `fetch` exits even when
// the pass ran out of time. client-go's recorders do not fit: their
// broadcaster sends from a queue in the background and drops what is still
// queued at shutdown, and its correlator would hide the repeats we decide on. To keep a long-running agent from flooding the
// API, an image that keeps failing for the same reason is reported again only
// after RepeatAfter, and at most MaxFailureEvents failures are reported per
// call (the rest are counted in one summary event). A steady state records
// nothing: the Normal event follows the label's change, not the pass.
//
// Messages come from CRI errors and image references; credentials never reach
// them.
type Events struct {
	Client   kubernetes.Interface
	Node     string
	Instance string
	// Component is the event source shown by `kubectl describe node`.
	// Default "image-prefetcher/<instance>".
	Component string
	// WriteTimeout bounds one Report call, retries included. Default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// Backoff spaces retries of transient API errors. Default DefaultBackoff.
	Backoff *wait.Backoff
	// MaxFailureEvents caps the Warning events of one call. Default DefaultMaxFailureEvents.
	MaxFailureEvents int
	// RepeatAfter is how long an unchanged failure or problem is not reported
	// again. Default DefaultRepeatAfter.
	RepeatAfter time.Duration
	// RequestTimeout bounds one create request. Default DefaultRequestTimeout.
	RequestTimeout time.Duration

	mu sync.Mutex
	// Clock is the time source; nil: the real one.
	Clock clock.PassiveClock
	// reported holds when each current failure (image and reason) was last
	// reported; problems likewise, by Problem.Key.
	reported map[string]time.Time
	problems map[string]time.Time
}

// Problem is a fault in the agent's inputs that is not one image's failure:
// an unreadable list, a credential file that could not be used.
type Problem struct {
	// Reason is the event reason, e.g. EventReasonFailed or
	// EventReasonCredentialFileSkipped.
	Reason string
	// Key identifies the problem across passes (e.g. the file and the error),
	// so that an unchanged problem is not reported again before RepeatAfter.
	Key string
	// Message names the file and what is wrong; never a secret.
	Message string
}

// Outcome is what one pass found, as Report records it.
type Outcome struct {
	// Digest is the list's digest (the value of the list annotation).
	Digest   string
	Results  []pull.Result
	Problems []Problem
	// LabelChanged says that this pass changed the node's label to what the
	// results say (the labeler wrote it). The Normal PrefetchSucceeded event
	// is recorded only then: a node that already said `succeeded` for this
	// list (a steady state in `run`, a warm `fetch` in a new process) costs no
	// event.
	LabelChanged bool
}

func (e *Events) now() time.Time {
	if e.Clock != nil {
		return e.Clock.Now()
	}
	return time.Now()
}

// Report records the events for one finished pass. It returns the errors of
// the events that could not be created.
func (e *Events) Report(ctx context.Context, o Outcome) error {
	if e.Client == nil || e.Node == "" {
		return errors.New("node events: no Kubernetes client or node name")
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	timeout := e.WriteTimeout
	if timeout <= 0 {
		timeout = DefaultWriteTimeout
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()

	now := e.now()
	repeat := e.RepeatAfter
	if repeat <= 0 {
		repeat = DefaultRepeatAfter
	}
	maxEvents := e.MaxFailureEvents
	if maxEvents <= 0 {
		maxEvents = DefaultMaxFailureEvents
	}

	var errs []error
	// Problems first: an unreadable list or a skipped credential file
	// explains the failures that follow.
	problems := make(map[string]time.Time)
	for _, pr := range o.Problems {
		if last, ok := e.problems[pr.Key]; ok && now.Sub(last) < repeat {
			problems[pr.Key] = last
			continue
		}
		if err := e.create(ctx, corev1.EventTypeWarning, pr.Reason, pr.Message); err != nil {
			errs = append(errs, err)
			continue
		}
		problems[pr.Key] = now
	}
	e.problems = problems

	reported := make(map[string]time.Time)
	sent, suppressed, failed := 0, 0, 0
	for _, r := range o.Results {
		if r.Outcome != pull.OutcomeFailed {
			continue
		}
		failed++
		reason := r.Reason
		if reason == pull.ReasonNone {
			reason = pull.ReasonUnknown
		}
		key := r.Image + "\x00" + string(reason)
		if last, ok := e.reported[key]; ok && now.Sub(last) < repeat {
			reported[key] = last
			continue
		}
		if sent == maxEvents {
			suppressed++
			continue
		}
		sent++
		if err := e.create(ctx, corev1.EventTypeWarning, EventReasonFailed, failureMessage(r, reason)); err != nil {
			errs = append(errs, err)
			continue // not remembered: tried again next time
		}
		reported[key] = now
	}
	if suppressed > 0 {
		msg := fmt.Sprintf("%d more images failed; see the agent's log and metrics", suppressed)
		if err := e.create(ctx, corev1.EventTypeWarning, EventReasonFailed, msg); err != nil {
			errs = append(errs, err)
		}
	}
	// Failures that are gone are forgotten, so a recurrence is reported at once.
	e.reported = reported

	if failed == 0 && o.LabelChanged {
		msg := fmt.Sprintf("all %d images of the list are present (instance %s, list %s)",
			len(o.Results), e.Instance, o.Digest)
		if err := e.create(ctx, corev1.EventTypeNormal, EventReasonSucceeded, msg); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func failureMessage(r pull.Result, reason pull.Reason) string {
	var b strings.Builder
	fmt.Fprintf(&b, "pull %s", r.Image)
	if r.Line > 0 {
		fmt.Fprintf(&b, " (line %d)", r.Line)
	}
	fmt.Fprintf(&b, ": %s", reason)
	if r.Err != nil {
		fmt.Fprintf(&b, ": %v", r.Err)
	}
	return b.String()
}

func (e *Events) create(ctx context.Context, eventType, reason, message string) error {
	if len(message) > maxMessage {
		message = message[:maxMessage-3] + "..."
	}
	component := e.Component
	if component == "" {
		component = "image-prefetcher/" + e.Instance
	}
	now := metav1.NewTime(e.now())
	prefix := e.Node
	if len(prefix) > 200 {
		prefix = prefix[:200]
	}
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{
			// Unique like the kubelet's names: object name plus time, and a
			// random suffix because several events are made within one tick.
			Name:      fmt.Sprintf("%s.%x.%s", prefix, now.UnixNano(), utilrand.String(5)),
			Namespace: eventNamespace,
		},
		InvolvedObject: corev1.ObjectReference{
			APIVersion: "v1",
			Kind:       "Node",
			Name:       e.Node,
			// The kubelet uses the node name as the UID of its node events;
			// doing the same groups ours with them.
			UID: types.UID(e.Node),
		},
		Reason:              reason,
		Message:             message,
		Type:                eventType,
		Source:              corev1.EventSource{Component: component, Host: e.Node},
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
		ReportingController: "image-prefetcher.stackrox.io/agent",
		ReportingInstance:   e.Node,
	}
	err := retryTransient(ctx, e.Backoff, e.RequestTimeout, func(ctx context.Context) error {
		_, err := e.Client.CoreV1().Events(eventNamespace).Create(ctx, ev, metav1.CreateOptions{})
		return err
	})
	switch {
	case err == nil:
		return nil
	case apierrors.IsForbidden(err):
		return fmt.Errorf("node %s: record event %s %q: forbidden: the agent's ServiceAccount needs create on "+
			"events in namespace %q: %w", e.Node, reason, message, eventNamespace, err)
	default:
		return fmt.Errorf("node %s: record event %s %q: %w", e.Node, reason, message, err)
	}
}
