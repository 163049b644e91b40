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

// Readiness holds whether every image of the current list is present, for
// Server.Ready. It starts not ready. Safe for concurrent use.
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
func (r *Readiness) SetResults(results []pull.Result) {
	var missing []string
	for _, res := range results {
		if res.Outcome == pull.OutcomeFailed {
			missing = append(missing, res.Image)
		}
	}
	var err error
	if len(missing) > 0 {
		named := missing
		if len(named) > maxNamed {
			named = named[:maxNamed]
		}
		msg := fmt.Sprintf("%d of %d images missing: %s", len(missing), len(results), strings.Join(named, ", "))
		if len(missing) > maxNamed {
			msg += fmt.Sprintf(" and %d more", len(missing)-maxNamed)
		}
		err = errors.New(msg)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err, r.set = err, true
}

// SetNotReady marks the agent not ready, for example when a new list starts
// or the pass failed before it could pull (no CRI socket).
func (r *Readiness) SetNotReady(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err, r.set = errors.New(reason), true
}
