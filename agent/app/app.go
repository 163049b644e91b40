// Package app wires the agent's commands: `run` (the DaemonSet container) and
// `fetch` (one pass, for init containers, Jobs and local use).
package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/nodeprefetch/image-prefetcher/agent/health"
	"github.com/nodeprefetch/image-prefetcher/agent/metrics"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Exit codes of the commands.
const (
	ExitOK     = 0
	ExitFailed = 1 // some image is not present, or the pass could not run
	ExitUsage  = 2
)

// errShutdown is the cancellation cause when SIGTERM or SIGINT arrives.
var errShutdown = errors.New("shutdown requested")

const usage = `image-prefetcher pulls a list of images through the node's CRI socket and labels
the Node image-prefetcher.stackrox.io/<instance>=succeeded|failed.

Usage:
  image-prefetcher run   [flags]   serve /healthz /readyz /metrics, pass now and every --recheck-interval
  image-prefetcher fetch [flags]   one pass; exit 0 only if every image is present
  image-prefetcher collect [flags] the results collector (alias aggregate-metrics; see docs/collector.md)
  image-prefetcher version

Run "image-prefetcher <command> --help" for the flags.
`

// Version is set at build time with -ldflags "-X .../agent/app.Version=...".
var Version = "dev"

// Main runs the command line args (without the program name) and returns the
// process exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return ExitUsage
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	go func() {
		select {
		case <-sigs:
			cancel(errShutdown)
		case <-ctx.Done():
		}
	}()

	switch args[0] {
	case "run":
		return command(ctx, "run", args[1:], stdout, stderr)
	case "fetch":
		return command(ctx, "fetch", args[1:], stdout, stderr)
	case "collect", "aggregate-metrics":
		return collect(ctx, args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, Version)
		return ExitOK
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return ExitOK
	default:
		fmt.Fprintf(stderr, "unknown command %q\n\n%s", args[0], usage)
		return ExitUsage
	}
}

func command(ctx context.Context, name string, args []string, stdout, stderr io.Writer) int {
	server := name == "run"
	opts := defaultOptions()
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(stderr)
	opts.addFlags(fs, server)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return ExitOK
		}
		return ExitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected arguments %q (images go in --image-list-file)\n", name, fs.Args())
		return ExitUsage
	}
	p, err := newPrefetcher(opts, server, stderr, nil)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return ExitUsage
	}
	defer p.close()
	stopSender, err := p.startSender(opts.Collector)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return ExitUsage
	}
	// Deferred after close: it runs first, so that a fetch's attempts reach
	// the collector before the process exits.
	defer stopSender()
	if server {
		return p.serve(ctx)
	}
	rep, err := p.pass(ctx)
	switch {
	case err != nil:
		p.log.Error("fetch failed", "error", err.Error())
		return ExitFailed
	case rep.Canceled:
		p.log.Error("fetch interrupted before the list was complete")
		return ExitFailed
	case rep.State != nodelabel.Succeeded:
		for _, f := range rep.Failed() {
			p.log.Error("missing image", "image", f.Image, "reason", string(f.Reason))
		}
		return ExitFailed
	}
	return ExitOK
}

// newPrefetcher checks the options and builds the pass machinery. client is
// the Kubernetes client to label with; nil builds one from the options.
func newPrefetcher(opts *Options, server bool, stderr io.Writer, client kubernetes.Interface) (*prefetcher, error) {
	if err := opts.validate(server); err != nil {
		return nil, err
	}
	log, err := newLogger(opts, stderr)
	if err != nil {
		return nil, err
	}
	policy, err := pull.ParsePolicy(opts.PullPolicy)
	if err != nil {
		return nil, fmt.Errorf("--pull-policy: %w", err)
	}
	cfg := pull.Config{
		MaxParallel:           opts.MaxParallelPulls,
		Policy:                policy,
		InitialAttemptTimeout: opts.InitialPullAttemptTimeout,
		MaxAttemptTimeout:     opts.MaxPullAttemptTimeout,
		InitialDelay:          opts.InitialPullAttemptDelay,
		MaxDelay:              opts.MaxPullAttemptDelay,
		OverallTimeout:        opts.OverallTimeout,
		MaxAttempts:           opts.MaxAttempts,
		HedgeAfter:            opts.HedgeAfter,
		MaxHedges:             opts.MaxHedges,
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := &prefetcher{
		opts:      opts,
		cfg:       cfg,
		metrics:   metrics.New(),
		readiness: &health.Readiness{},
	}
	if opts.Label {
		if err := nodelabel.ValidateInstance(opts.Instance); err != nil {
			return nil, fmt.Errorf("--instance: %w", err)
		}
		if client == nil {
			if client, err = kubeClient(opts.Kubeconfig); err != nil {
				return nil, err
			}
		}
		p.labels = &nodelabel.Labeler{Client: client, Node: opts.NodeName, Instance: opts.Instance, WriteTimeout: opts.LabelWriteTimeout}
		p.events = &nodelabel.Events{Client: client, Node: opts.NodeName, Instance: opts.Instance, WriteTimeout: opts.LabelWriteTimeout}
		log = log.With("instance", opts.Instance, "node", opts.NodeName)
	}
	if err := p.setupGate(client, log); err != nil {
		return nil, err
	}
	p.log = log
	return p, nil
}

func newLogger(opts *Options, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(opts.LogLevel)); err != nil {
		return nil, fmt.Errorf("--log-level=%q: %w", opts.LogLevel, err)
	}
	ho := &slog.HandlerOptions{Level: level}
	if opts.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, ho)), nil
	}
	return slog.New(slog.NewTextHandler(w, ho)), nil
}

func kubeClient(kubeconfig string) (kubernetes.Interface, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config (--kubeconfig=%q; use --label=false to pull without labelling): %w", kubeconfig, err)
	}
	cfg.UserAgent = "image-prefetcher/" + Version
	return kubernetes.NewForConfig(cfg)
}

// serve is the `run` command: the HTTP endpoints plus a pass now and after
// every --recheck-interval. A failed pass is retried sooner, with a growing
// delay capped by the interval, so a runtime that was restarting or a
// registry that was briefly down do not cost a whole interval.
func (p *prefetcher) serve(ctx context.Context) int {
	g, ctx := errgroup.WithContext(ctx)
	if p.opts.ListenAddress != "" {
		srv := &health.Server{Gatherer: p.metrics.Registry(), Ready: p.readiness.Check}
		g.Go(func() error { return srv.Run(ctx, p.opts.ListenAddress) })
	}
	g.Go(func() error {
		retry := 10 * time.Second
		for {
			rep, err := p.pass(ctx)
			wait := p.opts.RecheckInterval
			if err != nil || rep.State == nodelabel.Failed {
				wait = min(retry, wait)
				retry = min(2*retry, p.opts.RecheckInterval)
			} else {
				retry = 10 * time.Second
			}
			if rep.Canceled {
				return nil
			}
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
		}
	})
	err := g.Wait()
	if err != nil && !errors.Is(context.Cause(ctx), errShutdown) {
		p.log.Error("agent stopped", "error", err.Error())
		return ExitFailed
	}
	p.log.Info("agent stopped")
	return ExitOK
}
