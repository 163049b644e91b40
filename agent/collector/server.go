package collector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

// MaxBatch bounds the results of one Submit call, and so the memory one call
// can take before the store's bound applies.
const MaxBatch = 10000

// DefaultShutdownTimeout bounds the graceful shutdown of both servers.
const DefaultShutdownTimeout = 10 * time.Second

// Collector serves the Results gRPC service and the HTTP endpoints over one
// Store.
type Collector struct {
	resultsv1.UnimplementedResultsServer

	Store *Store
	Log   *slog.Logger
	// ShutdownTimeout bounds the graceful shutdown. Default
	// DefaultShutdownTimeout.
	ShutdownTimeout time.Duration

	registry   *prometheus.Registry
	received   prometheus.Counter
	duplicates prometheus.Counter
	dropped    *prometheus.CounterVec
	stored     prometheus.GaugeFunc
}

// New returns a collector over store, with its Prometheus metrics on a
// registry of its own.
func New(store *Store, log *slog.Logger) *Collector {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Collector{Store: store, Log: log, registry: prometheus.NewRegistry()}
	const ns, sub = "image_prefetcher", "collector"
	c.received = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
		Name: "results_received_total", Help: "Results received over gRPC, duplicates included."})
	c.duplicates = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
		Name: "results_duplicate_total", Help: "Received results whose attempt id was already held (resent by an agent)."})
	c.dropped = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
		Name: "results_dropped_total", Help: "Results not kept: evicted (the oldest, when --max-results is reached) or invalid (no attempt id)."},
		[]string{"reason"})
	c.stored = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub,
		Name: "results_stored", Help: "Results held in memory."}, func() float64 { return float64(store.Len()) })
	for _, r := range []string{"evicted", "invalid"} {
		c.dropped.WithLabelValues(r)
	}
	c.registry.MustRegister(c.received, c.duplicates, c.dropped, c.stored,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return c
}

// Registry is the collector's own Prometheus registry.
func (c *Collector) Registry() *prometheus.Registry { return c.registry }

// Submit stores a batch and acknowledges the ids it holds.
func (c *Collector) Submit(_ context.Context, req *resultsv1.SubmitRequest) (*resultsv1.SubmitResponse, error) {
	if n := len(req.GetResults()); n > MaxBatch {
		return nil, status.Errorf(codes.InvalidArgument, "batch of %d results; at most %d", n, MaxBatch)
	}
	st := c.Store.Add(req.GetResults())
	c.received.Add(float64(len(req.GetResults())))
	c.duplicates.Add(float64(st.Duplicates))
	c.dropped.WithLabelValues("evicted").Add(float64(st.Evicted))
	c.dropped.WithLabelValues("invalid").Add(float64(st.Invalid))
	if st.Evicted > 0 {
		c.Log.Warn("result cap reached, oldest results dropped", "dropped", st.Evicted, "max", c.Store.max)
	}
	if st.Invalid > 0 {
		c.Log.Warn("results without attempt id rejected", "count", st.Invalid)
	}
	for _, r := range req.GetResults() {
		c.Log.Debug("result", "node", r.GetNode(), "image", r.GetImage(), "attemptID", r.GetAttemptId(),
			"durationMs", r.GetDurationMs(), "error", r.GetError())
	}
	return &resultsv1.SubmitResponse{AcknowledgedIds: st.Acknowledged, Duplicates: uint32(st.Duplicates)}, nil
}

// JSONResult is one element of GET /metrics. attempt_id, started_at (Unix
// seconds), image, error (omitted on success), duration_ms, node and
// size_bytes are the reference tool's fields; the others are additions.
type JSONResult struct {
	AttemptID         string `json:"attempt_id"`
	StartedAt         int64  `json:"started_at"`
	Image             string `json:"image"`
	Error             string `json:"error,omitempty"`
	DurationMs        uint64 `json:"duration_ms"`
	Node              string `json:"node"`
	SizeBytes         uint64 `json:"size_bytes"`
	Instance          string `json:"instance"`
	ImageRef          string `json:"image_ref,omitempty"`
	StartedAtUnixNano int64  `json:"started_at_unix_nano"`
	Attempt           uint32 `json:"attempt"`
	Outcome           string `json:"outcome"`
	Reason            string `json:"reason,omitempty"`
	TimeoutMs         uint64 `json:"timeout_ms,omitempty"`
	// What the runtime wrote of the image during the attempt, what it went
	// on from, and the image's size; absent where the agent does not follow
	// pull progress.
	FetchedBytes uint64 `json:"fetched_bytes,omitempty"`
	ResumedBytes uint64 `json:"resumed_bytes,omitempty"`
	TotalBytes   uint64 `json:"total_bytes,omitempty"`
}

