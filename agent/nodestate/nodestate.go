// Package nodestate is the one owner of what an instance keeps on its node:
// the label and list annotation, the Node condition, the startup taint, the
// Node events and (when it leaves) the pins. Its methods are the moments of a
// pass, and each writes in the order that keeps every moment true:
//
//   - StopClaiming, before any pull of a list the node does not fully hold:
//     condition False, then the label withdrawn (or, for a new list with
//     nothing known missing, a label of another list cleared);
//   - Record, once the pass's outcome rests on a presence check of the whole
//     list: label, then condition, then the startup taint's removal, then
//     events; nothing after a label write that failed but the events;
//   - Leave, when the node is no longer the instance's: label, condition,
//     taint, and the pins last, only once the label no longer says succeeded.
//
// Workloads schedule on the label and the taint: whatever the label says, the
// condition and the taint never claim more.
package nodestate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Labels is the instance's label and list annotation (nodelabel.Labeler).
type Labels interface {
	// Begin: a pass starts for the list; Withdraw: likewise, and an image of
	// it is known to be missing, so `succeeded` must go until it is back.
	Begin(ctx context.Context, listDigest string) error
	Withdraw(ctx context.Context, listDigest string) error
	// Set records the outcome; wrote says whether the node changed.
	Set(ctx context.Context, listDigest string, state nodelabel.State) (wrote bool, err error)
	// Claim is what the node's label says about the list.
	Claim(ctx context.Context, listDigest string) (nodelabel.State, error)
	// CheckOwner fails with a *nodelabel.ConflictError while another
	// namespace's instance of this name holds the node's keys.
	CheckOwner(ctx context.Context) error
	// Remove deletes the label and list annotation.
	Remove(ctx context.Context) error
}

// Condition is the instance's Node condition (nodelabel.Condition).
type Condition interface {
	Set(ctx context.Context, status corev1.ConditionStatus, reason, message string) (wrote bool, err error)
	Remove(ctx context.Context) (wrote bool, err error)
}

// Taint is the instance's startup taint (nodelabel.StartupTaint).
type Taint interface {
	// Sync removes the taint when complete and says what the node carries.
	Sync(ctx context.Context, complete bool) (nodelabel.TaintState, error)
	String() string
}

// Events records the outcome's Node events (nodelabel.Events).
type Events interface {
	Report(ctx context.Context, o nodelabel.Outcome) error
}

// Node writes the instance's state on its node. Labels and Events are
// required; Cond and Taint are nil unless asked for.
type Node struct {
	Labels Labels
	Cond   Condition
	Taint  Taint
	Events Events
	Log    *slog.Logger
	// Instance names the condition in logs; ListFile the list in the texts
	// of an unreadable list.
	Instance, ListFile string
	// LabelState, when set, is told what the label says after each write
	// ("" once `succeeded` is withdrawn): the agent's metric.
	LabelState func(state string)
}

// Missing is what a pass found of its list before pulling.
type Missing struct {
	Digest string
	// Images is the list's size; Refs the images not known present.
	Images int
	Refs   []string
	// Known: the runtime was asked (without an answer nothing is known
	// missing, and the label of another list is only cleared).
	Known bool
}

// maxNamed bounds the images a condition or readiness text names.
const maxNamed = 3

// Text says which images are missing and being pulled, naming the first
// few: the condition's message and the agent's readiness say the same.
func (m Missing) Text() string {
	named := m.Refs[:min(len(m.Refs), maxNamed)]
	return fmt.Sprintf("%d of %d images of list %s missing, pulling them: %s", len(m.Refs), m.Images,
		ShortDigest(m.Digest), strings.Join(named, ", "))
}

func (m Missing) any() bool { return m.Known && len(m.Refs) > 0 }

