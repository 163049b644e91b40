// Package app wires the agent's commands: `run` (the DaemonSet container) and
// `fetch` (one pass, for init containers, Jobs and local use).
package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/nodeprefetch/image-prefetcher/agent/health"
	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/metrics"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pullslots"
)

// Exit codes of the commands.
const (
	ExitOK = 0
	// ExitFailed: some image is not present, the pass could not run (no CRI
	// runtime, unreadable list), or it was interrupted.
	ExitFailed = 1
	// ExitUsage: bad flags or arguments, nothing else.
	ExitUsage = 2
	// ExitNotRecorded: the command was asked to label (--label, the default)
	// and the node could not be written: the label write (label and list
	// annotation, one patch) failed within --label-write-timeout, or no
	// Kubernetes client could be set up (kubeconfig missing or invalid, not
	// in a cluster). The node's label then does not say what the pass found,
	// so this code wins over ExitFailed. Likewise when the Node condition or
	// the startup taint's removal, asked for, could not be written.
	ExitNotRecorded = 3
)

// defaultRetryAfter is the first delay of `run` after a pass that failed or
// could not write its outcome; it doubles up to --recheck-interval.
const defaultRetryAfter = 10 * time.Second

// labelRetryCap bounds the delay between passes while the node's label is
// not written: the outcome is known and workloads wait on the label, and a
// retry of a node that holds the list costs one read and one patch.
const labelRetryCap = 30 * time.Second

// clientError is a failure to set up the Kubernetes client: not a usage
// error, but a node that cannot be written (ExitNotRecorded).
type clientError struct{ err error }

func (e *clientError) Error() string { return e.err.Error() }
func (e *clientError) Unwrap() error { return e.err }

// errShutdown is the cancellation cause when SIGTERM or SIGINT arrives.
var errShutdown = errors.New("shutdown requested")

const usage = `image-prefetcher pulls a list of images through the node's CRI socket and labels
the Node image-prefetcher.stackrox.io/<instance>=succeeded|failed.

Usage:
  image-prefetcher run   [flags]   serve /healthz /readyz /metrics, pass now and every --recheck-interval
  image-prefetcher fetch [flags]   one pass; exit 0 only if every image is present and the node says so
                                   (1 images missing, 2 bad flags, 3 node label not written)
  image-prefetcher collect [flags] the results collector (alias aggregate-metrics; see docs/collector.md)
  image-prefetcher version

Run "image-prefetcher <command> --help" for the flags.
`

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
		return collect(ctx, args[0], args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, build())
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
	opts := defaultOptions()
	if name == "run" {
		opts.Run = defaultRunOptions()
	}
	fs := newFlagSet(name, commandUsage[name], stdout)
	opts.addFlags(fs)
	if code, done := parseFlags(fs, name, args, stderr); done {
		return code
	}
	if fs.NArg() > 0 {
		return usageError(stderr, name, fmt.Errorf("unexpected arguments %q (images go in --image-list-file)", fs.Args()))
	}
	p, err := newPrefetcher(opts, stderr, nil)
	if err != nil {
		var ce *clientError
		if errors.As(err, &ce) {
			// Not a usage error: --help would not help.
			printError(stderr, name, err)
			return ExitNotRecorded
		}
		return usageError(stderr, name, err)
	}
	defer p.close()
	p.logStart(name)
	stopSender, err := p.startSender(opts.Collector)
	if err != nil {
		return usageError(stderr, name, err)
	}
	// Deferred after close: it runs first, so that a fetch's attempts reach
	// the collector before the process exits.
	defer stopSender()
	if opts.Run != nil {
		return p.serve(ctx)
	}
	rep, err := p.pass(ctx)
	return p.fetchExit(rep, err)
}

// maxMissingLogged bounds the summary lines of a failed fetch.
const maxMissingLogged = 20

