package app

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// NodeGateOptions are the flags that let new nodes wait for the list: the
// startup taint the agent removes and the instance's Node condition; embedded
// in Options.
type NodeGateOptions struct {
	StartupTaint bool
	// StartupTaintKey empty means the instance's label key.
	StartupTaintKey    string
	StartupTaintEffect string
	// NodeCondition is off by default: it needs patch on nodes/status, which
	// the base RBAC does not grant (components/startup-taint does).
	NodeCondition bool
}

func defaultNodeGateOptions() NodeGateOptions {
	return NodeGateOptions{StartupTaintEffect: string(nodelabel.DefaultStartupTaintEffect)}
}

func (o *NodeGateOptions) addFlags(fs *pflag.FlagSet) {
	fs.BoolVar(&o.StartupTaint, "startup-taint", o.StartupTaint,
		"Remove the node's startup taint (--startup-taint-key:--startup-taint-effect) once the node holds the whole list and its label says succeeded. The taint is never added back: a later failure does not block or evict a node in use.")
	fs.StringVar(&o.StartupTaintKey, "startup-taint-key", o.StartupTaintKey,
		"Key of the startup taint: image-prefetcher.stackrox.io/<instance> (the default), readiness.k8s.io/<instance> (for the node-readiness-controller) or startup-taint.cluster-autoscaler.kubernetes.io/<instance> (a startup taint to Cluster Autoscaler).")
	fs.StringVar(&o.StartupTaintEffect, "startup-taint-effect", o.StartupTaintEffect,
		"Effect of the startup taint: NoSchedule, PreferNoSchedule or NoExecute. Only a taint with this key and effect is removed.")
	fs.BoolVar(&o.NodeCondition, "node-condition", o.NodeCondition,
		"Keep the Node condition image-prefetcher.stackrox.io/<instance> (True only while the whole current list is present, as the label says) in the node's status; needs patch on nodes/status.")
}

func (o *NodeGateOptions) taintKey(instance string) string {
	if o.StartupTaintKey != "" {
		return o.StartupTaintKey
	}
	return nodelabel.StartupTaintKey(instance)
}

func (o *NodeGateOptions) validate(label bool, instance string) error {
	var errs []error
	if o.StartupTaint && !label {
		errs = append(errs, errors.New("--startup-taint needs --label: the taint goes only once the label says succeeded"))
	}
	if o.NodeCondition && !label {
		errs = append(errs, errors.New("--node-condition needs --label: the condition says what the label says"))
	}
	if o.StartupTaint && nodelabel.ValidateInstance(instance) == nil {
		if err := errors.Join(nodelabel.ValidateTaint(o.taintKey(instance), corev1.TaintEffect(o.StartupTaintEffect)),
			nodelabel.ValidateStartupTaintKey(instance, o.taintKey(instance))); err != nil {
			errs = append(errs, fmt.Errorf("--startup-taint-key/--startup-taint-effect: %w", err))
		}
	}
	return errors.Join(errs...)
}

// nodeGate holds the node writes that gate new nodes; either may be nil.
type nodeGate struct {
	taint *nodelabel.StartupTaint
	cond  *nodelabel.Condition
}

// setupNodeGate builds the node gate on the labels' client when asked for.
func (p *prefetcher) setupNodeGate(client kubernetes.Interface) {
	o := p.opts
	if client == nil || (!o.StartupTaint && !o.NodeCondition) {
		return
	}
	g := &nodeGate{}
	if o.StartupTaint {
		g.taint = &nodelabel.StartupTaint{Client: client, Node: o.NodeName, Key: o.taintKey(o.Instance),
			Effect: corev1.TaintEffect(o.StartupTaintEffect), WriteTimeout: o.LabelWriteTimeout}
	}
	if o.NodeCondition {
		g.cond = &nodelabel.Condition{Client: client, Node: o.NodeName, Instance: o.Instance, WriteTimeout: o.LabelWriteTimeout}
	}
	p.nodeGate = g
}

