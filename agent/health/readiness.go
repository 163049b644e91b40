package health

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// maxNamed is how many missing images a readiness reason names; the rest are
// counted, to keep the probe's answer short.
const maxNamed = 3

// notReady is a reason in two forms: Error() names the images (for the pod's
// log and callers on loopback), Public() only counts them, for anyone on the
// pod network: the list says which software a cluster runs, and a failing
// image which one it is still without.
type notReady struct {
	detail, public string
}

func (e *notReady) Error() string  { return e.detail }
func (e *notReady) Public() string { return e.public }

// Readiness holds whether the agent's node is in the state the contract
// promises, for Server.Ready: every image of the current list is present AND
// the node's label says so (it was written). It starts not ready. Safe for
// concurrent use.
type Readiness struct {
	mu  sync.Mutex
	err error
	set bool
}

// Check returns nil when ready, or why not.
func (r *Readiness) Check() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.set {
		return errors.New("first pass not finished")
	}
	return r.err
}

// SetResults makes readiness follow a finished pass: ready only when no image
// of the list failed.
func (r *Readiness) SetResults(results []pull.Result) { r.SetOutcome(results, nil) }

// SetOutcome makes readiness follow a finished pass: ready only when no image
// of the list failed and the outcome was recorded on the node (labelErr nil;
// the label write's error otherwise). A node whose label could not be written
// is not ready even with every image present: workloads schedule on the
// label, so a rollout must not look complete while the node does not say so.
func (r *Readiness) SetOutcome(results []pull.Result, labelErr error) {
	r.SetRecorded(results, labelErr, nil)
}

// SetRecorded is SetOutcome with the errors of the node writes besides the
// label that the agent was asked for (nodeErr: the Node condition, the startup
// taint's removal). Those keep the agent not ready too: a node still gated, or
// a condition that does not say what the node holds, is not a finished rollout.
func (r *Readiness) SetRecorded(results []pull.Result, labelErr, nodeErr error) {
	var missing []string
	for _, res := range results {
		if res.Outcome == pull.OutcomeFailed {
			missing = append(missing, res.Image)
		}
	}
	var detail, public []string
	if len(missing) > 0 {
		named := missing
		if len(named) > maxNamed {
			named = named[:maxNamed]
		}
		count := fmt.Sprintf("%d of %d images missing", len(missing), len(results))
		msg := count + ": " + strings.Join(named, ", ")
		if len(missing) > maxNamed {
			msg += fmt.Sprintf(" and %d more", len(missing)-maxNamed)
		}
		detail, public = append(detail, msg), append(public, count)
	}
	if labelErr != nil {
		const msg = "node label not written (retried within seconds)"
		detail, public = append(detail, msg+": "+labelErr.Error()), append(public, msg)
	}
	if nodeErr != nil {
		const msg = "node not updated (retried within seconds)"
		detail, public = append(detail, msg+": "+nodeErr.Error()), append(public, msg)
	}
	var err error
	if len(detail) > 0 {
		err = &notReady{detail: strings.Join(detail, "\n"), public: strings.Join(public, "; ")}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err, r.set = err, true
}

// SetNotReady marks the agent not ready, for example when a new list starts
// or the pass failed before it could pull (no CRI socket). The reason is for
// loopback callers only: it may name images or paths.
func (r *Readiness) SetNotReady(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err, r.set = errors.New(reason), true
}
