// Package health serves the agent's HTTP endpoints: /healthz (the process
// runs), /readyz (every image of the current list is present, which is what
// makes `kubectl rollout status` tell the truth) and /metrics (Prometheus).
package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// DefaultShutdownTimeout bounds the graceful shutdown of the server.
const DefaultShutdownTimeout = 5 * time.Second

// Server serves the endpoints.
type Server struct {
	// Gatherer is exposed on /metrics; nil leaves /metrics out.
	Gatherer prometheus.Gatherer
	// Ready returns nil when every image of the current list is present, or
	// a short reason why not. Nil means never ready.
	Ready func() error
	// ShutdownTimeout bounds the wait for open requests on shutdown.
	// Default DefaultShutdownTimeout.
	ShutdownTimeout time.Duration
}

// Handler routes the endpoints.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		err := errors.New("no readiness check")
		if s.Ready != nil {
			err = s.Ready()
		}
		if err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, notReadyBody(err, r.RemoteAddr))
			return
		}
		fmt.Fprintln(w, "ok")
	})
	if s.Gatherer != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(s.Gatherer, promhttp.HandlerOpts{
			// A failing collector should not hide all the others.
			ErrorHandling: promhttp.ContinueOnError,
		}))
	}
	return mux
}

// Run listens on addr (host:port; ":0" picks a free port) and serves until
// ctx is done, then shuts down gracefully.
func (s *Server) Run(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	return s.Serve(ctx, ln)
}

// Serve serves on ln until ctx is done, then shuts down gracefully. It
// returns nil after a shutdown requested through ctx, and closes ln.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		// Only the requests' own lifetime matters: the kubelet's probes and a
		// Prometheus scrape are short.
		WriteTimeout: 30 * time.Second,
		IdleTimeout:  90 * time.Second,
		BaseContext:  func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	timeout := s.ShutdownTimeout
	if timeout <= 0 {
		timeout = DefaultShutdownTimeout
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if serr := <-served; serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		return fmt.Errorf("serve on %s: %w", ln.Addr(), serr)
	}
	if err != nil {
		_ = srv.Close()
		return fmt.Errorf("shut down server on %s: %w", ln.Addr(), err)
	}
	return nil
}

// notReadyBody is the /readyz answer when not ready. The reason names the
// missing images, so only a caller on loopback gets it (kubectl
// port-forward arrives there, and needs pods/portforward on the agent's
// pod); anyone else on the pod network gets the counts, or nothing more
// than "not ready" for reasons without a public form. The kubelet only
// looks at the status code.
func notReadyBody(err error, remoteAddr string) string {
	host, _, _ := net.SplitHostPort(remoteAddr)
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return "not ready: " + err.Error()
	}
	var p interface{ Public() string }
	if errors.As(err, &p) {
		return "not ready: " + p.Public()
	}
	return "not ready"
}
