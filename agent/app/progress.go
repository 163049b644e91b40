package app

import (
	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// progressFollowing is the state of --pull-progress-timeout across passes.
type progressFollowing struct {
	// watcher is set once the runtime is known to be a containerd.
	watcher *progress.Watcher
	source  *progress.Containerd
	// socket is where containerd's API is served when not on the CRI socket
	// (tests only).
	socket string
}

// engine is what the pull engine follows progress with; nil when nothing.
func (s *progressFollowing) engine() pull.Progress {
	if s.watcher == nil {
		return nil
	}
	return s.watcher
}

func (s *progressFollowing) close() {
	if s.source != nil {
		s.source.Close()
	}
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
	if c.RuntimeName != pin.RuntimeName {
		msg := "pull progress not followed: only containerd shows it; attempts end at their escalating timeouts"
		if cri.JoinsConcurrentPulls(c.RuntimeName) {
			msg += " (CRI-O: its own pull_progress_timeout in [crio.image] ends a pull whose bytes stopped)"
		}
		p.log.Info(msg, "runtime", c.RuntimeName)
		return
	}
	path := p.progress.socket
	if path == "" {
		path = c.Path
	}
	src, err := progress.Dial(path, p.opts.Instance)
	if err != nil {
		p.log.Warn("pull progress not followed: attempts end at their escalating timeouts", "error", err.Error())
		return
	}
	p.progress.source = src
	p.progress.watcher = &progress.Watcher{Source: src, LogInterval: p.opts.PullProgressLogInterval, Log: p.log, Recorder: p.metrics}
	p.log.Info("following pull progress through containerd's content API", "noProgressWindow", p.cfg.ProgressTimeout,
		"attemptCap", p.cfg.MaxAttemptTimeout, "logInterval", p.opts.PullProgressLogInterval)
}
