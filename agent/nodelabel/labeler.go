package nodelabel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
)

// Defaults used when the corresponding Labeler field is zero.
const (
	DefaultWriteTimeout   = 30 * time.Second
	DefaultMaxCacheAge    = time.Minute
	DefaultRequestTimeout = 10 * time.Second
)

// DefaultBackoff spaces the retries of one write: 0.2 s doubling up to 4 s,
// with jitter. It sets no limit on the number of retries, on purpose: a write
// ends when it succeeds, when it fails permanently (Forbidden, NotFound, ...)
// or when its time budget (WriteTimeout) is spent, never because a retry count
// ran out. Once the API server is back, the write lands within one cap (4-5 s).
var DefaultBackoff = wait.Backoff{Duration: 200 * time.Millisecond, Factor: 2, Jitter: 0.25, Steps: math.MaxInt32, Cap: 4 * time.Second}

// Labeler maintains one instance's label and list annotation on one Node.
//
// Every pass calls Begin with the digest of the list it is about to fetch, then
// Set with the outcome. Writes are JSON merge patches that name only this
// instance's two keys, so all other labels and annotations (and other
// instances) are left alone, and they are only sent when the node's values
// differ from the wanted ones.
//
// Writes never run on the caller's context: each write gets WriteTimeout of
// its own, detached from the caller's cancellation, so a pass that ran out of
// time or a SIGTERM still records `failed`. Within that budget a write is
// retried on every transient error (API server down or restarting, conflict,
// 429, 5xx) for as long as the budget lasts.
//
// A Labeler is safe for concurrent use; calls are serialized.
type Labeler struct {
	Client   kubernetes.Interface
	Node     string
	Instance string
	// WriteTimeout bounds one write, retries included: the write is retried
	// until it is spent. Default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// RequestTimeout bounds one request within the write, so that a request
	// that hangs (a connection to a dead server) is abandoned and retried on a
	// new one. Default DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Backoff spaces retries of transient API errors. Its Steps do not end the
	// retries (only the budget does): after Steps growths, or at Cap, the
	// delay stays constant. Default DefaultBackoff.
	Backoff *wait.Backoff
	// MaxCacheAge is how long the node state learned from the last read or
	// write is trusted before the node is read again, so that a label someone
	// else removed or changed is put back within a pass or two without a GET on
	// every call. Default DefaultMaxCacheAge.
	MaxCacheAge time.Duration
	// Namespace is the instance's namespace. The label key is cluster-wide
	// while instances are namespaced: writes name it as their field manager
	// (FieldManagerPrefix + Namespace), so the node tells which namespace's
	// instance wrote the keys. Empty: the default field manager, no check.
	Namespace string
	// InstanceAlive, with Namespace, reports whether the instance of the same
	// name in another namespace still exists. When the node's list annotation
	// was last written by a live one, every write and claim fails with a
	// *ConflictError instead of fighting over the label: the first instance
	// keeps the key, the later one is refused. A stale writer (uninstalled,
	// its keys left behind) is taken over.
	InstanceAlive func(ctx context.Context, namespace string) (bool, error)

	mu sync.Mutex
	// Clock is the time source; nil: the real one.
	Clock clock.PassiveClock
	// known is the last seen state of this instance's keys on the node.
	known   *observed
	knownAt time.Time
	// noGet is set after a GET was forbidden (RBAC granting patch only): the
	// cache learned from patch responses is then trusted without expiry.
	noGet bool
}

// observed is this instance's view of the node: the label and annotation
// values, and whether they exist at all (an empty value is not an absent key).
type observed struct {
	label, digest       string
	hasLabel, hasDigest bool
	// otherNamespace: the namespace of another instance of this name that
	// last wrote the list annotation (its field manager), if any.
	otherNamespace string
	// unknown: the node could not be read, so every operation writes.
	unknown bool
}

func (l *Labeler) now() time.Time {
	if l.Clock != nil {
		return l.Clock.Now()
	}
	return time.Now()
}

func (l *Labeler) check() error {
	if l.Client == nil {
		return errors.New("node labeler: no Kubernetes client")
	}
	if l.Node == "" {
		return errors.New("node labeler: no node name (set --node-name or NODE_NAME)")
	}
	return ValidateInstance(l.Instance)
}

