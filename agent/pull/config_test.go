package pull

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestSchedule(t *testing.T) {
	t.Parallel()
	s, m := time.Second, time.Minute
	tests := []struct {
		name string
		cfg  Config
		n    int
		want []Step
	}{
		{
			name: "defaults double to their caps",
			cfg:  DefaultConfig(),
			n:    7,
			want: []Step{
				{1, 0, 30 * s}, {2, 1 * s, 60 * s}, {3, 2 * s, 2 * m}, {4, 4 * s, 4 * m},
				{5, 8 * s, 5 * m}, {6, 16 * s, 5 * m}, {7, 32 * s, 5 * m},
			},
		},
		{
			name: "small caps",
			cfg:  Config{InitialAttemptTimeout: 10 * s, MaxAttemptTimeout: 25 * s, InitialDelay: 3 * s, MaxDelay: 5 * s},
			n:    4,
			want: []Step{{1, 0, 10 * s}, {2, 3 * s, 20 * s}, {3, 5 * s, 25 * s}, {4, 5 * s, 25 * s}},
		},
		{
			name: "max attempts cuts the schedule",
			cfg:  Config{InitialAttemptTimeout: s, MaxAttemptTimeout: s, InitialDelay: s, MaxDelay: s, MaxAttempts: 2},
			n:    10,
			want: []Step{{1, 0, s}, {2, s, s}},
		},
		{
			name: "no delay",
			cfg:  Config{InitialAttemptTimeout: s, MaxAttemptTimeout: 2 * s},
			n:    3,
			want: []Step{{1, 0, s}, {2, 0, 2 * s}, {3, 0, 2 * s}},
		},
		{
			name: "equal initial and max",
			cfg:  Config{InitialAttemptTimeout: 7 * s, MaxAttemptTimeout: 7 * s, InitialDelay: 2 * s, MaxDelay: 2 * s},
			n:    3,
			want: []Step{{1, 0, 7 * s}, {2, 2 * s, 7 * s}, {3, 2 * s, 7 * s}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.cfg.Schedule(tt.n); !slices.Equal(got, tt.want) {
				t.Errorf("Schedule(%d) =\n%v\nwant\n%v", tt.n, got, tt.want)
			}
		})
	}
	// Long schedules stay at the caps (no overflow after many doublings).
	long := DefaultConfig()
	long.MaxAttempts = 0
	steps := long.Schedule(200)
	if last := steps[len(steps)-1]; last.Timeout != 5*m || last.Delay != 10*m || last.Number != 200 {
		t.Errorf("step 200 = %+v", last)
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	tests := []struct {
		mutate func(*Config)
		want   string
	}{
		{func(c *Config) { c.MaxParallel = -1 }, "--max-parallel-pulls"},
		{func(c *Config) { c.Policy = "Never" }, "--pull-policy"},
		{func(c *Config) { c.InitialAttemptTimeout = 0 }, "--initial-pull-attempt-timeout must be positive"},
		{func(c *Config) { c.MaxAttemptTimeout = time.Second }, "--max-pull-attempt-timeout (1s) must not be less than --initial-pull-attempt-timeout (30s)"},
		{func(c *Config) { c.InitialDelay = -time.Second }, "--initial-pull-attempt-delay"},
		{func(c *Config) { c.MaxDelay = time.Millisecond }, "--max-pull-attempt-delay"},
		{func(c *Config) { c.OverallTimeout = -1 }, "--overall-timeout"},
		{func(c *Config) { c.MaxAttempts = -1 }, "--max-attempts"},
	}
	for _, tt := range tests {
		c := DefaultConfig()
		tt.mutate(&c)
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Validate() = %v, want mention of %q", err, tt.want)
		}
	}
	// Every problem is reported at once.
	c := Config{MaxParallel: -1, MaxAttempts: -1}
	if err := c.Validate(); err == nil || strings.Count(err.Error(), "\n") < 2 {
		t.Errorf("Validate() = %v, want several errors", err)
	}
}

func TestParsePolicy(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]Policy{"IfNotPresent": PolicyIfNotPresent, "ifnotpresent": PolicyIfNotPresent, "Always": PolicyAlways, "ALWAYS": PolicyAlways} {
		if got, err := ParsePolicy(in); err != nil || got != want {
			t.Errorf("ParsePolicy(%q) = %q, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "Never", "always "} {
		if _, err := ParsePolicy(in); err == nil {
			t.Errorf("ParsePolicy(%q): no error", in)
		}
	}
}
