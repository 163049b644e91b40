package app

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/credentials"
	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/health"
	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/metrics"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// labelWriter and eventReporter are what a pass needs of agent/nodelabel;
// both are nil when --label=false.
type labelWriter interface {
	Begin(ctx context.Context, listDigest string) error
	Set(ctx context.Context, listDigest string, state nodelabel.State) error
}

type eventReporter interface {
	Report(ctx context.Context, listDigest string, results []pull.Result) error
}

// prefetcher runs passes: read the list, pull what is missing, then record
// the outcome on the node (label, events), in metrics and in readiness.
type prefetcher struct {
	opts      *Options
	log       *slog.Logger
	cfg       pull.Config
	labels    labelWriter
	events    eventReporter
	metrics   *metrics.Metrics
	readiness *health.Readiness
	// extra observers see every attempt and result too (e.g. the results
	// collector's sender).
	extra []pull.Observer
	// gate, when set, bounds how many nodes pull at once cluster-wide. It is
	// asked for a slot only when some image is missing.
	gate pullGate

	// client is the CRI connection, dialled lazily and kept across passes.
	client *cri.Client
}

// pullGate is a cluster-wide bound on pulling nodes: Acquire blocks until
// this node may pull and returns the function that gives the slot back.
type pullGate interface {
	Acquire(ctx context.Context) (release func(), err error)
}

// passReport is the outcome of one pass.
type passReport struct {
	Digest   string
	Results  []pull.Result
	State    nodelabel.State
	Canceled bool // stopped by shutdown: nothing was recorded on the node
}

// Failed lists the results that are not present on the node.
func (r passReport) Failed() []pull.Result {
	var out []pull.Result
	for _, res := range r.Results {
		if res.Outcome == pull.OutcomeFailed {
			out = append(out, res)
		}
	}
	return out
}

// pass runs one pass. It returns an error only when the pass could not run at
// all (unreadable list, no CRI runtime); the node is then labelled failed.
func (p *prefetcher) pass(ctx context.Context) (passReport, error) {
	start := time.Now()
	list, err := p.readList()
	if err != nil {
		p.readiness.SetNotReady(err.Error())
		return passReport{}, err
	}
	rep := passReport{Digest: list.Digest}
	for _, le := range list.Errors {
		p.log.Error("bad image list line", "file", le.Source, "line", le.Line, "text", le.Text, "error", le.Err.Error())
	}
	if p.labels != nil {
		if err := p.labels.Begin(ctx, list.Digest); err != nil {
			// Not fatal: the pass can still pull; the final Set retries the write.
			p.log.Error("clear stale node label", "error", err.Error())
		}
	}

	results, err := p.pull(ctx, list)
	if err != nil {
		p.log.Error("pass could not pull", "error", err.Error())
	}
	rep.Results = append(lineErrorResults(list), results...)
	if ctx.Err() != nil {
		// Only a shutdown cancels this context (the pass deadline lives
		// inside the engine). A shutdown interrupted the pass: its outcome says nothing about the
		// list, so the node keeps what it had (Begin already cleared a label
		// of another list).
		rep.Canceled = true
		p.readiness.SetNotReady("shutting down")
		return rep, nil
	}

	rep.State = nodelabel.Succeeded
	if err != nil || len(rep.Failed()) > 0 {
		rep.State = nodelabel.Failed
	}
	p.readiness.SetResults(rep.Results)
	if err != nil {
		p.readiness.SetNotReady(err.Error())
	}
	p.metrics.PassFinished(rep.Results, time.Since(start))
	p.record(ctx, rep, err)
	p.log.Info("pass finished", "state", string(rep.State), "images", len(rep.Results),
		"failed", len(rep.Failed()), "duration", time.Since(start).Round(time.Millisecond), "listDigest", rep.Digest)
	return rep, err
}

// readList reads the list file every pass: a mounted ConfigMap may change in
// place.
func (p *prefetcher) readList() (*imagelist.List, error) {
	l, err := imagelist.ParseFile(p.opts.ImageList)
	if err != nil {
		return nil, fmt.Errorf("read image list: %w", err)
	}
	return l, nil
}

