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
	var errs []error
	if len(missing) > 0 {
		named := missing
		if len(named) > maxNamed {
			named = named[:maxNamed]
		}
		msg := fmt.Sprintf("%d of %d images missing: %s", len(missing), len(results), strings.Join(named, ", "))
		if len(missing) > maxNamed {
			msg += fmt.Sprintf(" and %d more", len(missing)-maxNamed)
		}
		errs = append(errs, errors.New(msg))
	}
	if labelErr != nil {
		errs = append(errs, fmt.Errorf("node label not written (retried within seconds): %w", labelErr))
	}
	if nodeErr != nil {
		errs = append(errs, fmt.Errorf("node not updated (retried within seconds): %w", nodeErr))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err, r.set = errors.Join(errs...), true
}

// SetNotReady marks the agent not ready, for example when a new list starts
// or the pass failed before it could pull (no CRI socket).
func (r *Readiness) SetNotReady(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err, r.set = errors.New(reason), true
}
