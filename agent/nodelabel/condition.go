package nodelabel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
)

// ConditionType is the type of an instance's Node condition. It is the
// instance's label key: one name per instance for users and for tools such as
// node-readiness-controller, under our domain, and valid as a condition type
// (a qualified name, the pattern of metav1.Condition's type).
func ConditionType(instance string) corev1.NodeConditionType {
	return corev1.NodeConditionType(Key(instance))
}

// Reasons of the Node condition. True has one reason; False says why.
const (
	// ConditionReasonPresent: every image of the current list is present.
	ConditionReasonPresent = "ImagesPresent"
	// ConditionReasonPulling: a new list started, or an image of the list
	// went missing and is pulled again; the outcome is not known yet.
	ConditionReasonPulling = "ImagesPulling"
	// ConditionReasonMissing: the pass ended with images of the list missing.
	ConditionReasonMissing = "ImagesMissing"
	// ConditionReasonListUnreadable: the list file cannot be read.
	ConditionReasonListUnreadable = "ListUnreadable"
)

// maxConditionMessage keeps the condition short on `kubectl describe node`.
const maxConditionMessage = 1024

// Condition maintains one instance's condition in the Node's status, through
// the nodes/status subresource.
//
// It is written only on change: Set compares status, reason and message with
// what the node holds and patches only when they differ, so a steady state
// costs no write. The patch is a strategic merge patch of the conditions list
// (merged by type: the kubelet's and other writers' conditions are left alone)
// that carries the node's resourceVersion, so lastTransitionTime is computed
// from the condition it replaces; a conflict (the kubelet updated the status in
// between) reads the node again and retries. Like the label, a write has its
// own time budget, detached from the caller's cancellation.
//
// A Condition is safe for concurrent use; calls are serialized.
type Condition struct {
	Client   kubernetes.Interface
	Node     string
	Instance string
	// WriteTimeout bounds one Set, retries included. Default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// RequestTimeout bounds one request. Default DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Backoff spaces retries of transient errors and conflicts. Default DefaultBackoff.
	Backoff *wait.Backoff
	// MaxCacheAge is how long the condition last read or written is trusted
	// before the node is read again. Default DefaultMaxCacheAge.
	MaxCacheAge time.Duration

	mu sync.Mutex
	// Clock is the time source; nil: the real one.
	Clock   clock.PassiveClock
	known   *corev1.NodeCondition
	knownAt time.Time
}

func (c *Condition) now() time.Time {
	if c.Clock != nil {
		return c.Clock.Now()
	}
	return time.Now()
}