// pull connects to the runtime (once) and runs the engine over the list.
func (p *prefetcher) pull(ctx context.Context, list *imagelist.List) ([]pull.Result, error) {
	if p.client == nil {
		c, err := p.dial(ctx)
		if err != nil {
			return failAll(list.Entries, pull.ReasonUnavailable, err), err
		}
		p.client = c
	}
	// The keyring is built every pass so that rotated pull secrets (mounted
	// Secrets are updated in place) are used without a restart.
	keyring, err := credentials.NewKeyring(p.opts.DockerConfigs, p.opts.CredProviderConfig, p.opts.CredProviderBinDir)
	if err != nil {
		err = fmt.Errorf("load credentials: %w", err)
		return failAll(list.Entries, pull.ReasonInvalidConfig, err), err
	}
	for _, w := range keyring.Warnings() {
		p.log.Warn("credentials", "warning", w.Error())
	}
	engine := &pull.Engine{
		Images:   p.client.Images,
		Creds:    keyring,
		Observer: append(observers{logObserver{p.log}, p.metrics}, p.extra...),
		Config:   p.cfg,
	}
	if p.gate != nil && p.cfg.Policy != pull.PolicyAlways {
		missing, err := p.missing(ctx, list.Entries)
		if err != nil {
			return failAll(list.Entries, pull.ReasonUnavailable, err), err
		}
		if len(missing) == 0 {
			// Everything is present: no slot needed, the engine only confirms.
			return engine.Run(ctx, list.Entries), nil
		}
	}
	if p.gate != nil {
		release, err := p.gate.Acquire(ctx)
		if err != nil {
			err = fmt.Errorf("wait for a cluster-wide pull slot: %w", err)
			return failAll(list.Entries, pull.ReasonUnavailable, err), err
		}
		defer release()
	}
	return engine.Run(ctx, list.Entries), nil
}

// missing returns the entries the runtime does not hold, with one
// ImageStatus call each.
func (p *prefetcher) missing(ctx context.Context, entries []imagelist.Entry) ([]imagelist.Entry, error) {
	var out []imagelist.Entry
	for _, e := range entries {
		st, err := p.client.Images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: e.Ref}})
		if err != nil {
			return nil, fmt.Errorf("image status %s: %w", e.Ref, err)
		}
		if st.GetImage() == nil {
			out = append(out, e)
		}
	}
	return out, nil
}

func (p *prefetcher) dial(ctx context.Context) (*cri.Client, error) {
	endpoint := p.opts.CRISocket
	if endpoint == "" {
		found, err := cri.Detect(p.opts.HostRoot)
		if err != nil {
			return nil, fmt.Errorf("detect CRI socket: %w", err)
		}
		p.log.Info("detected CRI socket", "path", found)
		endpoint = found
	}
	c, err := cri.Dial(ctx, endpoint, p.opts.DialTimeout)
	if err != nil {
		return nil, err
	}
	p.log.Info("connected to CRI runtime", "socket", c.Path, "runtime", c.RuntimeName, "version", c.RuntimeVersion)
	return c, nil
}

// record writes the pass's outcome to the node: label first (what workloads
// schedule on), then events. Both use their own time budgets, so an expired
// pass deadline does not stop `failed` from being written.
func (p *prefetcher) record(ctx context.Context, rep passReport, passErr error) {
	if p.labels == nil {
		return
	}
	if err := p.labels.Set(ctx, rep.Digest, rep.State); err != nil {
		p.log.Error("write node label", "state", string(rep.State), "error", err.Error())
	} else {
		p.metrics.SetLabelState(string(rep.State))
	}
	results := rep.Results
	if passErr != nil && len(results) == 0 {
		// An empty list that could not even start still deserves an event.
		results = []pull.Result{{Image: "(list)", Outcome: pull.OutcomeFailed, Reason: pull.ReasonUnavailable, Err: passErr}}
	}
	if err := p.events.Report(ctx, rep.Digest, results); err != nil {
		p.log.Error("record node events", "error", err.Error())
	}
}

// lineErrorResults turns malformed list lines into failed results, so that
// they count everywhere a failed image counts: label, readiness, events,
// metrics, exit code.
func lineErrorResults(list *imagelist.List) []pull.Result {
	out := make([]pull.Result, 0, len(list.Errors))
	for i := range list.Errors {
		le := list.Errors[i]
		out = append(out, pull.Result{
			Image:   le.Text,
			Line:    le.Line,
			Outcome: pull.OutcomeFailed,
			Reason:  pull.ReasonInvalidReference,
			Err:     &le,
		})
	}
	return out
}

func failAll(entries []imagelist.Entry, reason pull.Reason, err error) []pull.Result {
	out := make([]pull.Result, len(entries))
	for i, e := range entries {
		out[i] = pull.Result{Image: e.Ref, Line: e.Line, Outcome: pull.OutcomeFailed, Reason: reason, Err: err}
	}
	return out
}

func (p *prefetcher) close() {
	if p.client != nil {
		p.client.Close()
	}
}
