package app

import (
	"context"

	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// progressFollowing is the state of --pull-progress-timeout across passes.
type progressFollowing struct {
	// watcher is set once the runtime is known to be a containerd.
	watcher *progress.Watcher
	source  *progress.Containerd
}

// engine is what the pull engine follows progress with; nil when nothing.
func (s *progressFollowing) engine() pull.Progress {
	if s.watcher == nil {
		return nil
	}
	return s.watcher
}

// close forgets the watcher; its connection is the CRI client's.
func (s *progressFollowing) close() {
	s.watcher, s.source = nil, nil
}

// startProgress runs when the runtime has just been reached. On containerd,
// with --pull-progress-timeout above zero, the engine follows the bytes of
// its pulls through containerd's leases and content API on the same socket;
// elsewhere the escalating timeouts alone bound an attempt.
func (p *prefetcher) startProgress(c *cri.Client) {
	p.progress.close()
	if p.cfg.ProgressTimeout <= 0 {
		return
	}
	if !c.IsContainerd() {
		msg := "pull progress not followed: only containerd shows it; attempts end at their escalating timeouts"
		if cri.JoinsConcurrentPulls(c.RuntimeName) {
			msg += " (CRI-O: its own pull_progress_timeout in [crio.image] ends a pull whose bytes stopped)"
		}
		p.log.Info(msg, "runtime", c.RuntimeName)
		return
	}
	src := progress.NewContainerd(c.Conn(), p.opts.Instance)
	src.Owner = processID
	// Images pulled one after another share slot leases: a small image's
	// pull then costs no containerd call of its own (docs/benchmarks.md).
	src.Slots = true
	p.progress.source = src
	p.progress.watcher = &progress.Watcher{Source: src, LogInterval: p.opts.PullProgressLogInterval, Log: p.log, Recorder: p.metrics}
	p.log.Info("following pull progress through containerd's content API", "noProgressWindow", p.cfg.ProgressTimeout,
		"attemptCap", p.cfg.MaxAttemptTimeout, "logInterval", p.opts.PullProgressLogInterval)
}

// pruneLeases deletes, at the end of a pass, the slot leases the pass's
// pulled images shared, and this instance's leases of images that left the
// list: what their failed pulls fetched would otherwise hold disk space,
// which the kubelet's image GC cannot reclaim, until the lease expires a day
// later.
func (p *prefetcher) pruneLeases(ctx context.Context, list *imagelist.List) {
	src := p.progress.source
	if src == nil {
		return
	}
	if err := src.Drain(ctx); err != nil {
		p.log.Warn("pull progress: slot leases not all deleted", "error", err.Error())
	}
	refs := make([]string, 0, len(list.Entries))
	for _, e := range list.Entries {
		refs = append(refs, e.Ref)
	}
	pruned, err := src.Prune(ctx, refs)
	for _, img := range pruned {
		p.log.Info("lease of an image that left the list deleted: what its pulls fetched may be collected", "image", img)
	}
	if err != nil {
		p.log.Warn("pull progress: leases of images that left the list not all deleted", "error", err.Error())
	}
	held, err := p.trimLeases(ctx)
	if err != nil {
		p.log.Warn("pull progress: bytes held by leases not read", "error", err.Error())
		return
	}
	p.metrics.SetLeaseHeldBytes(held)
}

// trimLeases bounds what the leases of failed images keep for a resume: to
// --max-resume-bytes, and to nothing while the image filesystem is at the
// disk budget (those bytes are the only ones on it the agent can free, and
// the kubelet's GC cannot). It returns the bytes still held.
func (p *prefetcher) trimLeases(ctx context.Context) (int64, error) {
	src := p.progress.source
	limit, why := int64(-1), ""
	if n := p.opts.MaxResumeBytes.Value(); n > 0 {
		limit, why = n, "--max-resume-bytes="+p.opts.MaxResumeBytes.String()
	}
	if p.budget != nil && p.budget.Admit() != nil {
		limit, why = 0, "the image filesystem is at the disk budget"
	}
	if limit < 0 {
		return src.Held(ctx)
	}
	trimmed, held, err := src.Trim(ctx, limit)
	for _, img := range trimmed {
		p.log.Info("lease of a failed image let go: the next pass pulls it from the start", "image", img, "why", why)
	}
	return held, err
}