// Set makes the node's condition say status with reason and message, unless it
// already does; wrote reports whether the node was patched.
func (c *Condition) Set(ctx context.Context, status corev1.ConditionStatus, reason, message string) (wrote bool, err error) {
	if c.Client == nil || c.Node == "" {
		return false, errors.New("node condition: no Kubernetes client or node name")
	}
	if err := ValidateInstance(c.Instance); err != nil {
		return false, err
	}
	if len(message) > maxConditionMessage {
		message = message[:maxConditionMessage-3] + "..."
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	same := func(cur *corev1.NodeCondition) bool {
		return cur != nil && cur.Status == status && cur.Reason == reason && cur.Message == message
	}
	maxAge := c.MaxCacheAge
	if maxAge <= 0 {
		maxAge = DefaultMaxCacheAge
	}
	if c.known != nil && c.now().Sub(c.knownAt) < maxAge && same(c.known) {
		return false, nil
	}
	ctx, cancel := c.writeContext(ctx)
	defer cancel()
	typ := ConditionType(c.Instance)
	err = retryTransient(ctx, c.Backoff, c.RequestTimeout, func(ctx context.Context) error {
		// Read, compare and patch in each attempt: after a conflict the
		// comparison and lastTransitionTime need the node as it is now.
		node, err := c.Client.CoreV1().Nodes().Get(ctx, c.Node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		cur := findCondition(node.Status.Conditions, typ)
		if same(cur) {
			c.remember(cur)
			wrote = false
			return nil
		}
		now := metav1.NewTime(c.now())
		want := corev1.NodeCondition{Type: typ, Status: status, Reason: reason, Message: message,
			LastHeartbeatTime: now, LastTransitionTime: now}
		if cur != nil && cur.Status == status {
			want.LastTransitionTime = cur.LastTransitionTime
		}
		body, err := json.Marshal(map[string]any{
			// The resourceVersion makes the patch conditional: 409 if the node
			// changed since it was read.
			"metadata": map[string]any{"resourceVersion": node.ResourceVersion},
			"status":   map[string]any{"conditions": []corev1.NodeCondition{want}},
		})
		if err != nil {
			return fmt.Errorf("encode patch: %w", err)
		}
		patched, err := c.Client.CoreV1().Nodes().Patch(ctx, c.Node, types.StrategicMergePatchType, body,
			metav1.PatchOptions{}, "status")
		if err != nil {
			return err
		}
		if got := findCondition(patched.Status.Conditions, typ); got != nil {
			c.remember(got)
		} else {
			c.remember(&want)
		}
		wrote = true
		return nil
	})
	if err != nil {
		c.known = nil
		return false, c.describe(fmt.Sprintf("condition %s=%s (%s)", typ, status, reason), err)
	}
	return wrote, nil
}

// writeContext is the budget of one write (WriteTimeout), detached from the
// caller's cancellation like the label's.
func (c *Condition) writeContext(ctx context.Context) (context.Context, context.CancelFunc) {
	timeout := c.WriteTimeout
	if timeout <= 0 {
		timeout = DefaultWriteTimeout
	}
	return context.WithTimeout(context.WithoutCancel(ctx), timeout)
}

func (c *Condition) remember(cond *corev1.NodeCondition) {
	cp := *cond
	c.known, c.knownAt = &cp, c.now()
}

func findCondition(conds []corev1.NodeCondition, typ corev1.NodeConditionType) *corev1.NodeCondition {
	for i := range conds {
		if conds[i].Type == typ {
			return &conds[i]
		}
	}
	return nil
}

func (c *Condition) describe(what string, err error) error {
	if apierrors.IsForbidden(err) {
		return fmt.Errorf("node %s: %s: forbidden: the agent's ServiceAccount needs get on nodes and patch on "+
			"nodes/status (components/startup-taint grants it): %w", c.Node, what, err)
	}
	return fmt.Errorf("node %s: %s: %w", c.Node, what, err)
}

// Remove deletes this instance's condition from the node's status, for an
// agent that leaves the node (its DaemonSet gone, or its placement no longer
// selecting the node). Removing a condition that is not there writes nothing.
func (c *Condition) Remove(ctx context.Context) (wrote bool, err error) {
	if c.Client == nil || c.Node == "" {
		return false, errors.New("node condition: no Kubernetes client or node name")
	}
	if err := ValidateInstance(c.Instance); err != nil {
		return false, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ctx, cancel := c.writeContext(ctx)
	defer cancel()
	typ := ConditionType(c.Instance)
	err = retryTransient(ctx, c.Backoff, c.RequestTimeout, func(ctx context.Context) error {
		node, err := c.Client.CoreV1().Nodes().Get(ctx, c.Node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if findCondition(node.Status.Conditions, typ) == nil {
			wrote = false
			return nil
		}
		// The conditions list merges by type: this deletes only ours.
		body, err := json.Marshal(map[string]any{
			"metadata": map[string]any{"resourceVersion": node.ResourceVersion},
			"status": map[string]any{"conditions": []map[string]any{
				{"type": string(typ), "$patch": "delete"},
			}},
		})
		if err != nil {
			return fmt.Errorf("encode patch: %w", err)
		}
		if _, err := c.Client.CoreV1().Nodes().Patch(ctx, c.Node, types.StrategicMergePatchType, body,
			metav1.PatchOptions{}, "status"); err != nil {
			return err
		}
		wrote = true
		return nil
	})
	c.known = nil
	if err != nil {
		return false, c.describe(fmt.Sprintf("remove condition %s", typ), err)
	}
	return wrote, nil
}