// Begin is called when a pass starts for the list with digest listDigest. When
// the node's label describes another list (or no list), the label is removed
// and the annotation set to listDigest in one patch, so the node never keeps
// `succeeded` for a list other than the current one. When the annotation
// already holds listDigest, nothing is written: a restarted agent keeps the
// label it wrote for the same list until the new pass decides.
func (l *Labeler) Begin(ctx context.Context, listDigest string) error {
	if listDigest == "" {
		return errors.New("node labeler: empty list digest")
	}
	_, err := l.update(ctx, func(cur observed) bool { return cur.hasDigest && cur.digest == listDigest },
		nil, &listDigest, "start list "+listDigest)
	return err
}

// Withdraw is Begin for a node known not to hold the whole list (an image of
// it is missing): besides what Begin does, a `succeeded` label is removed even
// when it describes this list, so the node stops claiming the list while it
// is pulled again. A `failed` label of this list stays (it is still true), and
// a node that already carries no `succeeded` for the list costs no write.
func (l *Labeler) Withdraw(ctx context.Context, listDigest string) error {
	if listDigest == "" {
		return errors.New("node labeler: empty list digest")
	}
	_, err := l.update(ctx, func(cur observed) bool {
		return cur.hasDigest && cur.digest == listDigest && !(cur.hasLabel && cur.label == string(Succeeded))
	}, nil, &listDigest, "withdraw "+string(Succeeded)+" for list "+listDigest)
	return err
}

// Set records state for the list with digest listDigest, unless the node
// already says exactly that. wrote reports whether the node was changed (false
// when it already said so, as in a steady state or a warm `fetch`).
func (l *Labeler) Set(ctx context.Context, listDigest string, state State) (wrote bool, err error) {
	if !state.Valid() {
		return false, fmt.Errorf("node labeler: invalid state %q (want %q or %q)", state, Succeeded, Failed)
	}
	if listDigest == "" {
		return false, errors.New("node labeler: empty list digest")
	}
	value := string(state)
	return l.update(ctx, func(cur observed) bool {
		return cur.hasLabel && cur.label == value && cur.hasDigest && cur.digest == listDigest
	}, &value, &listDigest, "set "+value)
}

// Claim returns what the node's label says about the list listDigest:
// Succeeded or Failed when the label describes that list, "" when the node
// carries no label for it, or when its state cannot be known (RBAC without
// get, before the first write). It reads the node only when the labeler's
// cache is too old (the read then serves the write that follows, too).
func (l *Labeler) Claim(ctx context.Context, listDigest string) (State, error) {
	var state State
	err := l.withOwned(ctx, func(_ context.Context, cur observed) error {
		if !cur.unknown && cur.hasLabel && cur.hasDigest && cur.digest == listDigest && State(cur.label).Valid() {
			state = State(cur.label)
		}
		return nil
	})
	return state, err
}

// CheckOwner returns a *ConflictError while a live instance of this name in
// another namespace holds the node's keys (see InstanceAlive); it reads the
// node only when the cache is too old.
func (l *Labeler) CheckOwner(ctx context.Context) error {
	return l.withOwned(ctx, func(context.Context, observed) error { return nil })
}

// withOwned runs fn, under the labeler's lock and write budget, with the
// node's known state, once it is known that no live instance of this name in
// another namespace holds the node's keys.
func (l *Labeler) withOwned(ctx context.Context, fn func(context.Context, observed) error) error {
	if err := l.check(); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	ctx, cancel := l.writeContext(ctx)
	defer cancel()
	cur, err := l.current(ctx)
	if err != nil {
		return err
	}
	if err := l.checkOwner(ctx, cur); err != nil {
		return err
	}
	return fn(ctx, cur)
}

// Remove deletes this instance's label and annotation from the node, for
// uninstall and cleanup. Removing what is not there writes nothing.
func (l *Labeler) Remove(ctx context.Context) error {
	_, err := l.update(ctx, func(cur observed) bool { return !cur.hasLabel && !cur.hasDigest }, nil, nil, "remove")
	return err
}

// update patches this instance's label and annotation to label and digest
// (nil removes the key) unless done says the node already holds what is
// wanted. It runs under the write budget, detached from ctx's cancellation,
// and reports whether it patched the node.
func (l *Labeler) update(ctx context.Context, done func(observed) bool, label, digest *string, what string) (bool, error) {
	wrote := false
	err := l.withOwned(ctx, func(ctx context.Context, cur observed) error {
		if !cur.unknown && done(cur) {
			return nil
		}
		if err := l.patch(ctx, label, digest, what); err != nil {
			return err
		}
		wrote = true
		return nil
	})
	return wrote, err
}

