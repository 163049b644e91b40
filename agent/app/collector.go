package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	"github.com/nodeprefetch/image-prefetcher/agent/sender"
)

// CollectorOptions are the agent's flags for the results collector.
type CollectorOptions struct {
	Address      string
	FlushTimeout time.Duration
	BufferSize   int
	TokenFile    string
}

func (o *CollectorOptions) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Address, "collector-address", o.Address, "`host:port` of the results collector (image-prefetcher collect); every pull attempt is sent there. Empty: none.")
	// The reference tool's name for the same flag, so its manifests keep working.
	fs.StringVar(&o.Address, "metrics-endpoint", o.Address, "`host:port`: alias of --collector-address (the reference tool's name).")
	fs.DurationVar(&o.FlushTimeout, "collector-flush-timeout", o.FlushTimeout, "How long the agent waits, when a fetch ends or on shutdown, for queued attempts to reach the collector.")
	fs.IntVar(&o.BufferSize, "collector-buffer-size", o.BufferSize, "Attempts queued for the collector while it is unreachable; when full the oldest is dropped.")
	fs.StringVar(&o.TokenFile, "collector-token-file", o.TokenFile, "`path` of the projected ServiceAccount token (the collector's audience) sent with every call; read again for each, as the kubelet rotates it. Empty: none.")
}

func (o *CollectorOptions) validate() error {
	var errs []error
	if o.Address != "" {
		if _, _, err := net.SplitHostPort(o.Address); err != nil {
			errs = append(errs, fmt.Errorf("--collector-address=%q: want host:port: %w", o.Address, err))
		}
	}
	if o.FlushTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--collector-flush-timeout=%s: must be positive", o.FlushTimeout))
	}
	if o.BufferSize <= 0 {
		errs = append(errs, fmt.Errorf("--collector-buffer-size=%d: must be positive", o.BufferSize))
	}
	return errors.Join(errs...)
}

func defaultCollectorOptions() CollectorOptions {
	return CollectorOptions{FlushTimeout: 10 * time.Second, BufferSize: sender.DefaultBufferSize}
}

// startSender plugs the results sender into the pass's observers when
// --collector-address is set. The returned function flushes within
// --collector-flush-timeout and stops it; it never fails the command: the
// collector is an observer, not a reason for a node to fail.
func (p *prefetcher) startSender(o CollectorOptions) (stop func(), err error) {
	if o.Address == "" {
		return func() {}, nil
	}
	s, err := sender.New(sender.Config{
		Address:    o.Address,
		Node:       p.opts.NodeName,
		Instance:   p.opts.Instance,
		BufferSize: o.BufferSize,
		TokenFile:  o.TokenFile,
		Log:        p.log,
	})
	if err != nil {
		return nil, err
	}
	p.extra = append(p.extra, s)
	p.log.Info("sending pull attempts to the results collector", "address", o.Address)
	return func() {
		// Not the command's context: a SIGTERM has cancelled that, and the
		// flush is what must still happen.
		ctx, cancel := context.WithTimeout(context.Background(), o.FlushTimeout)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			p.log.Error("results collector flush", "error", err.Error())
			return
		}
		st := s.Stats()
		p.log.Info("results collector flushed", "delivered", st.Delivered, "dropped", st.Dropped)
	}, nil
}

const collectUsage = `image-prefetcher collect (alias aggregate-metrics) receives every pull attempt of every
agent over gRPC (agents: --collector-address) and serves them over HTTP:
  GET /metrics     a page of the attempts as a JSON array (the reference tool's format); ?limit= and
                   ?continue= (the X-Continue header of the previous page); filters ?node= ?image= ?instance=
  GET /summary     per node and per image: attempts, failures, p50/max duration, bytes
  GET /prometheus  the collector's own Prometheus metrics (the agents' Prometheus metrics are on their
                   own /metrics; this /metrics is the JSON results)
  GET /healthz
Only the instance's agents may send: each call carries a projected ServiceAccount token of
--token-audience, checked with a TokenReview; the ServiceAccount must be --agent-service-account
and the token bound to a pod on a node, whose name the records get.

Flags:
`

