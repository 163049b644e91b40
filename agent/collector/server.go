package collector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

// MaxBatch bounds the results of one Submit call.
const MaxBatch = 10000

// MaxMessageBytes bounds a Submit request on the wire, and so what one call
// can make the collector decode, whoever sends it (the message is decoded
// before its token is checked). An agent's largest batch, 100 attempts with
// every field at the length the sender allows, is 296 KiB
// (TestLargestBatchFitsTheCollectorsLimit in agent/sender measures it); the
// sender also splits batches to stay under this bound.
const MaxMessageBytes = 512 << 10

// maxStreamsPerConn bounds the calls one connection has open at once.
const maxStreamsPerConn = 4

// Pages of GET /metrics.
const (
	DefaultPageSize = 1000
	MaxPageSize     = 10000
	// ContinueHeader carries the token of the next page; absent on the last.
	ContinueHeader = "X-Continue"
)

// DefaultShutdownTimeout bounds the graceful shutdown of both servers.
const DefaultShutdownTimeout = 10 * time.Second

// Collector serves the Results gRPC service and the HTTP endpoints over one
// Store.
type Collector struct {
	resultsv1.UnimplementedResultsServer

	Store *Store
	Log   *slog.Logger
	// Auth checks the token of every Submit call; the records of an
	// accepted call are stamped with the token's node. Nil accepts anyone
	// (tests); the collect command always sets it.
	Auth Authenticator
	// ShutdownTimeout bounds the graceful shutdown. Default
	// DefaultShutdownTimeout.
	ShutdownTimeout time.Duration

	registry   *prometheus.Registry
	received   prometheus.Counter
	duplicates prometheus.Counter
	dropped    *prometheus.CounterVec
	refused    *prometheus.CounterVec
	stored     prometheus.GaugeFunc
	bytes      prometheus.GaugeFunc
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
		Name: "results_dropped_total", Help: "Results not kept: evicted (the oldest, when a bound of the store is reached) or invalid (no attempt id)."},
		[]string{"reason"})
	c.refused = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
		Name: "submits_refused_total", Help: "Submit calls refused: unauthenticated (no valid token of the collector's audience), forbidden (not this instance's agent, or a record of another node than the token's) or unavailable (the token could not be reviewed)."},
		[]string{"reason"})
	c.stored = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub,
		Name: "results_stored", Help: "Results held in memory."}, func() float64 { return float64(store.Len()) })
	c.bytes = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub,
		Name: "results_stored_bytes", Help: "Accounted size of the results held (wire size plus a fixed overhead each)."}, func() float64 { return float64(store.Bytes()) })
	for _, r := range []string{"evicted", "invalid"} {
		c.dropped.WithLabelValues(r)
	}
	for _, r := range []string{"unauthenticated", "forbidden", "unavailable"} {
		c.refused.WithLabelValues(r)
	}
	c.registry.MustRegister(c.received, c.duplicates, c.dropped, c.refused, c.stored, c.bytes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return c
}

// Registry is the collector's own Prometheus registry.
func (c *Collector) Registry() *prometheus.Registry { return c.registry }

// Submit stores a batch and acknowledges the ids it holds.
func (c *Collector) Submit(ctx context.Context, req *resultsv1.SubmitRequest) (*resultsv1.SubmitResponse, error) {
	if err := c.authorize(ctx, req.GetResults()); err != nil {
		return nil, err
	}
	if n := len(req.GetResults()); n > MaxBatch {
		return nil, status.Errorf(codes.InvalidArgument, "batch of %d results; at most %d", n, MaxBatch)
	}
	st := c.Store.Add(req.GetResults())
	c.received.Add(float64(len(req.GetResults())))
	c.duplicates.Add(float64(st.Duplicates))
	c.dropped.WithLabelValues("evicted").Add(float64(st.Evicted))
	c.dropped.WithLabelValues("invalid").Add(float64(st.Invalid))
	if st.Evicted > 0 {
		lim := c.Store.Limits()
		c.Log.Warn("result store full, oldest results dropped", "dropped", st.Evicted,
			"maxResults", lim.MaxResults, "maxBytes", lim.MaxBytes, "maxNodeBytes", lim.MaxNodeBytes)
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

// authorize checks the call's bearer token with c.Auth and stamps results
// with the token's node. A record naming another node refuses the whole
// call: an agent reports only its own node, so such a batch is forged.
func (c *Collector) authorize(ctx context.Context, results []*resultsv1.Result) error {
	if c.Auth == nil {
		return nil
	}
	var token string
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("authorization"); len(v) == 1 {
		token, _ = strings.CutPrefix(v[0], "Bearer ")
	}
	from := "unknown"
	if p, ok := peer.FromContext(ctx); ok {
		from = p.Addr.String()
	}
	id, err := c.Auth.Authenticate(ctx, token)
	switch {
	case errors.Is(err, ErrUnauthenticated):
		return c.refuse("unauthenticated", codes.Unauthenticated, from, err)
	case errors.Is(err, ErrForbidden):
		return c.refuse("forbidden", codes.PermissionDenied, from, err)
	case err != nil:
		return c.refuse("unavailable", codes.Unavailable, from, err)
	}
	for _, r := range results {
		if n := r.GetNode(); n != "" && n != id.Node {
			return c.refuse("forbidden", codes.PermissionDenied, from,
				fmt.Errorf("attempt %q names node %q; the token is of node %q", r.GetAttemptId(), n, id.Node))
		}
	}
	for _, r := range results {
		r.Node = id.Node
	}
	return nil
}

func (c *Collector) refuse(reason string, code codes.Code, from string, err error) error {
	c.refused.WithLabelValues(reason).Inc()
	c.Log.Warn("submit refused", "from", from, "reason", reason, "error", err.Error())
	return status.Errorf(code, "submit refused: %v", err)
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

// pageOf reads ?limit= (default DefaultPageSize, at most MaxPageSize) and
// ?continue= (the ContinueHeader of the previous page).
func pageOf(r *http.Request) (after uint64, limit int, err error) {
	q := r.URL.Query()
	limit = DefaultPageSize
	if v := q.Get("limit"); v != "" {
		if limit, err = strconv.Atoi(v); err != nil || limit <= 0 || limit > MaxPageSize {
			return 0, 0, fmt.Errorf("limit=%q: want 1 to %d", v, MaxPageSize)
		}
	}
	if v := q.Get("continue"); v != "" {
		if after, err = strconv.ParseUint(v, 10, 64); err != nil {
			return 0, 0, fmt.Errorf("continue=%q: not a token of %s", v, ContinueHeader)
		}
	}
	return after, limit, nil
}

func filterOf(r *http.Request) Filter {
	q := r.URL.Query()
	return Filter{Node: q.Get("node"), Image: q.Get("image"), Instance: q.Get("instance")}
}

// Handler serves GET /metrics (a page of the results as a JSON array, the
// next page's token in ContinueHeader), GET /summary,
// GET /prometheus (the collector's own metrics) and GET /healthz.
func (c *Collector) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		after, limit, err := pageOf(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		results, next := c.Store.Page(filterOf(r), after, limit)
		out := make([]JSONResult, len(results))
		for i, res := range results {
			out[i] = toJSON(res)
		}
		if next != 0 {
			w.Header().Set(ContinueHeader, strconv.FormatUint(next, 10))
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
	// An agent makes one call at a time; each open stream may hold a decoded
	// message before its token is checked.
	gs := grpc.NewServer(grpc.MaxRecvMsgSize(MaxMessageBytes), grpc.MaxConcurrentStreams(maxStreamsPerConn))
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