// fetchExit logs the end of a fetch and returns its exit code.
func (p *prefetcher) fetchExit(rep passReport, err error) int {
	code := ExitOK
	switch {
	case err != nil:
		p.log.Error("fetch failed", "error", err.Error())
		code = ExitFailed
	case rep.Canceled:
		p.log.Error("fetch interrupted before the list was complete")
		code = ExitFailed
	case rep.State != nodelabel.Succeeded:
		logged, badLines := 0, 0
		for _, f := range rep.Failed() {
			var le *imagelist.LineError
			if errors.As(f.Err, &le) {
				badLines++ // logged once already, when the list was read
				continue
			}
			if logged++; logged <= maxMissingLogged {
				p.log.Error("missing image", "image", f.Image, "reason", string(f.Reason))
			}
		}
		if logged > maxMissingLogged {
			p.log.Error("more missing images, not logged", "count", logged-maxMissingLogged)
		}
		if badLines > 0 {
			p.log.Error("the list has bad lines (logged above)", "badLines", badLines)
		}
		code = ExitFailed
	}
	if rep.LabelErr != nil {
		p.log.Error("fetch could not write the node label: the node does not say what this pass found",
			"label", nodelabel.Key(p.opts.Instance), "state", string(rep.State), "exitCode", ExitNotRecorded,
			"error", rep.LabelErr.Error())
		code = ExitNotRecorded
	}
	if rep.NodeErr != nil {
		p.log.Error("fetch could not update the node (condition or startup taint)", "exitCode", ExitNotRecorded,
			"error", rep.NodeErr.Error())
		code = ExitNotRecorded
	}
	return code
}

// newPrefetcher checks the options and builds the pass machinery. client is
// the Kubernetes client to label with; nil builds one from the options.
func newPrefetcher(opts *Options, stderr io.Writer, client kubernetes.Interface) (*prefetcher, error) {
	if err := opts.validate(); err != nil {
		return nil, err
	}
	log, err := opts.Log.newLogger(stderr)
	if err != nil {
		return nil, err
	}
	p := &prefetcher{
		opts:       opts,
		cfg:        opts.Pull,
		metrics:    metrics.New(),
		readiness:  &health.Readiness{},
		retryAfter: defaultRetryAfter,
	}
	if opts.Label {
		if client == nil {
			asNode := ""
			if opts.ActAsNode {
				asNode = opts.NodeName
			}
			if client, err = kubeClient(opts.Kubeconfig, asNode); err != nil {
				return nil, err
			}
		}
		labeler := &nodelabel.Labeler{Client: client, Node: opts.NodeName, Instance: opts.Instance, WriteTimeout: opts.LabelWriteTimeout,
			Namespace: opts.Namespace}
		if opts.Namespace != "" {
			sa := client
			if opts.ActAsNode {
				// A node may not read DaemonSets: the ServiceAccount asks.
				if sa, err = kubeClient(opts.Kubeconfig, ""); err != nil {
					return nil, err
				}
			}
			labeler.InstanceAlive = instanceAlive(sa, opts.Instance)
			p.kube = sa
		}
		log = log.With("instance", opts.Instance, "node", opts.NodeName)
		p.setupNode(client, labeler, log)
	}
	// client-go logs through klog: its lines (throttling, watch trouble, API
	// warnings) get the agent's format, instance and node.
	if err := routeClientGoLogs(log); err != nil {
		return nil, err
	}
	if err := p.setupPullSlots(client, log); err != nil {
		return nil, err
	}
	p.log = log
	return p, nil
}

