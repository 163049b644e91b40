package nodelabel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
)

// DefaultStartupTaintEffect is the effect of the startup taint unless told
// otherwise: pods that do not tolerate it are not scheduled on the node, and
// nothing running is evicted.
const DefaultStartupTaintEffect = corev1.TaintEffectNoSchedule

// StartupTaintKey is the default key of an instance's startup taint: its
// label key, so one name says "this instance's images" everywhere.
func StartupTaintKey(instance string) string { return Key(instance) }

// ValidateTaint checks a startup taint's key and effect.
func ValidateTaint(key string, effect corev1.TaintEffect) error {
	var errs []error
	if msgs := validation.IsQualifiedName(key); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("taint key %q: %s", key, strings.Join(msgs, "; ")))
	}
	switch effect {
	case corev1.TaintEffectNoSchedule, corev1.TaintEffectPreferNoSchedule, corev1.TaintEffectNoExecute:
	default:
		errs = append(errs, fmt.Errorf("taint effect %q: want NoSchedule, PreferNoSchedule or NoExecute", effect))
	}
	return errors.Join(errs...)
}

// StartupTaintPrefixes are the prefixes a startup taint's key may have: ours;
// the node-readiness-controller's, whose rules remove taints under it from
// Node conditions such as the instance's; and Cluster Autoscaler's, which
// treats taints under it as startup taints without --startup-taint. The
// name part is always the instance, so that the admission policy can tell the
// agent's own taint from everyone else's (base/admission-policy.yaml lists
// the same keys).
var StartupTaintPrefixes = []string{Domain, "readiness.k8s.io", "startup-taint.cluster-autoscaler.kubernetes.io"}

// StartupTaintKeys are the keys the instance's startup taint may have.
func StartupTaintKeys(instance string) []string {
	keys := make([]string, len(StartupTaintPrefixes))
	for i, p := range StartupTaintPrefixes {
		keys[i] = p + "/" + instance
	}
	return keys
}

// ValidateStartupTaintKey checks that key is one of the instance's
// StartupTaintKeys.
func ValidateStartupTaintKey(instance, key string) error {
	if !slices.Contains(StartupTaintKeys(instance), key) {
		return fmt.Errorf("taint key %q: want one of %s (the admission policy lets the agent remove only those)",
			key, strings.Join(StartupTaintKeys(instance), ", "))
	}
	return nil
}

// StartupTaint removes the startup taint an instance gates its node with, once
// the node holds the instance's whole list.
//
// It is a startup gate: the taint is removed, never added. A node that serves
// workloads is never tainted again by the agent, whatever later passes find,
// so a registry outage or a new list that fails cannot evict or block a node
// that is in use. Once the taint is gone (removed, or found absent) the node is
// not read for it again by this process.
//
// Only the taints with exactly Key and Effect are removed (any value); every
// other taint and every other field of the spec stay as they are. The removal
// is a read-modify-write: a strategic merge patch of spec.taints (an atomic
// list) carrying the resourceVersion read, so a taint added by someone else in
// between is not lost: the patch conflicts and is redone on a fresh read.
//
// A StartupTaint is safe for concurrent use; calls are serialized.
type StartupTaint struct {
	Client kubernetes.Interface
	Node   string
	Key    string
	Effect corev1.TaintEffect
	// WriteTimeout bounds one Sync, retries included. Default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// RequestTimeout bounds one request. Default DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Backoff spaces retries of transient errors and conflicts. Default DefaultBackoff.
	Backoff *wait.Backoff

	mu   sync.Mutex
	gone bool
}

// TaintState is what Sync found or did.
type TaintState int

const (
	// TaintAbsent: the node does not carry the taint (never did, or it was
	// removed earlier).
	TaintAbsent TaintState = iota
	// TaintRemoved: Sync removed it now.
	TaintRemoved
	// TaintKept: the node carries it and the list is not complete: the node
	// stays gated.
	TaintKept
)

// String is the taint as kubectl writes it, key:Effect.
func (s *StartupTaint) String() string { return s.Key + ":" + string(s.Effect) }

// Sync removes the taint when complete (the node holds the whole current list
// and its label says so) and reports whether the node carries it. Once the
// taint is known to be gone it returns TaintAbsent without reading the node.
func (s *StartupTaint) Sync(ctx context.Context, complete bool) (TaintState, error) {
	if s.Client == nil || s.Node == "" {
		return TaintAbsent, errors.New("startup taint: no Kubernetes client or node name")
	}
	if err := ValidateTaint(s.Key, s.Effect); err != nil {
		return TaintAbsent, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gone {
		return TaintAbsent, nil
	}
	timeout := s.WriteTimeout
	if timeout <= 0 {
		timeout = DefaultWriteTimeout
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	state := TaintAbsent
	err := retryTransient(ctx, s.Backoff, s.RequestTimeout, func(ctx context.Context) error {
		node, err := s.Client.CoreV1().Nodes().Get(ctx, s.Node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		kept := make([]corev1.Taint, 0, len(node.Spec.Taints))
		for _, t := range node.Spec.Taints {
			if t.Key != s.Key || t.Effect != s.Effect {
				kept = append(kept, t)
			}
		}
		switch {
		case len(kept) == len(node.Spec.Taints):
			state = TaintAbsent
			return nil
		case !complete:
			state = TaintKept
			return nil
		}
		body, err := taintPatch(node, kept)
		if err != nil {
			return err
		}
		if _, err := s.Client.CoreV1().Nodes().Patch(ctx, s.Node, types.StrategicMergePatchType, body, metav1.PatchOptions{}); err != nil {
			return err
		}
		state = TaintRemoved
		return nil
	})
	if err != nil {
		if apierrors.IsForbidden(err) {
			return TaintAbsent, fmt.Errorf("node %s: remove startup taint %s: forbidden: the agent's ServiceAccount "+
				"needs get and patch on nodes (and, with the bundle's admission policy, the policy's taint key and "+
				"effect must be this one): %w", s.Node, s, err)
		}
		return TaintAbsent, fmt.Errorf("node %s: remove startup taint %s: %w", s.Node, s, err)
	}
	if state != TaintKept {
		s.gone = true
	}
	return state, nil
}

// taintPatch is the strategic merge patch from node to node with taints kept.
// The base lacks the resourceVersion, so the patch carries it: the API server
// then applies it only to that version of the node.
func taintPatch(node *corev1.Node, kept []corev1.Taint) ([]byte, error) {
	base := node.DeepCopy()
	base.ResourceVersion = ""
	want := node.DeepCopy()
	want.Spec.Taints = kept
	oldJSON, err := json.Marshal(base)
	if err != nil {
		return nil, fmt.Errorf("encode node: %w", err)
	}
	newJSON, err := json.Marshal(want)
	if err != nil {
		return nil, fmt.Errorf("encode node: %w", err)
	}
	patch, err := strategicpatch.CreateTwoWayMergePatch(oldJSON, newJSON, corev1.Node{})
	if err != nil {
		return nil, fmt.Errorf("taint patch: %w", err)
	}
	return patch, nil
}