// conditionStarted runs before startOnNode: when the label is about to stop
// saying succeeded (a new list, or a hole found), the condition goes False
// first, so that it never says True while the label does not. A label that
// keeps saying succeeded (nothing known missing) or says failed (the last
// outcome for this list: the condition is False already) leaves the
// condition alone, so a failing list retried again and again costs no
// condition writes.
func (p *prefetcher) conditionStarted(ctx context.Context, list *imagelist.List, pres presence) {
	if p.nodeGate == nil || p.nodeGate.cond == nil {
		return
	}
	missing := pres.known && len(pres.missing) > 0
	claim, err := p.labels.Claim(ctx, list.Digest)
	if err != nil {
		p.log.Error("read node label", "error", err.Error())
	}
	if claim == nodelabel.Failed || (claim == nodelabel.Succeeded && !missing) {
		return
	}
	msg := fmt.Sprintf("pass of list %s started: %d images", shortDigest(list.Digest), len(list.Entries))
	if missing {
		named := make([]string, 0, 3)
		for _, e := range pres.missing[:min(len(pres.missing), 3)] {
			named = append(named, e.Ref)
		}
		msg = fmt.Sprintf("%d of %d images of list %s missing, pulling them: %s", len(pres.missing), len(list.Entries),
			shortDigest(list.Digest), strings.Join(named, ", "))
	}
	if _, err := p.nodeGate.cond.Set(ctx, corev1.ConditionFalse, nodelabel.ConditionReasonPulling, msg); err != nil {
		// Not fatal: the outcome's write tries again at the end of the pass.
		p.log.Error("write node condition", "error", err.Error())
	}
}

// recordGate writes the condition for the pass's outcome, then removes the
// startup taint when the list is complete, in that order: workloads let onto
// the node find its label and condition already saying so. Both follow the
// label: nothing is written when the label write failed (the node does not
// say the outcome yet; the next pass, within seconds, writes all three). It
// returns the Node event problem of a node kept gated, and sets rep.NodeErr.
func (p *prefetcher) recordGate(ctx context.Context, rep *passReport) []nodelabel.Problem {
	g := p.nodeGate
	if g == nil || rep.LabelErr != nil {
		return nil
	}
	var errs []error
	if g.cond != nil {
		status, reason, msg := p.conditionFor(rep)
		wrote, err := g.cond.Set(ctx, status, reason, msg)
		switch {
		case err != nil:
			errs = append(errs, err)
			p.log.Error("write node condition", "error", err.Error())
		case wrote:
			p.log.Info("node condition written", "condition", string(nodelabel.ConditionType(p.opts.Instance)),
				"status", string(status), "reason", reason)
		}
	}
	var problems []nodelabel.Problem
	if g.taint != nil {
		state, err := g.taint.Sync(ctx, rep.State == nodelabel.Succeeded)
		switch {
		case err != nil:
			errs = append(errs, err)
			p.log.Error("startup taint", "taint", g.taint.String(), "error", err.Error())
		case state == nodelabel.TaintRemoved:
			attrs := []any{"taint", g.taint.String()}
			if !rep.pulledAt.IsZero() {
				attrs = append(attrs, "sinceListPresent", time.Since(rep.pulledAt).Round(time.Millisecond))
			}
			p.log.Info("startup taint removed: the node takes workloads", attrs...)
		case state == nodelabel.TaintKept:
			why := missingSummary(rep.Results, maxMissingLogged)
			if rep.Digest == nodelabel.UnreadableList {
				why = "the image list " + p.opts.ImageList + " cannot be read"
			}
			p.log.Info("the node keeps its startup taint until the list is present", "taint", g.taint.String(), "missing", why)
			problems = append(problems, nodelabel.Problem{
				Reason:  nodelabel.EventReasonNodeGated,
				Key:     "gated\x00" + why,
				Message: fmt.Sprintf("node keeps its startup taint %s until every image of the list is present: %s", g.taint, why),
			})
		}
	}
	rep.NodeErr = errors.Join(errs...)
	return problems
}

// conditionFor is the condition that says what the label says for rep.
func (p *prefetcher) conditionFor(rep *passReport) (corev1.ConditionStatus, string, string) {
	switch {
	case rep.Digest == nodelabel.UnreadableList:
		return corev1.ConditionFalse, nodelabel.ConditionReasonListUnreadable,
			"the image list " + p.opts.ImageList + " cannot be read"
	case rep.State == nodelabel.Succeeded:
		return corev1.ConditionTrue, nodelabel.ConditionReasonPresent,
			fmt.Sprintf("all %d images of list %s are present", len(rep.Results), shortDigest(rep.Digest))
	default:
		return corev1.ConditionFalse, nodelabel.ConditionReasonMissing,
			fmt.Sprintf("list %s: %s", shortDigest(rep.Digest), missingSummary(rep.Results, 3))
	}
}

// missingSummary names the failed images of results with their reasons, at
// most named of them, in a stable order (so that an unchanged failure gives an
// unchanged text: no condition write, no repeated event).
func missingSummary(results []pull.Result, named int) string {
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
