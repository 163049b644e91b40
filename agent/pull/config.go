package pull

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

// Policy says when an image is pulled.
type Policy string

const (
	// PolicyIfNotPresent asks the runtime first and pulls only missing images.
	PolicyIfNotPresent Policy = "IfNotPresent"
	// PolicyAlways pulls every image, refreshing tags that moved.
	PolicyAlways Policy = "Always"
)

// ParsePolicy parses a --pull-policy value, ignoring case.
func ParsePolicy(s string) (Policy, error) {
	for _, p := range []Policy{PolicyIfNotPresent, PolicyAlways} {
		if strings.EqualFold(s, string(p)) {
			return p, nil
		}
	}
	return "", fmt.Errorf("pull policy %q: must be %s or %s", s, PolicyIfNotPresent, PolicyAlways)
}

// Config bounds the work of one pass. Field comments name the command-line
// flag that sets each field; Validate's errors use those names.
type Config struct {
	MaxParallel           int           // --max-parallel-pulls; 0 = unbounded
	Policy                Policy        // --pull-policy; "" = IfNotPresent
	InitialAttemptTimeout time.Duration // --initial-pull-attempt-timeout
	MaxAttemptTimeout     time.Duration // --max-pull-attempt-timeout
	InitialDelay          time.Duration // --initial-pull-attempt-delay
	MaxDelay              time.Duration // --max-pull-attempt-delay
	OverallTimeout        time.Duration // --overall-timeout; 0 = none (the caller's context bounds the pass)
	MaxAttempts           int           // --max-attempts per image; 0 = unbounded (see Engine on credentials)
	HedgeAfter            time.Duration // --hedge-after; 0 = no hedged calls (see Engine)
	MaxHedges             int           // --max-hedges per attempt
	// ProgressTimeout is the no-progress window: with Engine.Progress, an
	// attempt ends as stuck once no byte arrived for this long, and bytes
	// that flow keep it going up to MaxAttemptTimeout. 0 turns progress
	// watching off.
	ProgressTimeout time.Duration // --pull-progress-timeout
}

// DefaultConfig returns the defaults (the reference tool's, where its flags
// overlap ours).
func DefaultConfig() Config {
	return Config{
		MaxParallel:           DefaultMaxParallel,
		Policy:                PolicyIfNotPresent,
		InitialAttemptTimeout: 30 * time.Second,
		MaxAttemptTimeout:     5 * time.Minute,
		InitialDelay:          time.Second,
		MaxDelay:              10 * time.Minute,
		OverallTimeout:        20 * time.Minute,
		MaxAttempts:           10,
		// A stalled connection is abandoned after 10 s instead of the
		// attempt's 30 s: a hedge at 10 s and one at 20 s.
		HedgeAfter: 10 * time.Second,
		MaxHedges:  2,
		// Chosen by measurement (docs/benchmarks.md, "Progress-aware
		// pulling").
		ProgressTimeout: 20 * time.Second,
	}
}

// Validate reports every invalid field, naming its flag.
func (c Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.MaxParallel < 0 {
		bad("--max-parallel-pulls must not be negative (got %d; 0 means unbounded)", c.MaxParallel)
	}
	if c.Policy != "" {
		if _, err := ParsePolicy(string(c.Policy)); err != nil {
			bad("--pull-policy: %w", err)
		}
	}
	if c.InitialAttemptTimeout <= 0 {
		bad("--initial-pull-attempt-timeout must be positive (got %s)", c.InitialAttemptTimeout)
	}
	if c.MaxAttemptTimeout < c.InitialAttemptTimeout {
		bad("--max-pull-attempt-timeout (%s) must not be less than --initial-pull-attempt-timeout (%s)", c.MaxAttemptTimeout, c.InitialAttemptTimeout)
	}
	if c.InitialDelay < 0 {
		bad("--initial-pull-attempt-delay must not be negative (got %s)", c.InitialDelay)
	}
	if c.MaxDelay < c.InitialDelay {
		bad("--max-pull-attempt-delay (%s) must not be less than --initial-pull-attempt-delay (%s)", c.MaxDelay, c.InitialDelay)
	}
	if c.OverallTimeout < 0 {
		bad("--overall-timeout must not be negative (got %s; 0 means none)", c.OverallTimeout)
	}
	if c.HedgeAfter < 0 {
		bad("--hedge-after must not be negative (got %s; 0 disables hedging)", c.HedgeAfter)
	}
	if c.MaxHedges < 0 {
		bad("--max-hedges must not be negative (got %d)", c.MaxHedges)
	}
	if c.ProgressTimeout < 0 {
		bad("--pull-progress-timeout must not be negative (got %s; 0 turns progress watching off)", c.ProgressTimeout)
	}
	if c.MaxAttempts < 0 {
		bad("--max-attempts must not be negative (got %d; 0 means unbounded)", c.MaxAttempts)
	}
	return errors.Join(errs...)
}

// Step is one attempt in a schedule.
type Step struct {
	Number  int           // 1-based
	Delay   time.Duration // wait before this attempt (0 for the first)
	Timeout time.Duration // the attempt's own timeout
}

// Schedule returns the first n steps of the attempt schedule (fewer when
// MaxAttempts is smaller): timeouts start at InitialAttemptTimeout and double
// up to MaxAttemptTimeout, delays start at InitialDelay before the second
// attempt and double up to MaxDelay.
func (c Config) Schedule(n int) []Step {
	if c.MaxAttempts > 0 {
		n = min(n, c.MaxAttempts)
	}
	s := c.scheduler()
	out := make([]Step, 0, max(n, 0))
	for range n {
		st, _ := s.next()
		out = append(out, st)
	}
	return out
}

// scheduler produces the schedule one step at a time, so the engine and
// Schedule share one definition.
type scheduler struct {
	timeouts, delays wait.Backoff
	maxAttempts, n   int
}

func (c Config) scheduler() *scheduler {
	// wait.Backoff grows Duration by Factor until it passes Cap, then stays at
	// Cap (Steps only has to be large enough to reach it).
	const steps = 64
	return &scheduler{
		timeouts:    wait.Backoff{Duration: c.InitialAttemptTimeout, Factor: 2, Steps: steps, Cap: c.MaxAttemptTimeout},
		delays:      wait.Backoff{Duration: c.InitialDelay, Factor: 2, Steps: steps, Cap: c.MaxDelay},
		maxAttempts: c.MaxAttempts,
	}
}

// next returns the next step, or false when MaxAttempts is used up.
func (s *scheduler) next() (Step, bool) {
	if s.maxAttempts > 0 && s.n >= s.maxAttempts {
		return Step{}, false
	}
	s.n++
	st := Step{Number: s.n, Timeout: s.timeouts.Step()}
	if s.n > 1 {
		st.Delay = s.delays.Step()
	}
	return st, true
}