// collect is the `collect` command: the results collector.
// name is the command as typed (collect or its alias), for the messages.
func collect(ctx context.Context, name string, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(name, collectUsage, stdout)
	grpcAddr := fs.String("grpc-address", ":9478", "Address of the gRPC server the agents send to.")
	httpAddr := fs.String("http-address", ":9479", "Address of the HTTP server (/metrics JSON, /summary, /prometheus, /healthz).")
	maxResults := fs.Int("max-results", collector.DefaultMaxResults, "Results held in memory; beyond it the oldest are dropped (counted in image_prefetcher_collector_results_dropped_total).")
	maxBytes := fs.String("max-bytes", resource.NewQuantity(collector.DefaultMaxBytes, resource.BinarySI).String(), "`Quantity` of results held in memory (wire size plus a fixed overhead each); beyond it the oldest are dropped.")
	maxNodeBytes := fs.String("max-node-bytes", resource.NewQuantity(collector.DefaultMaxNodeBytes, resource.BinarySI).String(), "`Quantity` of one node's results; beyond it that node's oldest are dropped.")
	agentSA := fs.String("agent-service-account", "", "`namespace/name` of the agents' ServiceAccount, the only one whose tokens are accepted (required).")
	audience := fs.String("token-audience", collector.DefaultAudience, "Audience the agents' tokens must be issued for (their projected serviceAccountToken volume's).")
	cacheTTL := fs.Duration("token-review-cache-ttl", collector.DefaultReviewCacheTTL, "How long an accepted token is trusted before it is reviewed again.")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig for the TokenReviews; empty: in-cluster.")
	shutdown := fs.Duration("shutdown-timeout", collector.DefaultShutdownTimeout, "Bound of the graceful shutdown on SIGTERM.")
	logOpts := defaultLogOptions()
	logOpts.addFlags(fs)
	if code, done := parseFlags(fs, name, args, stderr); done {
		return code
	}
	if fs.NArg() > 0 {
		return usageError(stderr, name, fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	if *maxResults <= 0 {
		return usageError(stderr, name, fmt.Errorf("--max-results=%d: must be positive", *maxResults))
	}
	lim := collector.Limits{MaxResults: *maxResults}
	for _, q := range []struct {
		flag, value string
		to          *int64
	}{{"max-bytes", *maxBytes, &lim.MaxBytes}, {"max-node-bytes", *maxNodeBytes, &lim.MaxNodeBytes}} {
		v, err := resource.ParseQuantity(q.value)
		if err != nil || v.Sign() <= 0 {
			return usageError(stderr, name, fmt.Errorf("--%s=%q: want a positive quantity such as 64Mi", q.flag, q.value))
		}
		*q.to = v.Value()
	}
	username, err := agentUsername(*agentSA)
	if err != nil {
		return usageError(stderr, name, err)
	}
	if *audience == "" || *cacheTTL <= 0 {
		return usageError(stderr, name, fmt.Errorf("--token-audience must be set and --token-review-cache-ttl positive"))
	}
	log, err := logOpts.newLogger(stderr)
	if err != nil {
		return usageError(stderr, name, err)
	}
	if err := routeClientGoLogs(log); err != nil {
		log.Error("collector cannot route client-go's logs", "error", err.Error())
		return ExitFailed
	}
	client, err := collectorClient(*kubeconfig)
	if err != nil {
		log.Error("collector cannot review tokens", "error", err.Error())
		return ExitFailed
	}
	c := collector.New(collector.NewBoundedStore(lim), log)
	c.Auth = &collector.TokenReviewer{Reviews: client.AuthenticationV1().TokenReviews(),
		Audience: *audience, Username: username, CacheTTL: *cacheTTL}
	c.ShutdownTimeout = *shutdown
	log.Info("collector accepts only the agents' tokens", "serviceAccount", username, "audience", *audience)
	if err := c.Run(ctx, *grpcAddr, *httpAddr); err != nil {
		log.Error("collector failed", "error", err.Error())
		return ExitFailed
	}
	return ExitOK
}

// agentUsername turns --agent-service-account=namespace/name into the user
// name the API server gives that ServiceAccount's tokens.
func agentUsername(v string) (string, error) {
	ns, sa, ok := strings.Cut(v, "/")
	if !ok || len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1123Subdomain(sa)) > 0 {
		return "", fmt.Errorf("--agent-service-account=%q: want namespace/name of the agents' ServiceAccount", v)
	}
	return "system:serviceaccount:" + ns + ":" + sa, nil
}

// collectorClient is the collector's client for TokenReviews: in-cluster,
// or from a kubeconfig.
func collectorClient(kubeconfig string) (kubernetes.Interface, error) {
	return newClient(kubeconfig, "image-prefetcher-collector/"+build().Version, nil)
}
