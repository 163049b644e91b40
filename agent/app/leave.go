package app

import (
	"context"
	"errors"
	"fmt"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	corev1helpers "k8s.io/component-helpers/scheduling/corev1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"
	"k8s.io/klog/v2"
)

// leaveBudget bounds what a stopping agent does to leave its node: well inside
// the DaemonSet's terminationGracePeriodSeconds (30), so the kubelet does not
// kill it in the middle.
const leaveBudget = 20 * time.Second

// daemonTolerations are the NoExecute tolerations the DaemonSet controller
// adds to every daemon pod (not-ready and unreachable nodes keep their
// daemons), so a node with those taints is still the DaemonSet's.
var daemonTolerations = []corev1.Toleration{
	{Key: corev1.TaintNodeNotReady, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute},
	{Key: corev1.TaintNodeUnreachable, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute},
}

// outOfScope says why ds no longer runs a pod on node, or "" when it still
// does, with the DaemonSet controller's rules for a pod already running: the
// template's node name and required node affinity (nodeSelector included) must
// match, and no NoExecute taint may be untolerated. A NoSchedule taint added
// later does not remove a running daemon, so it does not count.
func outOfScope(ds *appsv1.DaemonSet, node *corev1.Node) (string, error) {
	if ds.DeletionTimestamp != nil {
		return fmt.Sprintf("DaemonSet %s/%s is being deleted", ds.Namespace, ds.Name), nil
	}
	spec := ds.Spec.Template.Spec
	if spec.NodeName != "" && spec.NodeName != node.Name {
		return fmt.Sprintf("DaemonSet %s/%s runs only on node %s", ds.Namespace, ds.Name, spec.NodeName), nil
	}
	fits, err := nodeaffinity.GetRequiredNodeAffinity(&corev1.Pod{Spec: spec}).Match(node)
	if err != nil {
		return "", fmt.Errorf("DaemonSet %s/%s: node affinity: %w", ds.Namespace, ds.Name, err)
	}
	if !fits {
		return fmt.Sprintf("the placement of DaemonSet %s/%s (nodeSelector, node affinity) no longer selects node %s",
			ds.Namespace, ds.Name, node.Name), nil
	}
	tolerations := append(append([]corev1.Toleration{}, spec.Tolerations...), daemonTolerations...)
	taint, untolerated := corev1helpers.FindMatchingUntoleratedTaint(klog.Background(), node.Spec.Taints, tolerations,
		func(t *corev1.Taint) bool { return t.Effect == corev1.TaintEffectNoExecute }, false)
	if untolerated {
		return fmt.Sprintf("node %s has taint %s:%s, which DaemonSet %s/%s does not tolerate",
			node.Name, taint.Key, taint.Effect, ds.Namespace, ds.Name), nil
	}
	return "", nil
}

// leaveReason reads the instance's DaemonSet and the node, and says why the
// agent leaves the node, or "" when it stays (a pod restarted, a rolling
// update, a node shutting down: the next agent takes over the node's state).
// An error means the agent cannot tell, and then it stays: leaving releases
// the pins and withdraws the label, which must not happen on a guess.
func leaveReason(ctx context.Context, client kubernetes.Interface, namespace, instance, nodeName string) (string, error) {
	ds, err := client.AppsV1().DaemonSets(namespace).Get(ctx, instance, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return fmt.Sprintf("DaemonSet %s/%s is gone", namespace, instance), nil
	case err != nil:
		return "", fmt.Errorf("read DaemonSet %s/%s: %w", namespace, instance, err)
	}
	node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("read node %s: %w", nodeName, err)
	}
	return outOfScope(ds, node)
}

// leave runs when `run` stops on a shutdown signal. When the node is no longer
// the instance's (its DaemonSet is gone or being deleted, or its placement no
// longer selects the node) the agent withdraws what it keeps on the node
// (nodestate.Node.Leave: label, condition, startup taint, pins last). It
// logs what it did and what failed.
func (p *prefetcher) leave(ctx context.Context) {
	if p.kube == nil || p.opts.Namespace == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), leaveBudget)
	defer cancel()
	why, err := leaveReason(ctx, p.kube, p.opts.Namespace, p.opts.Instance, p.opts.NodeName)
	if err != nil {
		p.log.Warn("stopping: cannot tell whether the node is still the instance's; its label, condition and pins stay",
			"error", err.Error())
		return
	}
	if why == "" {
		return
	}
	p.log.Info("leaving the node: withdrawing its label, list annotation, condition, startup taint and pins", "why", why)
	var release func(context.Context) error
	if p.pins.pinner != nil {
		release = p.releaseAllPins
	}
	if err := p.node.Leave(ctx, release); err != nil {
		p.log.Error("leaving the node: not everything was withdrawn (docs/bundle.md#uninstall removes the rest)",
			"error", err.Error())
		return
	}
	p.log.Info("left the node")
}

// releaseAllPins lets go of every pin this instance set on the node.
func (p *prefetcher) releaseAllPins(ctx context.Context) error {
	rep, err := p.pins.pinner.Reconcile(ctx, nil, nil)
	errs := []error{err}
	for _, f := range rep.Failures {
		errs = append(errs, fmt.Errorf("%s %s: %w", f.Op, f.Image, f.Err))
	}
	if len(rep.Changes) > 0 {
		p.log.Info("pins released", "images", len(rep.Changes))
	}
	return errors.Join(errs...)
}
