package pull_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/credentials"
	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Generous bound for "finished without waiting for a long timeout": every
// such test sets the timeout it must not wait for to an hour.
const quick = 20 * time.Second

const (
	busybox = "docker.io/library/busybox:1.36"
	nginx   = "docker.io/library/nginx:1.27"
)

// recorder is an Observer that keeps everything.
type recorder struct {
	mu       sync.Mutex
	attempts []pull.Attempt
	results  []pull.Result
}

func (r *recorder) AttemptFinished(a pull.Attempt) {
	r.mu.Lock()
	r.attempts = append(r.attempts, a)
	r.mu.Unlock()
}
func (r *recorder) ImageFinished(res pull.Result) {
	r.mu.Lock()
	r.results = append(r.results, res)
	r.mu.Unlock()
}

func (r *recorder) attemptsFor(image string) []pull.Attempt {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []pull.Attempt
	for _, a := range r.attempts {
		if a.Image == image {
			out = append(out, a)
		}
	}
	return out
}

// fastConfig uses millisecond timeouts so tests are quick.
func fastConfig() pull.Config {
	return pull.Config{
		InitialAttemptTimeout: 50 * time.Millisecond,
		MaxAttemptTimeout:     200 * time.Millisecond,
		InitialDelay:          time.Millisecond,
		MaxDelay:              4 * time.Millisecond,
		OverallTimeout:        time.Hour,
		MaxAttempts:           5,
	}
}

func setup(t *testing.T, cfg pull.Config) (*critest.Server, *pull.Engine, *recorder) {
	t.Helper()
	srv := critest.Start(t)
	c, err := cri.Dial(context.Background(), srv.Path(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rec := &recorder{}
	return srv, &pull.Engine{Images: c.Images, Observer: rec, Config: cfg}, rec
}

func entries(refs ...string) []imagelist.Entry {
	out := make([]imagelist.Entry, len(refs))
	for i, r := range refs {
		out[i] = imagelist.Entry{Line: i + 1, Text: r, Ref: r}
	}
	return out
}

func run(t *testing.T, e *pull.Engine, ctx context.Context, refs ...string) []pull.Result {
	t.Helper()
	start := time.Now()
	res := e.Run(ctx, entries(refs...))
	if d := time.Since(start); d > quick {
		t.Errorf("Run took %s", d)
	}
	if len(res) != len(refs) {
		t.Fatalf("%d results for %d images", len(res), len(refs))
	}
	for i, r := range res {
		if r.Image != refs[i] || r.Line != i+1 {
			t.Errorf("result %d is for %s line %d", i, r.Image, r.Line)
		}
	}
	return res
}

func expect(t *testing.T, r pull.Result, outcome pull.Outcome, reason pull.Reason, attempts int) {
	t.Helper()
	if r.Outcome != outcome || r.Reason != reason || r.Attempts != attempts {
		t.Errorf("%s: outcome %s reason %q attempts %d (err %v); want %s %q %d",
			r.Image, r.Outcome, r.Reason, r.Attempts, r.Err, outcome, reason, attempts)
	}
	if (r.Err != nil) != (outcome == pull.OutcomeFailed) {
		t.Errorf("%s: outcome %s with error %v", r.Image, r.Outcome, r.Err)
	}
	if r.Err != nil && !strings.Contains(r.Err.Error(), r.Image) {
		t.Errorf("error %q does not name the image", r.Err)
	}
}

func TestPresentImageCostsOneStatusCall(t *testing.T) {
	t.Parallel()
	srv, e, rec := setup(t, fastConfig())
	srv.AddImage(busybox, critest.Image{ID: "sha256:b", RepoDigests: []string{"docker.io/library/busybox@sha256:d"}, Size: 1234})
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePresent, pull.ReasonNone, 0)
	if srv.StatusCalls(busybox) != 1 || srv.TotalPullCalls() != 0 {
		t.Errorf("status calls %d, pull calls %d", srv.StatusCalls(busybox), srv.TotalPullCalls())
	}
	if r := res[0]; r.ImageRef != "sha256:b" || r.Size != 1234 || !slices.Equal(r.RepoDigests, []string{"docker.io/library/busybox@sha256:d"}) {
		t.Errorf("result = %+v", r)
	}
	if len(rec.results) != 1 || len(rec.attempts) != 0 {
		t.Errorf("observer saw %d results, %d attempts", len(rec.results), len(rec.attempts))
	}
}

func TestPullRecordsWhatTheRuntimeReports(t *testing.T) {
	t.Parallel()
	srv, e, rec := setup(t, fastConfig())
	digest := "docker.io/library/busybox:1.36@sha256:" + strings.Repeat("ab", 32)
	srv.SetPulledImage(nginx, critest.Image{ID: "sha256:n", RepoDigests: []string{"docker.io/library/nginx@sha256:x"}, Size: 99})
	res := run(t, e, context.Background(), nginx, digest)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 1)
	expect(t, res[1], pull.OutcomePulled, pull.ReasonNone, 1)
	if r := res[0]; r.ImageRef != "sha256:n" || r.Size != 99 || len(r.RepoDigests) != 1 || r.Duration <= 0 {
		t.Errorf("result = %+v", r)
	}
	// The digest reference reached the runtime whole.
	if srv.PullCalls(digest) != 1 {
		t.Errorf("pulls of %s: %d (calls %+v)", digest, srv.PullCalls(digest), srv.Calls())
	}
	a := rec.attemptsFor(nginx)
	if len(a) != 1 || a[0].Number != 1 || a[0].ImageRef != "sha256:n" || a[0].Size != 99 || a[0].Err != nil || a[0].Timeout != 50*time.Millisecond {
		t.Errorf("attempts = %+v", a)
	}
}

