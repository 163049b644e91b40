// Package pull is the pull engine: it makes every image of a list present on
// the node through the CRI ImageService, with bounded concurrency, growing
// per-attempt timeouts and delays, classified errors (permanent ones end an
// image at once), credentials tried in order, and an overall deadline.
package pull

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sync/errgroup"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/credentials"
	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
)

// Engine pulls lists of images. Set the fields, then call Run; an Engine may
// run several passes, one after another or at once.
//
// Attempts and credentials: an attempt is one step of Config's schedule (its
// own timeout, a delay before it). Within an attempt the credentials from
// Creds are tried in order; one that is refused (Unauthorized, or NotFound
// when there are several credentials, since registries hide private
// repositories behind 404s) is dropped and the next is tried at once, without
// using up an attempt. A transient error ends the attempt; the next attempt
// starts with the same credential. Every attempt is reported to the Observer
// and counted in Result.Attempts.
//
// Hedging: a registry connection that hangs without an answer is only
// noticed at the attempt's timeout, and containerd has no timeout of its own.
// So when an attempt's PullImage has not answered after HedgeAfter, pullOnce
// starts another PullImage of the same image (containerd makes a new
// registry connection for it), up to MaxHedges more, HedgeAfter apart, all
// within the attempt's timeout. The first success wins and the others are
// cancelled. containerd 1.6 lets the new call complete while the hung one
// still waits (measured: docs/benchmarks.md), and its per-blob ingest locks
// keep a hedge of a pull that is merely slow from downloading the same blob
// twice. Hedges are counted in Attempt.Hedges, not as attempts.
//
// Progress: with Progress set (containerd) and Config.ProgressTimeout above
// zero, every attempt runs under MaxAttemptTimeout, the outer cap, instead of
// the escalating timeouts: an attempt whose bytes flow is not cut short, and
// one on which no byte arrived for ProgressTimeout ends at once (ErrStalled).
// The attempts of an image share one Transfer, so the runtime keeps what an
// ended attempt fetched and the next one resumes there; after an attempt the
// cap ended while it fetched, the next starts without the delay. A hedge is sent only
// while the pull has not begun fetching blobs: later it could only wait on the
// runtime's per-blob lock behind the hung call, and the no-progress window
// ends such a stall instead.
type Engine struct {
	Images   runtimeapi.ImageServiceClient
	Creds    credentials.Provider // nil: anonymous pulls
	Observer Observer             // nil: nobody is told
	Progress Progress             // nil: escalating timeouts alone
	// Present holds the images of the list the caller has just found present
	// (by ImageStatus, keyed by reference): IfNotPresent does not ask for them
	// again, so a present image costs one ImageStatus per pass in all.
	Present map[string]*runtimeapi.Image
	// Settled, when set, is called with each image's result in the image's
	// own goroutine, before its slot goes to the next image. Unlike an
	// Observer it may take a few round trips: the agent pins the image there,
	// so that the pulls that follow cannot get it collected.
	Settled func(ctx context.Context, r Result)
	// Admit, when set, is asked before every PullImage attempt; an error
	// fails the image with ReasonDiskBudget at once (the node's disk budget,
	// agent/diskbudget: another attempt within the pass would only push the
	// image filesystem further past it).
	Admit func() error
	Config
}

// Run pulls entries and returns one Result per entry, in the same order. It
// returns when every image is done, the overall timeout has passed or ctx is
// cancelled; images not done then fail with ReasonTimeout or ReasonCanceled.
func (e *Engine) Run(ctx context.Context, entries []imagelist.Entry) []Result {
	results := make([]Result, len(entries))
	if err := e.Config.Validate(); err != nil {
		for i, en := range entries {
			results[i] = Result{Image: en.Ref, Line: en.Line, Outcome: OutcomeFailed, Reason: ReasonInvalidConfig, Err: err, Start: time.Now()}
			e.imageFinished(results[i])
		}
		return results
	}
	pass := ctx
	if e.OverallTimeout > 0 {
		var cancel context.CancelFunc
		pass, cancel = context.WithTimeout(ctx, e.OverallTimeout)
		defer cancel()
	}
	var g errgroup.Group
	if e.MaxParallel > 0 {
		g.SetLimit(e.MaxParallel) // Go blocks: images start in list order
	}
	for i, en := range entries {
		g.Go(func() error {
			results[i] = e.image(ctx, pass, en)
			if e.Settled != nil {
				e.Settled(ctx, results[i])
			}
			e.imageFinished(results[i])
			return nil
		})
	}
	g.Wait() //nolint:errcheck // the goroutines return no errors
	return results
}

// ReasonInvalidConfig marks results of a Run with an invalid Config.
const ReasonInvalidConfig Reason = "InvalidConfig"

