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

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Event reasons (the Event's reason field).
const (
	EventReasonFailed    = "PrefetchFailed"
	EventReasonSucceeded = "PrefetchSucceeded"
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
// with the classified reason, and a Normal event when the whole list is
// present.
//
// Events are created synchronously, within WriteTimeout detached from the
// caller's cancellation, so they are delivered before `fetch` exits even when
// the pass ran out of time. To keep a long-running agent from flooding the
// API, an image that keeps failing for the same reason is reported again only
// after RepeatAfter, and at most MaxFailureEvents failures are reported per
// call (the rest are counted in one summary event).
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
	// RepeatAfter is how long an unchanged failure is not reported again. Default DefaultRepeatAfter.
	RepeatAfter time.Duration

	mu  sync.Mutex
	now func() time.Time // for tests
	// reported holds when each current failure (image and reason) was last
	// reported.
	reported map[string]time.Time
	// succeededFor is the list digest the last Normal event was recorded for;
	// empty after a failure, so the next success is reported again.
	succeededFor string
}

func (e *Events) clock() time.Time {
	if e.now != nil {
		return e.now()
	}
	return time.Now()
}

// Report records the events for one finished pass over the list with digest
// listDigest. It returns the errors of the events that could not be created.
func (e *Events) Report(ctx context.Context, listDigest string, results []pull.Result) error {
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

	now := e.clock()
	repeat := e.RepeatAfter
	if repeat <= 0 {
		repeat = DefaultRepeatAfter
	}
	maxEvents := e.MaxFailureEvents
	if maxEvents <= 0 {
		maxEvents = DefaultMaxFailureEvents
	}

	var errs []error
	reported := make(map[string]time.Time)
	sent, suppressed := 0, 0
	for _, r := range results {
		if r.Outcome != pull.OutcomeFailed {
			continue
		}
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

	failed := len(reported) > 0 || sent > 0 || suppressed > 0 || len(errs) > 0
	switch {
	case failed:
		e.succeededFor = ""
	case e.succeededFor != listDigest:
		msg := fmt.Sprintf("all %d images of the list are present (instance %s, list %s)",
			len(results), e.Instance, listDigest)
		if err := e.create(ctx, corev1.EventTypeNormal, EventReasonSucceeded, msg); err != nil {
			errs = append(errs, err)
		} else {
			e.succeededFor = listDigest
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
	now := metav1.NewTime(e.clock())
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
	err := retryTransient(ctx, e.Backoff, func() error {
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