func TestAlwaysPullsPresentImages(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.Policy = pull.PolicyAlways
	srv, e, _ := setup(t, cfg)
	srv.AddImage(busybox, critest.Image{})
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 1)
	if srv.PullCalls(busybox) != 1 {
		t.Errorf("pull calls = %d", srv.PullCalls(busybox))
	}
}

func TestPermanentErrorsAreNotRetried(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		step   critest.Step
		reason pull.Reason
	}{
		{"not found", critest.NotFound(busybox), pull.ReasonNotFound},
		{"unauthorized", critest.Unauthorized(busybox), pull.ReasonUnauthorized},
		{"forbidden", critest.Forbidden(busybox), pull.ReasonUnauthorized},
		{"invalid argument", critest.Fail(codes.InvalidArgument, "invalid reference format"), pull.ReasonInvalidReference},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := fastConfig()
			cfg.InitialDelay, cfg.MaxDelay, cfg.MaxAttempts = time.Hour, time.Hour, 0
			srv, e, _ := setup(t, cfg)
			srv.OnPull(busybox, tt.step)
			res := run(t, e, context.Background(), busybox)
			expect(t, res[0], pull.OutcomeFailed, tt.reason, 1)
			if n := srv.PullCalls(busybox); n != 1 {
				t.Errorf("pull calls = %d, want 1", n)
			}
		})
	}
}

func TestStallThenSuccessWithGrowingTimeouts(t *testing.T) {
	t.Parallel()
	srv, e, rec := setup(t, fastConfig())
	srv.OnPull(busybox, critest.Stall(), critest.Stall(), critest.Succeed())
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 3)
	var timeouts []time.Duration
	var reasons []pull.Reason
	for _, a := range rec.attemptsFor(busybox) {
		timeouts, reasons = append(timeouts, a.Timeout), append(reasons, a.Reason)
	}
	if want := []time.Duration{50 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond}; !slices.Equal(timeouts, want) {
		t.Errorf("attempt timeouts = %v, want %v", timeouts, want)
	}
	if want := []pull.Reason{pull.ReasonTimeout, pull.ReasonTimeout, pull.ReasonNone}; !slices.Equal(reasons, want) {
		t.Errorf("attempt reasons = %v, want %v", reasons, want)
	}
	// The runtime saw the deadlines grow too.
	calls := srv.PullCallsFor(busybox)
	if len(calls) != 3 || calls[0].Timeout > 50*time.Millisecond || calls[2].Timeout <= 100*time.Millisecond {
		t.Errorf("deadlines seen by the runtime: %+v", calls)
	}
}

func TestTransientErrorsAreRetried(t *testing.T) {
	t.Parallel()
	for _, step := range []critest.Step{critest.Unavailable(), critest.ServerError(busybox, 503), critest.Fail(codes.Unknown, "dial tcp: i/o timeout")} {
		srv, e, _ := setup(t, fastConfig())
		srv.OnPull(busybox, step, critest.Succeed())
		res := run(t, e, context.Background(), busybox)
		expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 2)
		if srv.PullCalls(busybox) != 2 {
			t.Errorf("%s: pull calls = %d", step.Message, srv.PullCalls(busybox))
		}
	}
}