// image makes one image present. parent is the caller's context, ctx the
// pass's (parent plus the overall timeout).
func (e *Engine) image(parent, ctx context.Context, en imagelist.Entry) (r Result) {
	r = Result{Image: en.Ref, Line: en.Line, Start: time.Now(), Outcome: OutcomeFailed}
	defer func() { r.Duration = time.Since(r.Start) }()
	fail := func(reason Reason, err error) Result {
		r.Reason, r.Err = reason, fmt.Errorf("pull %s: %w", en.Ref, err)
		return r
	}
	if ctx.Err() != nil {
		return fail(stopReason(parent), ctx.Err())
	}

	if img := e.Present[en.Ref]; img != nil && e.Policy != PolicyAlways {
		r.Outcome = OutcomePresent
		setImage(&r, img)
		return r
	}
	if e.Policy != PolicyAlways {
		img, err := e.status(ctx, en.Ref)
		if img != nil {
			r.Outcome = OutcomePresent
			setImage(&r, img)
			return r
		}
		if err != nil && ctx.Err() != nil {
			return fail(stopReason(parent), fmt.Errorf("image status: %w", err))
		}
		// Any other status error: pull anyway; the pull reports the real problem.
	}

	creds, lookupErr := e.lookup(ctx, en.Ref)
	tries := []*credentials.Credential{nil} // anonymous
	if len(creds) > 0 {
		tries = make([]*credentials.Credential, len(creds))
		for i := range creds {
			tries[i] = &creds[i]
		}
	}
	cur := 0             // the first credential not refused
	sawNotFound := false // a credential got past authentication
	sched := e.scheduler()
	var tr Transfer
	capped := false // the last attempt ended at the cap while making progress
	if e.Progress != nil && e.ProgressTimeout > 0 {
		tr = e.Progress.Follow(ctx, en.Ref)
	}
	if tr != nil {
		defer func() { tr.Close(transferEnd(r)) }()
	}
	var last error
	var lastReason Reason
	for {
		step, ok := sched.next()
		if !ok {
			return fail(lastReason, fmt.Errorf("gave up after %d attempts: %w", e.MaxAttempts, withLookup(last, lookupErr)))
		}
		if step.Delay > 0 && !capped {
			if err := sleep(ctx, step.Delay); err != nil {
				if parent.Err() != nil {
					return fail(stopReason(parent), err)
				}
				// Keep the last attempt's reason: it says what went wrong.
				return fail(lastReason, fmt.Errorf("overall timeout ends before attempt %d: %w", step.Number, withLookup(last, lookupErr)))
			}
		}
		for cur < len(tries) {
			cred := tries[cur]
			if e.Admit != nil {
				if err := e.Admit(); err != nil {
					return fail(ReasonDiskBudget, err)
				}
			}
			r.Attempts++
			timeout := step.Timeout
			if tr != nil {
				timeout = e.MaxAttemptTimeout
			}
			res, err := e.pullOnce(ctx, en.Ref, cred, timeout, tr, r.Attempts)
			if Classify(err) == ReasonCanceled && ctx.Err() == nil {
				// Not ours: the runtime gave the pull up itself (CRI-O does at
				// its pull_progress_timeout), which is a timeout to retry.
				err = fmt.Errorf("the runtime cancelled the pull (%w): %w", ErrRuntimeCanceled, err)
			}
			a := Attempt{Image: en.Ref, Number: r.Attempts, Start: res.start, Duration: res.duration, Timeout: timeout,
				Hedges: res.hedges, Err: err, Reason: Classify(err), Bytes: res.bytes}
			if cred != nil {
				a.Credential = cred.Source
			}
			if err == nil {
				r.Outcome, r.ImageRef = OutcomePulled, res.imageRef
				if img, _ := e.status(ctx, en.Ref); img != nil {
					setImage(&r, img)
				}
				a.ImageRef, a.Size = r.ImageRef, r.Size
				e.attemptFinished(a)
				return r
			}
			e.attemptFinished(a)
			last, lastReason = err, a.Reason
			// An attempt the cap ended while its bytes flowed did not fail:
			// the next one goes on at once, from where it stopped.
			capped = tr != nil && a.Reason == ReasonTimeout && !errors.Is(err, ErrStalled) && a.Bytes.Fetched > 0
			switch {
			case parent.Err() != nil:
				return fail(stopReason(parent), err)
			case ctx.Err() != nil:
				return fail(ReasonTimeout, fmt.Errorf("overall timeout: %w", withLookup(err, lookupErr)))
			case a.Reason == ReasonInvalidReference:
				return fail(a.Reason, err)
			case cred != nil && (a.Reason == ReasonUnauthorized || (a.Reason == ReasonNotFound && len(tries) > 1)):
				sawNotFound = sawNotFound || a.Reason == ReasonNotFound
				cur++
				continue // the next credential, at once
			case a.Reason == ReasonArtifactUnsupported:
				return fail(a.Reason, fmt.Errorf("%s: %w", ArtifactUnsupportedHint, err))
			case a.Reason.Permanent():
				return fail(a.Reason, withLookup(err, lookupErr))
			}
			break // transient: next attempt, same credential
		}
		if cur >= len(tries) {
			reason := ReasonUnauthorized
			if sawNotFound {
				reason = ReasonNotFound
			}
			return fail(reason, fmt.Errorf("all %d credentials refused; last error: %w", len(tries), withLookup(last, lookupErr)))
		}
	}
}