// StopClaiming makes the node stop claiming what it does not hold, before any
// pull starts: when the label is about to stop saying succeeded (a new list,
// or a hole) the condition goes False first, so it never says True while the
// label does not; then a label of another list is cleared (Begin) or, with an
// image known missing, `succeeded` is withdrawn, so that the re-pull (and a
// shutdown in its middle) never runs under `succeeded`. Both write only on
// change: a steady state costs nothing. It returns the error of a withdrawal
// that failed; clearing another list's label that fails is only logged (it
// claims nothing of this list).
func (n *Node) StopClaiming(ctx context.Context, m Missing) error {
	n.conditionStarted(ctx, m)
	if m.any() {
		n.Log.Info("images of the list missing: the label does not say succeeded until they are back",
			"missing", len(m.Refs), "images", m.Images, "first", m.Refs[0])
		if err := n.Labels.Withdraw(ctx, m.Digest); err != nil {
			return fmt.Errorf("withdraw %s for list %s with %s missing: %w", nodelabel.Succeeded,
				ShortDigest(m.Digest), m.Refs[0], err)
		}
		n.labelState("")
		return nil
	}
	if err := n.Labels.Begin(ctx, m.Digest); err != nil {
		n.Log.Error("clear stale node label", "error", err.Error())
	}
	return nil
}

// conditionStarted sets the condition False for a pass that will make the
// label stop saying succeeded. A label that keeps saying succeeded (nothing
// known missing) or says failed (the condition is False already) leaves it
// alone, so a failing list retried again and again costs no condition writes.
func (n *Node) conditionStarted(ctx context.Context, m Missing) {
	if n.Cond == nil {
		return
	}
	claim, err := n.Labels.Claim(ctx, m.Digest)
	if err != nil {
		n.Log.Error("read node label", "error", err.Error())
	}
	if claim == nodelabel.Failed || (claim == nodelabel.Succeeded && !m.any()) {
		return
	}
	msg := fmt.Sprintf("pass of list %s started: %d images", ShortDigest(m.Digest), m.Images)
	if m.any() {
		msg = m.Text()
	}
	if _, err := n.Cond.Set(ctx, corev1.ConditionFalse, nodelabel.ConditionReasonPulling, msg); err != nil {
		// Not fatal: the outcome's write tries again at the end of the pass.
		n.Log.Error("write node condition", "error", err.Error())
	}
}

// Withdrawal is a withdrawal of `succeeded` retried in the background.
type Withdrawal struct {
	stop, done chan struct{}
}

// Bounds of the delay between two withdrawals in the background: each one
// retries for its whole write budget already, so these only space out
// answers that come at once (Forbidden, an unknown Node).
const (
	withdrawRetryMin = 200 * time.Millisecond
	withdrawRetryMax = 4 * time.Second
)