// Outcome names in JSON.
const (
	OutcomeSucceeded = "succeeded"
	OutcomeFailed    = "failed"
)

func toJSON(r *resultsv1.Result) JSONResult {
	outcome := OutcomeSucceeded
	if r.GetOutcome() == resultsv1.Outcome_OUTCOME_FAILED || r.GetError() != "" {
		outcome = OutcomeFailed
	}
	return JSONResult{
		AttemptID: r.GetAttemptId(), StartedAt: r.GetStartedAt(), Image: r.GetImage(), Error: r.GetError(),
		DurationMs: r.GetDurationMs(), Node: r.GetNode(), SizeBytes: r.GetSizeBytes(), Instance: r.GetInstance(),
		ImageRef: r.GetImageRef(), StartedAtUnixNano: r.GetStartedAtUnixNano(), Attempt: r.GetAttempt(),
		Outcome: outcome, Reason: r.GetReason(), TimeoutMs: r.GetTimeoutMs(),
		FetchedBytes: r.GetFetchedBytes(), ResumedBytes: r.GetResumedBytes(), TotalBytes: r.GetTotalBytes(),
	}
}

func filterOf(r *http.Request) Filter {
	q := r.URL.Query()
	return Filter{Node: q.Get("node"), Image: q.Get("image"), Instance: q.Get("instance")}
}

// Handler serves GET /metrics (the results as a JSON array), GET /summary,
// GET /prometheus (the collector's own metrics) and GET /healthz.
func (c *Collector) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		results := c.Store.List(filterOf(r))
		out := make([]JSONResult, len(results))
		for i, res := range results {
			out[i] = toJSON(res)
		}
		c.writeJSON(w, out)
	})
	mux.HandleFunc("GET /summary", func(w http.ResponseWriter, r *http.Request) {
		c.writeJSON(w, Summarize(c.Store.List(filterOf(r))))
	})
	mux.Handle("GET /prometheus", promhttp.HandlerFor(c.registry, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	return mux
}

func (c *Collector) writeJSON(w http.ResponseWriter, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		c.Log.Error("encode JSON response", "error", err.Error())
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if _, err := w.Write(append(b, '\n')); err != nil {
		c.Log.Debug("write HTTP response", "error", err.Error())
	}
}

// Serve serves gRPC on grpcLn and HTTP on httpLn until ctx is done or one of
// them fails, then shuts both down gracefully (in-flight Submit calls and
// requests finish, within ShutdownTimeout). It closes both listeners and
// returns nil after a shutdown requested through ctx.
func (c *Collector) Serve(ctx context.Context, grpcLn, httpLn net.Listener) error {
	gs := grpc.NewServer(grpc.MaxRecvMsgSize(64 << 20))
	resultsv1.RegisterResultsServer(gs, c)
	hs := &http.Server{
		Handler:           c.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		WriteTimeout:      2 * time.Minute, // a large /metrics download
		IdleTimeout:       90 * time.Second,
	}
	timeout := c.ShutdownTimeout
	if timeout <= 0 {
		timeout = DefaultShutdownTimeout
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := gs.Serve(grpcLn); err != nil {
			return fmt.Errorf("serve gRPC on %s: %w", grpcLn.Addr(), err)
		}
		return nil
	})
	g.Go(func() error {
		if err := hs.Serve(httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve HTTP on %s: %w", httpLn.Addr(), err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		stopped := make(chan struct{})
		go func() { gs.GracefulStop(); close(stopped) }()
		var errs []error
		if err := hs.Shutdown(sctx); err != nil {
			_ = hs.Close()
			errs = append(errs, fmt.Errorf("shut down HTTP server: %w", err))
		}
		select {
		case <-stopped:
		case <-sctx.Done():
			gs.Stop()
			<-stopped
			errs = append(errs, errors.New("shut down gRPC server: timed out, open calls cut"))
		}
		return errors.Join(errs...)
	})
	err := g.Wait()
	if ctx.Err() != nil && err == nil {
		c.Log.Info("collector stopped", "results", c.Store.Len())
	}
	return err
}

// Run listens on grpcAddr and httpAddr and serves until ctx is done.
func (c *Collector) Run(ctx context.Context, grpcAddr, httpAddr string) error {
	gl, err := net.Listen("tcp", grpcAddr)
	if err != nil {
		return fmt.Errorf("listen on %s (gRPC): %w", grpcAddr, err)
	}
	hl, err := net.Listen("tcp", httpAddr)
	if err != nil {
		gl.Close()
		return fmt.Errorf("listen on %s (HTTP): %w", httpAddr, err)
	}
	c.Log.Info("collector serving", "grpc", gl.Addr().String(), "http", hl.Addr().String())
	return c.Serve(ctx, gl, hl)
}