// writeContext detaches from the caller's cancellation and deadline (but
// keeps its values) and applies the write budget.
func (l *Labeler) writeContext(ctx context.Context) (context.Context, context.CancelFunc) {
	timeout := l.WriteTimeout
	if timeout <= 0 {
		timeout = DefaultWriteTimeout
	}
	return context.WithTimeout(context.WithoutCancel(ctx), timeout)
}

// current returns the known state, reading the node when the cache is empty or
// too old.
func (l *Labeler) current(ctx context.Context) (observed, error) {
	maxAge := l.MaxCacheAge
	if maxAge <= 0 {
		maxAge = DefaultMaxCacheAge
	}
	if l.known != nil && (l.noGet || l.now().Sub(l.knownAt) < maxAge) {
		return *l.known, nil
	}
	var node *corev1.Node
	err := l.retry(ctx, func(ctx context.Context) error {
		var err error
		node, err = l.Client.CoreV1().Nodes().Get(ctx, l.Node, metav1.GetOptions{})
		return err
	})
	switch {
	case err == nil:
		l.remember(node)
		return *l.known, nil
	case apierrors.IsForbidden(err):
		// Least-privilege RBAC may grant patch only. Fall back to writing
		// unconditionally once; the patch response then seeds the cache.
		l.noGet = true
		if l.known != nil {
			return *l.known, nil
		}
		return observed{unknown: true}, nil
	default:
		return observed{}, l.describe("read node", err)
	}
}

func (l *Labeler) remember(node *corev1.Node) {
	label, hasLabel := node.Labels[Key(l.Instance)]
	digest, hasDigest := node.Annotations[AnnotationKey(l.Instance)]
	l.known = &observed{label: label, digest: digest, hasLabel: hasLabel, hasDigest: hasDigest,
		otherNamespace: l.otherWriter(node)}
	l.knownAt = l.now()
}

// FieldManagerPrefix starts the field manager of every agent write of the
// node's keys; the instance's namespace follows.
const FieldManagerPrefix = "image-prefetcher."

func (l *Labeler) fieldManager() string {
	if l.Namespace == "" {
		return ""
	}
	return FieldManagerPrefix + l.Namespace
}

// otherWriter is the namespace of another instance of this name whose agent
// owns the node's list annotation (every pass writes it first), from the
// node's managed fields; "" when there is none.
func (l *Labeler) otherWriter(node *corev1.Node) string {
	if l.Namespace == "" {
		return ""
	}
	field := `"f:` + AnnotationKey(l.Instance) + `"`
	for _, m := range node.ManagedFields {
		ns, ours := strings.CutPrefix(m.Manager, FieldManagerPrefix)
		if !ours || ns == l.Namespace || m.FieldsV1 == nil || !strings.Contains(string(m.FieldsV1.Raw), field) {
			continue
		}
		return ns
	}
	return ""
}

// ConflictError: another instance of the same name, in another namespace,
// holds the node's keys.
type ConflictError struct {
	Instance, Namespace, Other string
}

func (e *ConflictError) Error() string {
	return fmt.Sprintf("instance %q also runs in namespace %q, which writes the node's label %s: the label key is "+
		"cluster-wide, so instance names must be too; this one (namespace %q) leaves the node alone: rename it or remove the other",
		e.Instance, e.Other, Key(e.Instance), e.Namespace)
}

// checkOwner refuses to touch the node's keys while a live instance of this
// name in another namespace owns them.
func (l *Labeler) checkOwner(ctx context.Context, cur observed) error {
	if cur.otherNamespace == "" || l.InstanceAlive == nil {
		return nil
	}
	alive, err := l.InstanceAlive(ctx, cur.otherNamespace)
	if err != nil {
		return fmt.Errorf("node %s: instance %q of namespace %q wrote the node's keys; is it still installed? %w",
			l.Node, l.Instance, cur.otherNamespace, err)
	}
	if alive {
		return &ConflictError{Instance: l.Instance, Namespace: l.Namespace, Other: cur.otherNamespace}
	}
	return nil
}