// KeepWithdrawing tries the condition and the withdrawal again and again in
// the background, after StopClaiming failed to withdraw, until the label is
// withdrawn, End is called or ctx ends: `succeeded` stands over a missing
// image only as long as the API server takes no write, while the pulls,
// which are what the node needs, go on.
func (n *Node) KeepWithdrawing(ctx context.Context, m Missing) *Withdrawal {
	w := &Withdrawal{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		delay := withdrawRetryMin
		for {
			t := time.NewTimer(delay)
			select {
			case <-w.stop:
				t.Stop()
				return
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			select {
			case <-w.stop:
				return
			default:
			}
			n.conditionStarted(ctx, m)
			if err := n.Labels.Withdraw(ctx, m.Digest); err == nil {
				n.labelState("")
				n.Log.Info("node label withdrawn: it no longer says succeeded with images missing",
					"label", nodelabel.Key(n.Instance))
				return
			}
			delay = min(2*delay, withdrawRetryMax)
		}
	}()
	return w
}

// End stops the retries; with wait it returns only once no withdrawal is in
// flight, so that none lands after the outcome's write. A pass stopped by
// shutdown writes no outcome and does not wait.
func (w *Withdrawal) End(wait bool) {
	if w == nil {
		return
	}
	close(w.stop)
	if wait {
		<-w.done
	}
}

// Outcome is what a pass found, to be recorded on the node.
type Outcome struct {
	// Digest is the list's digest, or nodelabel.UnreadableList.
	Digest   string
	State    nodelabel.State
	Results  []pull.Result
	Problems []nodelabel.Problem
	// PresentAt is when the whole list was last seen present (logged with
	// the taint's removal).
	PresentAt time.Time
}

// Recorded says what of an outcome did not reach the node.
type Recorded struct {
	// LabelErr is the label write's error; nil once the node says the
	// outcome (or already said it).
	LabelErr error
	// NodeErr joins the condition's and the taint's errors.
	NodeErr error
}

// maxGatedNamed bounds the images the log line and event of a node kept
// gated name.
const maxGatedNamed = 20

// Record writes the outcome: label first (what workloads schedule on), then
// the condition, then the startup taint's removal when the list is complete,
// then the events. The condition and the taint follow the label: nothing of
// them is written when the label write failed (the node does not say the
// outcome yet; the next pass writes all three). Each write has its own time
// budget, so an expired pass deadline does not stop `failed` from being
// written.
func (n *Node) Record(ctx context.Context, o Outcome) Recorded {
	var rec Recorded
	wrote, err := n.Labels.Set(ctx, o.Digest, o.State)
	if err != nil {
		rec.LabelErr = err
		n.Log.Error("write node label", "state", string(o.State), "error", err.Error())
	} else {
		n.labelState(string(o.State))
		if wrote {
			n.Log.Info("node label written", "label", nodelabel.Key(n.Instance), "value", string(o.State))
		}
	}
	problems := o.Problems
	if rec.LabelErr == nil {
		var gated []nodelabel.Problem
		gated, rec.NodeErr = n.recordGate(ctx, o)
		problems = append(problems, gated...)
	}
	// The success event follows the label's change, not the pass: a node that
	// already said succeeded for this list (steady state, warm fetch) gets none.
	eo := nodelabel.Outcome{Digest: o.Digest, Results: o.Results, Problems: problems, LabelChanged: wrote}
	if err := n.Events.Report(ctx, eo); err != nil {
		n.Log.Error("record node events", "error", err.Error())
	}
	return rec
}

// recordGate writes the condition for the outcome, then removes the startup
// taint when the list is complete, in that order: workloads let onto the
// node find its label and condition already saying so. It returns the event
// of a node kept gated.
func (n *Node) recordGate(ctx context.Context, o Outcome) ([]nodelabel.Problem, error) {
	var errs []error
	if n.Cond != nil {
		status, reason, msg := n.conditionFor(o)
		wrote, err := n.Cond.Set(ctx, status, reason, msg)
		switch {
		case err != nil:
			errs = append(errs, err)
			n.Log.Error("write node condition", "error", err.Error())
		case wrote:
			n.Log.Info("node condition written", "condition", string(nodelabel.ConditionType(n.Instance)),
				"status", string(status), "reason", reason)
		}
	}
	var problems []nodelabel.Problem
	if n.Taint != nil {
		state, err := n.Taint.Sync(ctx, o.State == nodelabel.Succeeded)
		switch {
		case err != nil:
			errs = append(errs, err)
			n.Log.Error("startup taint", "taint", n.Taint.String(), "error", err.Error())
		case state == nodelabel.TaintRemoved:
			attrs := []any{"taint", n.Taint.String()}
			if !o.PresentAt.IsZero() {
				attrs = append(attrs, "sinceListPresent", time.Since(o.PresentAt).Round(time.Millisecond))
			}
			n.Log.Info("startup taint removed: the node takes workloads", attrs...)
		case state == nodelabel.TaintKept:
			why := MissingSummary(o.Results, maxGatedNamed)
			if o.Digest == nodelabel.UnreadableList {
				why = "the image list " + n.ListFile + " cannot be read"
			}
			n.Log.Info("the node keeps its startup taint until the list is present", "taint", n.Taint.String(), "missing", why)
			problems = append(problems, nodelabel.Problem{
				Reason:  nodelabel.EventReasonNodeGated,
				Key:     "gated\x00" + why,
				Message: fmt.Sprintf("node keeps its startup taint %s until every image of the list is present: %s", n.Taint, why),
			})
		}
	}
	return problems, errors.Join(errs...)
}

// conditionFor is the condition that says what the label says for o.
func (n *Node) conditionFor(o Outcome) (corev1.ConditionStatus, string, string) {
	switch {
	case o.Digest == nodelabel.UnreadableList:
		return corev1.ConditionFalse, nodelabel.ConditionReasonListUnreadable,
			"the image list " + n.ListFile + " cannot be read"
	case o.State == nodelabel.Succeeded:
		return corev1.ConditionTrue, nodelabel.ConditionReasonPresent,
			fmt.Sprintf("all %d images of list %s are present", len(o.Results), ShortDigest(o.Digest))
	default:
		return corev1.ConditionFalse, nodelabel.ConditionReasonMissing,
			fmt.Sprintf("list %s: %s", ShortDigest(o.Digest), MissingSummary(o.Results, maxNamed))
	}
}

// Leave withdraws what the instance keeps on the node, in the order that
// keeps every moment true: the label and list annotation first (workloads
// stop landing on the promise), then the condition, then the startup taint
// (nothing would ever remove it otherwise), and the pins last (releasePins,
// nil when nothing is pinned), only once the label no longer says succeeded.
// A step that fails is in the error and the others still run, except that
// pins stay when the label could not be withdrawn.
func (n *Node) Leave(ctx context.Context, releasePins func(context.Context) error) error {
	var errs []error
	labelErr := n.Labels.Remove(ctx)
	if labelErr != nil {
		errs = append(errs, fmt.Errorf("label: %w", labelErr))
	} else {
		n.labelState("")
	}
	if n.Cond != nil {
		if _, err := n.Cond.Remove(ctx); err != nil {
			errs = append(errs, fmt.Errorf("condition: %w", err))
		}
	}
	if n.Taint != nil {
		if _, err := n.Taint.Sync(ctx, true); err != nil {
			errs = append(errs, fmt.Errorf("startup taint: %w", err))
		}
	}
	switch {
	case releasePins == nil:
	case labelErr != nil:
		errs = append(errs, errors.New("pins kept: the label could not be withdrawn, and an unpinned image may go while it says succeeded"))
	default:
		if err := releasePins(ctx); err != nil {
			errs = append(errs, fmt.Errorf("pins: %w", err))
		}
	}
	return errors.Join(errs...)
}

func (n *Node) labelState(s string) {
	if n.LabelState != nil {
		n.LabelState(s)
	}
}

// MissingSummary names the failed images of results with their reasons, at
// most named of them, in a stable order (so that an unchanged failure gives an
// unchanged text: no condition write, no repeated event).
func MissingSummary(results []pull.Result, named int) string {
	var failed []string
	for _, r := range results {
		if r.Outcome == pull.OutcomeFailed {
			failed = append(failed, fmt.Sprintf("%s (%s)", r.Image, r.Reason))
		}
	}
	slices.Sort(failed)
	msg := fmt.Sprintf("%d of %d images missing", len(failed), len(results))
	if len(failed) == 0 {
		return msg
	}
	msg += ": " + strings.Join(failed[:min(len(failed), named)], ", ")
	if len(failed) > named {
		msg += fmt.Sprintf(" and %d more", len(failed)-named)
	}
	return msg
}

// ShortDigest is the first 12 characters of a list digest, for texts.
func ShortDigest(d string) string {
	if len(d) > 12 {
		return d[:12]
	}
	return d
}
