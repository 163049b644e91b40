package pull

import (
	"github.com/spf13/pflag"
)

// DefaultMaxParallel is the per-node pull concurrency, chosen by measurement
// (docs/benchmarks.md), not guessed.
const DefaultMaxParallel = 4

// AddFlags registers the flags that set c, with c's values as defaults; the
// flag names are the ones Validate's errors use.
func (c *Config) AddFlags(fs *pflag.FlagSet) {
	fs.Var(&c.Policy, "pull-policy", "IfNotPresent (skip images already present) or Always.")
	fs.IntVar(&c.MaxParallel, "max-parallel-pulls", c.MaxParallel, "Images pulled at the same time on this node; 0 means unbounded.")
	fs.IntVar(&c.MaxAttempts, "max-attempts", c.MaxAttempts, "Pull attempts per image before it is given up.")
	fs.DurationVar(&c.InitialAttemptTimeout, "initial-pull-attempt-timeout", c.InitialAttemptTimeout, "Timeout of the first pull attempt; each later attempt doubles it up to --max-pull-attempt-timeout.")
	fs.DurationVar(&c.MaxAttemptTimeout, "max-pull-attempt-timeout", c.MaxAttemptTimeout, "Upper bound of a pull attempt's timeout.")
	fs.DurationVar(&c.InitialDelay, "initial-pull-attempt-delay", c.InitialDelay, "Delay before the second attempt of an image; doubles up to --max-pull-attempt-delay.")
	fs.DurationVar(&c.MaxDelay, "max-pull-attempt-delay", c.MaxDelay, "Upper bound of the delay between attempts.")
	fs.DurationVar(&c.OverallTimeout, "overall-timeout", c.OverallTimeout, "Upper bound of one pass over the whole list.")
	fs.DurationVar(&c.HedgeAfter, "hedge-after", c.HedgeAfter, "When a pull attempt has not answered after this long, start another PullImage of the image on a new registry connection (first success wins); 0 disables.")
	fs.IntVar(&c.MaxHedges, "max-hedges", c.MaxHedges, "Extra PullImage calls per attempt, --hedge-after apart.")
	fs.DurationVar(&c.ProgressTimeout, "pull-progress-timeout", c.ProgressTimeout, "On containerd: end a pull attempt as stuck when no byte arrived for this long; while bytes flow an attempt runs up to --max-pull-attempt-timeout, and the next attempt resumes where it stopped. 0 turns progress watching off (escalating timeouts only, as on other runtimes).")
}

// Set parses a --pull-policy value (pflag.Value), ignoring case.
func (p *Policy) Set(s string) error {
	v, err := ParsePolicy(s)
	if err != nil {
		return err
	}
	*p = v
	return nil
}

func (p *Policy) String() string { return string(*p) }

// Type names the value in --help.
func (p *Policy) Type() string { return "policy" }