// patch sends one JSON merge patch naming only this instance's keys; a nil
// value deletes the key.
func (l *Labeler) patch(ctx context.Context, label, digest *string, what string) error {
	body, err := json.Marshal(map[string]any{
		"metadata": map[string]any{
			"labels":      map[string]*string{Key(l.Instance): label},
			"annotations": map[string]*string{AnnotationKey(l.Instance): digest},
		},
	})
	if err != nil {
		return fmt.Errorf("node %s: encode patch: %w", l.Node, err)
	}
	var node *corev1.Node
	err = l.retry(ctx, func(ctx context.Context) error {
		var err error
		node, err = l.Client.CoreV1().Nodes().Patch(ctx, l.Node, types.MergePatchType, body, metav1.PatchOptions{FieldManager: l.fieldManager()})
		return err
	})
	if err != nil {
		// The node's state is unknown now; read it again next time.
		l.known = nil
		return l.describe(fmt.Sprintf("label %s: %s", Key(l.Instance), what), err)
	}
	l.remember(node)
	return nil
}

func (l *Labeler) retry(ctx context.Context, fn func(context.Context) error) error {
	return retryTransient(ctx, l.Backoff, l.RequestTimeout, fn)
}

// retryTransient runs fn until it succeeds, fails permanently, or ctx (the
// write's time budget) ends; transient failures are retried with backoff for
// as long as the budget lasts, however many that takes. Each call of fn gets a
// context bounded by requestTimeout, which its requests must use: a request
// that hangs is abandoned and retried rather than eating the whole budget.
func retryTransient(ctx context.Context, b *wait.Backoff, requestTimeout time.Duration, fn func(context.Context) error) error {
	backoff := DefaultBackoff
	if b != nil {
		backoff = *b
	}
	if requestTimeout <= 0 {
		requestTimeout = DefaultRequestTimeout
	}
	start := time.Now()
	attempts := 0
	var last error
	// DelayFunc, unlike ExponentialBackoff, never stops on its own: after
	// Steps (or at Cap) the delay stays constant. Only ctx ends the loop.
	err := backoff.DelayFunc().Until(ctx, true, true, func(ctx context.Context) (bool, error) {
		attempts++
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		defer cancel()
		last = fn(rctx)
		switch {
		case last == nil:
			return true, nil
		case ctx.Err() != nil:
			return false, last // the budget ended during the request
		case Transient(last), rctx.Err() != nil:
			// A request that ran out of its own time is retried on a new one.
			return false, nil
		default:
			// Permanent, or a context error that is not ours (for example
			// client-go's rate limiter giving up): never taken for success.
			return false, last
		}
	})
	if err == nil {
		return nil
	}
	if ctx.Err() != nil && last != nil {
		return fmt.Errorf("gave up after %d attempts in %s, when the write's time budget ended: %w",
			attempts, time.Since(start).Round(time.Millisecond), last)
	}
	return err
}

// Transient reports whether an API error is worth retrying. Context errors
// are not: whether a request that ran out of time is retried depends on whose
// context ended, which retryTransient knows.
func Transient(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	switch {
	case apierrors.IsConflict(err),
		apierrors.IsServerTimeout(err),
		apierrors.IsTimeout(err),
		apierrors.IsTooManyRequests(err),
		apierrors.IsInternalError(err),
		apierrors.IsServiceUnavailable(err),
		apierrors.IsUnexpectedServerError(err),
		utilnet.IsConnectionRefused(err),
		utilnet.IsConnectionReset(err),
		utilnet.IsProbableEOF(err),
		utilnet.IsHTTP2ConnectionLost(err),
		utilnet.IsTimeout(err), // includes TLS handshake timeouts
		errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, syscall.ENETUNREACH),
		errors.Is(err, syscall.EPIPE),
		errors.Is(err, net.ErrClosed):
		return true
	}
	return false
}

// describe wraps err with what was done and, for the errors a user can fix,
// how to fix them.
func (l *Labeler) describe(what string, err error) error {
	switch {
	case apierrors.IsForbidden(err):
		return fmt.Errorf("node %s: %s: forbidden: the agent's ServiceAccount needs get and patch on nodes "+
			"(ClusterRole rules for the core API group, resource nodes): %w", l.Node, what, err)
	case apierrors.IsNotFound(err):
		return fmt.Errorf("node %s: %s: node not found (is --node-name / NODE_NAME the node the pod runs on?): %w",
			l.Node, what, err)
	default:
		return fmt.Errorf("node %s: %s: %w", l.Node, what, err)
	}
}