func TestMaxAttempts(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.MaxAttempts = 3
	srv, e, _ := setup(t, cfg)
	srv.OnPull(busybox, critest.ServerError(busybox, 503))
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomeFailed, pull.ReasonServerError, 3)
	if srv.PullCalls(busybox) != 3 {
		t.Errorf("pull calls = %d", srv.PullCalls(busybox))
	}
}

func TestOverallTimeout(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.MaxAttempts = 0
	cfg.OverallTimeout = 300 * time.Millisecond
	srv, e, _ := setup(t, cfg)
	srv.OnPull(busybox, critest.Stall())
	srv.OnPull(nginx, critest.Unavailable())
	res := run(t, e, context.Background(), busybox, nginx)
	if r := res[0]; r.Outcome != pull.OutcomeFailed || r.Reason != pull.ReasonTimeout || r.Attempts < 1 {
		t.Errorf("stalled image: %+v", r)
	}
	// The failing image kept retrying until the deadline, then kept its reason.
	if r := res[1]; r.Outcome != pull.OutcomeFailed || (r.Reason != pull.ReasonUnavailable && r.Reason != pull.ReasonTimeout) || r.Attempts < 2 {
		t.Errorf("unavailable image: %+v", r)
	}
}

func TestDelayLongerThanTheDeadlineEndsAtOnce(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.InitialDelay, cfg.MaxDelay, cfg.MaxAttempts = time.Hour, time.Hour, 0
	cfg.OverallTimeout = 30 * time.Minute
	srv, e, _ := setup(t, cfg)
	srv.OnPull(busybox, critest.Unavailable())
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomeFailed, pull.ReasonUnavailable, 1)
	if !strings.Contains(res[0].Err.Error(), "overall timeout ends before attempt 2") {
		t.Errorf("err = %v", res[0].Err)
	}
}

func TestConcurrencyIsBounded(t *testing.T) {
	t.Parallel()
	for _, limit := range []int{1, 3} {
		cfg := fastConfig()
		cfg.MaxParallel = limit
		srv, e, _ := setup(t, cfg)
		srv.SetDefaultPull(critest.Succeed().After(20 * time.Millisecond))
		var refs []string
		for _, name := range []string{"a", "b", "c", "d", "e", "f", "g", "h"} {
			refs = append(refs, "docker.io/library/"+name+":1")
		}
		res := run(t, e, context.Background(), refs...)
		for _, r := range res {
			expect(t, r, pull.OutcomePulled, pull.ReasonNone, 1)
		}
		if got := srv.MaxConcurrentPulls(); got < 1 || got > limit {
			t.Errorf("limit %d: max concurrent pulls = %d", limit, got)
		}
	}
}

// creds is a fixed credentials.Provider.
type creds struct {
	list []credentials.Credential
	err  error
}

func (c creds) Lookup(context.Context, string) ([]credentials.Credential, error) {
	return c.list, c.err
}

func cred(source, user, pass string) credentials.Credential {
	return credentials.Credential{Source: source, Auth: &runtimeapi.AuthConfig{Username: user, Password: pass}}
}

func TestWrongThenRightCredential(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.InitialDelay, cfg.MaxDelay = time.Hour, time.Hour // refusals must not wait
	srv, e, rec := setup(t, cfg)
	srv.RequireAuth(busybox, critest.Credential{Username: "alice", Password: "right"})
	e.Creds = creds{list: []credentials.Credential{cred("a.json:docker.io", "alice", "wrong"), cred("b.json:docker.io", "alice", "right")}}
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 2)
	if srv.PullCalls(busybox) != 2 {
		t.Errorf("pull calls = %d", srv.PullCalls(busybox))
	}
	a := rec.attemptsFor(busybox)
	if len(a) != 2 || a[0].Credential != "a.json:docker.io" || a[0].Reason != pull.ReasonUnauthorized ||
		a[1].Credential != "b.json:docker.io" || a[1].Err != nil || a[1].Number != 2 {
		t.Errorf("attempts = %+v", a)
	}
}