// instanceAlive reports whether the instance's DaemonSet (named after the
// instance, labelled as ours) exists in a namespace. The base ClusterRole may
// get exactly the DaemonSets of that name, in any namespace.
func instanceAlive(client kubernetes.Interface, instance string) func(context.Context, string) (bool, error) {
	return func(ctx context.Context, namespace string) (bool, error) {
		ds, err := client.AppsV1().DaemonSets(namespace).Get(ctx, instance, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return false, nil
		case apierrors.IsForbidden(err):
			return false, fmt.Errorf("cannot tell (the ServiceAccount needs get on daemonsets named %s, in the base ClusterRole): %w", instance, err)
		case err != nil:
			return false, err
		}
		return ds.Labels[pullslots.LabelName] == "image-prefetcher" && ds.Labels[pullslots.LabelInstance] == instance, nil
	}
}

// kubeClient is the agent's client of the API server: as its ServiceAccount,
// or, with asNode set, as that node (constrained impersonation, mode
// associated-node: the API server allows it only for the node the pod's token
// is bound to, and the node's own authorizer and NodeRestriction then decide).
func kubeClient(kubeconfig, asNode string) (kubernetes.Interface, error) {
	c, err := newClient(kubeconfig, "image-prefetcher/"+build().Version, func(cfg *rest.Config) {
		if asNode != "" {
			cfg.Impersonate = rest.ImpersonationConfig{UserName: "system:node:" + asNode}
		}
	})
	if err != nil {
		return nil, &clientError{fmt.Errorf("%w (use --label=false to pull without labelling)", err)}
	}
	return c, nil
}

// newClient is a clientset from --kubeconfig, else the in-cluster config, with
// this user agent; adjust changes the config before the clientset is made.
func newClient(kubeconfig, userAgent string, adjust func(*rest.Config)) (kubernetes.Interface, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config (--kubeconfig=%q): %w", kubeconfig, err)
	}
	cfg.UserAgent = userAgent
	if adjust != nil {
		adjust(cfg)
	}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client (--kubeconfig=%q): %w", kubeconfig, err)
	}
	return c, nil
}

// serve is the `run` command: the HTTP endpoints plus a pass now and after
// every --recheck-interval. A pass that failed, or whose outcome could not be
// written on the node, is retried sooner, from a few seconds on and doubling
// (see nextWait), so a runtime that was restarting, a registry or an API
// server that was briefly down do not cost a whole interval.
func (p *prefetcher) serve(ctx context.Context) int {
	g, ctx := errgroup.WithContext(ctx)
	if p.opts.Run.ListenAddress != "" {
		srv := &health.Server{Gatherer: p.metrics.Registry(), Ready: p.readiness.Check}
		g.Go(func() error { return srv.Run(ctx, p.opts.Run.ListenAddress) })
	}
	g.Go(func() error {
		retry := p.retryAfter
		for {
			rep, err := p.pass(ctx)
			if rep.Canceled || ctx.Err() != nil {
				return nil
			}
			var wait time.Duration
			wait, retry = p.nextWait(rep, err, retry)
			if wait < p.opts.Run.RecheckInterval {
				p.log.Info("next pass soon", "in", wait.Round(time.Millisecond), "labelWritten", rep.LabelErr == nil,
					"state", string(rep.State))
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
	if errors.Is(context.Cause(ctx), errShutdown) {
		p.leave(ctx)
	}
	p.log.Info("agent stopped")
	return ExitOK
}

// nextWait returns how long to wait before the next pass, and the retry delay
// after that one. A pass that failed (an image missing, no runtime) is retried
// after retry, doubling up to the interval. A node whose label was not written
// is retried on the same growing schedule but never more than labelRetryCap
// apart: the outcome is known, only the write is missing, and it is what
// workloads schedule on. A pass with everything recorded waits the interval.
func (p *prefetcher) nextWait(rep passReport, err error, retry time.Duration) (wait, next time.Duration) {
	interval := p.opts.Run.RecheckInterval
	grow := min(2*retry, interval)
	switch {
	case rep.LabelErr != nil || rep.NodeErr != nil:
		return min(retry, labelRetryCap, interval), grow
	case err != nil || rep.State == nodelabel.Failed:
		return min(retry, interval), grow
	default:
		return interval, p.retryAfter
	}
}
