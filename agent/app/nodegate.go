package app

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/nodestate"
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

// setupNode builds the owner of the instance's state on its node: label and
// list annotation (labeler), events, and the startup taint and Node condition
// when asked for, all on the labels' client.
func (p *prefetcher) setupNode(client kubernetes.Interface, labeler *nodelabel.Labeler, log *slog.Logger) {
	o := p.opts
	n := &nodestate.Node{
		Labels:     labeler,
		Events:     &nodelabel.Events{Client: client, Node: o.NodeName, Instance: o.Instance, WriteTimeout: o.LabelWriteTimeout},
		Log:        log,
		Instance:   o.Instance,
		ListFile:   o.ImageList,
		LabelState: p.metrics.SetLabelState,
	}
	if o.StartupTaint {
		n.Taint = &nodelabel.StartupTaint{Client: client, Node: o.NodeName, Key: o.taintKey(o.Instance),
			Effect: corev1.TaintEffect(o.StartupTaintEffect), WriteTimeout: o.LabelWriteTimeout}
	}
	if o.NodeCondition {
		n.Cond = &nodelabel.Condition{Client: client, Node: o.NodeName, Instance: o.Instance, WriteTimeout: o.LabelWriteTimeout}
	}
	p.node = n
}