func TestAllCredentialsRefused(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.InitialDelay, cfg.MaxDelay, cfg.MaxAttempts = time.Hour, time.Hour, 0
	srv, e, rec := setup(t, cfg)
	srv.RequireAuth(busybox, critest.Credential{Username: "alice", Password: "right"})
	e.Creds = creds{list: []credentials.Credential{cred("1", "a", "x"), cred("2", "b", "y"), cred("3", "c", "z")}}
	res := run(t, e, context.Background(), busybox)
	expect(t, res[0], pull.OutcomeFailed, pull.ReasonUnauthorized, 3)
	if srv.PullCalls(busybox) != 3 {
		t.Errorf("pull calls = %d", srv.PullCalls(busybox))
	}
	for _, a := range rec.attemptsFor(busybox) {
		for _, secret := range []string{"x", "y", "z"} {
			if a.Credential == secret {
				t.Errorf("attempt carries a secret: %+v", a)
			}
		}
	}
}

func TestCredentialSurvivesTransientError(t *testing.T) {
	t.Parallel()
	srv, e, rec := setup(t, fastConfig())
	srv.RequireAuth(busybox, critest.Credential{Username: "bob", Password: "right"})
	srv.OnPull(busybox, critest.Unavailable(), critest.Succeed())
	e.Creds = creds{list: []credentials.Credential{cred("wrong", "bob", "nope"), cred("right", "bob", "right")}}
	res := run(t, e, context.Background(), busybox)
	// wrong (refused) -> right (Unavailable) -> after a delay right again (ok)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 3)
	var used []string
	for _, a := range rec.attemptsFor(busybox) {
		used = append(used, a.Credential)
	}
	if !slices.Equal(used, []string{"wrong", "right", "right"}) {
		t.Errorf("credentials used: %v", used)
	}
}

func TestFailingLookupFallsBackToAnonymous(t *testing.T) {
	t.Parallel()
	srv, e, _ := setup(t, fastConfig())
	srv.OnPull(nginx, critest.Unauthorized(nginx))
	e.Creds = creds{err: errors.New("plugin exited 1")}
	res := run(t, e, context.Background(), busybox, nginx)
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 1)
	expect(t, res[1], pull.OutcomeFailed, pull.ReasonUnauthorized, 1)
	if !strings.Contains(res[1].Err.Error(), "plugin exited 1") {
		t.Errorf("error %q hides the lookup failure", res[1].Err)
	}
}

func TestCancel(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.MaxParallel = 2
	cfg.InitialAttemptTimeout, cfg.MaxAttemptTimeout = time.Hour, time.Hour
	srv, e, rec := setup(t, cfg)
	srv.SetDefaultPull(critest.Stall())
	refs := []string{"docker.io/library/a:1", "docker.io/library/b:1", "docker.io/library/c:1", "docker.io/library/d:1", "docker.io/library/e:1"}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for srv.TotalPullCalls() < 2 {
			time.Sleep(time.Millisecond)
		}
		cancel() // SIGTERM while two pulls hang
	}()
	res := run(t, e, ctx, refs...)
	for _, r := range res {
		expect(t, r, pull.OutcomeFailed, pull.ReasonCanceled, r.Attempts)
	}
	if srv.TotalPullCalls() != 2 {
		t.Errorf("pull calls = %d, want 2", srv.TotalPullCalls())
	}
	if len(rec.results) != len(refs) {
		t.Errorf("observer saw %d results", len(rec.results))
	}
}

func TestAlreadyCancelled(t *testing.T) {
	t.Parallel()
	srv, e, _ := setup(t, fastConfig())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	res := run(t, e, ctx, busybox, nginx)
	for _, r := range res {
		expect(t, r, pull.OutcomeFailed, pull.ReasonCanceled, 0)
	}
	if len(srv.Calls()) != 0 {
		t.Errorf("calls = %+v", srv.Calls())
	}
}

func TestInvalidConfig(t *testing.T) {
	t.Parallel()
	cfg := fastConfig()
	cfg.MaxAttemptTimeout = time.Millisecond
	srv, e, _ := setup(t, cfg)
	res := run(t, e, context.Background(), busybox)
	if res[0].Outcome != pull.OutcomeFailed || res[0].Reason != pull.ReasonInvalidConfig || len(srv.Calls()) != 0 {
		t.Errorf("result = %+v", res[0])
	}
}

func TestNilObserverAndStatusError(t *testing.T) {
	t.Parallel()
	srv, e, _ := setup(t, fastConfig())
	e.Observer = nil
	srv.OnStatus(busybox, critest.Fail(codes.Internal, "status broke"))
	res := run(t, e, context.Background(), busybox)
	// A failing ImageStatus does not stop the pull.
	expect(t, res[0], pull.OutcomePulled, pull.ReasonNone, 1)
}