// pullResult is what one attempt's PullImage calls returned.
type pullResult struct {
	imageRef string
	start    time.Time
	duration time.Duration
	hedges   int   // PullImage calls started besides the first
	bytes    Bytes // with a Transfer
}

// pullOnce makes one attempt (number n): a PullImage call with the attempt's
// timeout, hedged as the Engine's comment says, watched for progress when tr
// is set. It returns the first success; a permanent error at once (another
// call would get the same answer); a transient error only when no other call
// of the attempt is still running; ErrStalled when tr saw no progress for
// ProgressTimeout.
func (e *Engine) pullOnce(ctx context.Context, ref string, cred *credentials.Credential, timeout time.Duration, tr Transfer, n int) (res pullResult, err error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()              // ends the calls that lost
	var stalled <-chan struct{} // nil: never
	var watch AttemptWatch
	if tr != nil {
		ctx = tr.Bind(ctx)
		watch = tr.Watch(n, e.ProgressTimeout)
		stalled = watch.Stalled()
		defer func() { res.bytes = watch.Stop() }()
	}
	req := &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}
	if cred != nil {
		req.Auth = cred.Auth
	}
	type answer struct {
		imageRef string
		err      error
	}
	hedges := 0
	if e.HedgeAfter > 0 {
		hedges = e.MaxHedges
	}
	answers := make(chan answer, 1+hedges) // losers never block
	call := func() {
		resp, err := e.Images.PullImage(ctx, req)
		answers <- answer{resp.GetImageRef(), err}
	}
	res.start = time.Now()
	go call()
	running := 1
	var hedge <-chan time.Time // nil: no (more) hedges
	if hedges > 0 {
		hedge = time.After(e.HedgeAfter)
	}
	for {
		select {
		case <-stalled:
			res.duration = time.Since(res.start)
			return res, fmt.Errorf("no byte arrived for %s: %w", e.ProgressTimeout, ErrStalled)
		case <-hedge:
			hedge = nil
			if watch != nil && !watch.Resolving() {
				// Blobs are being fetched: a hedge would only queue behind
				// this call's blob locks, now and later in the attempt.
				continue
			}
			go call()
			running++
			res.hedges++
			if watch != nil {
				watch.CallStarted()
			}
			if res.hedges < hedges {
				hedge = time.After(e.HedgeAfter)
			}
		case a := <-answers:
			running--
			if a.err == nil {
				res.duration = time.Since(res.start)
				res.imageRef = a.imageRef
				return res, nil
			}
			if running == 0 || Classify(a.err).Permanent() || ctx.Err() != nil {
				res.duration = time.Since(res.start)
				return res, a.err
			}
			// A transient failure while another call still runs: that one
			// may still succeed.
		}
	}
}

// status asks the runtime for ref; a nil image with a nil error means absent.
func (e *Engine) status(ctx context.Context, ref string) (*runtimeapi.Image, error) {
	ctx, cancel := context.WithTimeout(ctx, e.InitialAttemptTimeout)
	defer cancel()
	resp, err := e.Images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return nil, err
	}
	return resp.GetImage(), nil
}

func (e *Engine) lookup(ctx context.Context, ref string) ([]credentials.Credential, error) {
	if e.Creds == nil {
		return nil, nil
	}
	// Like the kubelet, a failing lookup does not stop the pull: the image may
	// be public. Whatever was found is still used, and the error is kept for
	// the result if the pull then fails.
	creds, err := e.Creds.Lookup(ctx, ref)
	if err != nil {
		err = fmt.Errorf("credential lookup: %w", err)
	}
	return creds, err
}

func withLookup(err, lookupErr error) error {
	if lookupErr == nil {
		return err
	}
	return fmt.Errorf("%w (%v)", err, lookupErr)
}

func setImage(r *Result, img *runtimeapi.Image) {
	if id := img.GetId(); id != "" {
		r.ImageRef = id
	}
	r.RepoDigests = img.GetRepoDigests()
	r.Size = img.GetSize()
}

// stopReason says why the pass stopped: the caller cancelled it, or a
// deadline (the overall timeout or the caller's) passed.
func stopReason(parent context.Context) Reason {
	if errors.Is(parent.Err(), context.Canceled) {
		return ReasonCanceled
	}
	return ReasonTimeout
}

// sleep waits d or until ctx is done. It returns at once with an error when
// ctx's deadline comes before d ends: waiting could only end in a timeout.
func sleep(ctx context.Context, d time.Duration) error {
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < d {
		return context.DeadlineExceeded
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (e *Engine) attemptFinished(a Attempt) {
	if e.Observer != nil {
		e.Observer.AttemptFinished(a)
	}
}

func (e *Engine) imageFinished(r Result) {
	if e.Observer != nil {
		e.Observer.ImageFinished(r)
	}
}
