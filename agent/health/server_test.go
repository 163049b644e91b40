package health

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/metrics"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// start serves s on a loopback port and returns its base URL and a stop
// function that returns Serve's error.
func start(t *testing.T, s *Server) (string, func() error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	stopped := false
	var result error
	stop := func() error {
		if !stopped {
			cancel()
			result, stopped = <-done, true
		}
		return result
	}
	t.Cleanup(func() { _ = stop() })
	return "http://" + ln.Addr().String(), stop
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func TestEndpoints(t *testing.T) {
	t.Parallel()
	m := metrics.New()
	var ready Readiness
	base, stop := start(t, &Server{Gatherer: m.Registry(), Ready: ready.Check})

	if code, body := get(t, base+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz = %d %q, want 200 ok", code, body)
	}
	if code, body := get(t, base+"/readyz"); code != http.StatusServiceUnavailable ||
		body != "not ready: first pass not finished\n" {
		t.Errorf("/readyz before a pass = %d %q", code, body)
	}

	results := []pull.Result{
		{Image: "127.0.0.1:5000/a:1", Outcome: pull.OutcomePulled},
		{Image: "127.0.0.1:5000/x:missing", Outcome: pull.OutcomeFailed, Reason: pull.ReasonNotFound},
	}
	ready.SetResults(results)
	m.PassFinished(results, time.Second)
	if code, body := get(t, base+"/readyz"); code != http.StatusServiceUnavailable ||
		body != "not ready: 1 of 2 images missing: 127.0.0.1:5000/x:missing\n" {
		t.Errorf("/readyz with a missing image = %d %q", code, body)
	}

	results[1].Outcome = pull.OutcomePulled
	ready.SetResults(results)
	m.PassFinished(results, time.Second)
	if code, body := get(t, base+"/readyz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/readyz with every image present = %d %q", code, body)
	}

	code, body := get(t, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics = %d", code)
	}
	for _, want := range []string{
		"image_prefetcher_images_present 2\n",
		"image_prefetcher_images_missing 0\n",
		`image_prefetcher_passes_total{result="failed"} 1`,
		"go_goroutines ",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	resp, err := http.Post(base+"/healthz", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /healthz = %d, want 405", resp.StatusCode)
	}
	if code, _ := get(t, base+"/nothing"); code != http.StatusNotFound {
		t.Errorf("/nothing = %d, want 404", code)
	}

	if err := stop(); err != nil {
		t.Errorf("Serve after shutdown = %v, want nil", err)
	}
	if _, err := http.Get(base + "/healthz"); err == nil {
		t.Error("server still answers after shutdown")
	}
}

func TestNoReadinessCheckAndNoMetrics(t *testing.T) {
	t.Parallel()
	base, _ := start(t, &Server{})
	if code, body := get(t, base+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "no readiness check") {
		t.Errorf("/readyz without a check = %d %q", code, body)
	}
	if code, _ := get(t, base+"/metrics"); code != http.StatusNotFound {
		t.Errorf("/metrics without a gatherer = %d, want 404", code)
	}
}

func TestGracefulShutdownFinishesOpenRequests(t *testing.T) {
	t.Parallel()
	entered := make(chan struct{})
	release := make(chan struct{})
	var calls atomic.Int32
	base, stop := start(t, &Server{Ready: func() error {
		if calls.Add(1) == 1 {
			close(entered)
			<-release
		}
		return nil
	}})

	type answer struct {
		code int
		err  error
	}
	answers := make(chan answer, 1)
	go func() {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			answers <- answer{err: err}
			return
		}
		resp.Body.Close()
		answers <- answer{code: resp.StatusCode}
	}()
	<-entered
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	// Wait until shutdown has closed the listener, so that the open request
	// really spans the shutdown.
	addr := strings.TrimPrefix(base, "http://")
	for {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			break
		}
		conn.Close()
		time.Sleep(time.Millisecond)
	}
	close(release)
	a := <-answers
	if a.err != nil || a.code != http.StatusOK {
		t.Errorf("request open during shutdown: %d %v, want 200", a.code, a.err)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Serve = %v, want nil", err)
	}
}

func TestRun(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&Server{}).Run(ctx, "127.0.0.1:0") }()
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v, want nil after cancel", err)
	}

	// An address in use is an error naming it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	err = (&Server{}).Run(context.Background(), addr)
	if err == nil || !strings.Contains(err.Error(), addr) {
		t.Errorf("Run on a busy address = %v, want an error naming %s", err, addr)
	}
}

func TestReadiness(t *testing.T) {
	t.Parallel()
	var r Readiness
	if err := r.Check(); err == nil {
		t.Error("ready before the first pass")
	}
	r.SetResults(nil) // an empty list: nothing is missing
	if err := r.Check(); err != nil {
		t.Errorf("empty list: %v", err)
	}
	var results []pull.Result
	for i := range 5 {
		results = append(results, pull.Result{Image: fmt.Sprintf("img%d", i), Outcome: pull.OutcomeFailed})
	}
	results = append(results, pull.Result{Image: "ok", Outcome: pull.OutcomePresent})
	r.SetResults(results)
	if err := r.Check(); err == nil || err.Error() != "5 of 6 images missing: img0, img1, img2 and 2 more" {
		t.Errorf("Check = %v", err)
	}
	r.SetNotReady("new list started")
	if err := r.Check(); err == nil || err.Error() != "new list started" {
		t.Errorf("Check = %v", err)
	}
}

// Ready means the list is whole AND the node's label says so: every image
// present but the label write failed is not ready.
func TestReadinessNeedsTheLabelWritten(t *testing.T) {
	t.Parallel()
	var r Readiness
	all := []pull.Result{{Image: "a", Outcome: pull.OutcomePresent}, {Image: "b", Outcome: pull.OutcomePulled}}
	r.SetOutcome(all, errors.New("node node-1: label: connection refused"))
	err := r.Check()
	if err == nil || !strings.Contains(err.Error(), "node label not written") || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("Check = %v, want not ready naming the label write", err)
	}
	r.SetOutcome(append(all, pull.Result{Image: "c", Outcome: pull.OutcomeFailed}), errors.New("refused"))
	if err := r.Check(); err == nil || !strings.Contains(err.Error(), "1 of 3 images missing: c") || !strings.Contains(err.Error(), "label") {
		t.Errorf("Check = %v, want both reasons", err)
	}
	r.SetOutcome(all, nil)
	if err := r.Check(); err != nil {
		t.Errorf("whole list, label written: %v", err)
	}
}

// The other node writes (Node condition, startup taint) count like the label:
// not ready until they are done.
func TestReadinessNeedsTheNodeWrites(t *testing.T) {
	t.Parallel()
	var r Readiness
	all := []pull.Result{{Image: "a", Outcome: pull.OutcomePresent}}
	r.SetRecorded(all, nil, errors.New("remove startup taint: forbidden"))
	if err := r.Check(); err == nil || !strings.Contains(err.Error(), "node not updated") || !strings.Contains(err.Error(), "startup taint") {
		t.Errorf("Check = %v, want not ready naming the node write", err)
	}
	r.SetRecorded(all, nil, nil)
	if err := r.Check(); err != nil {
		t.Errorf("everything written: %v", err)
	}
}

// /readyz names the missing images only to a caller on loopback (the pod
// itself, kubectl port-forward); a caller from the pod network gets counts.
func TestReadyzNamesImagesOnlyOnLoopback(t *testing.T) {
	t.Parallel()
	var ready Readiness
	h := (&Server{Ready: ready.Check}).Handler()
	body := func(remote string) (int, string) {
		req := httptest.NewRequest(http.MethodGet, "/readyz", nil)
		req.RemoteAddr = remote
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec.Code, rec.Body.String()
	}
	const secret = "registry.corp.example/payments/ledger:7.1"
	results := []pull.Result{{Image: "a:1", Outcome: pull.OutcomePresent}, {Image: secret, Outcome: pull.OutcomeFailed}}
	ready.SetRecorded(results, errors.New("patch node: connection refused"), nil)

	for _, remote := range []string{"10.88.0.7:41234", "[fd00::7]:41234", "192.0.2.1:80"} {
		code, got := body(remote)
		if code != http.StatusServiceUnavailable || got != "not ready: 1 of 2 images missing; node label not written (retried within seconds)\n" {
			t.Errorf("/readyz from %s = %d %q, want the counts without names or errors", remote, code, got)
		}
	}
	for _, remote := range []string{"127.0.0.1:5555", "[::1]:5555"} {
		if code, got := body(remote); code != http.StatusServiceUnavailable || !strings.Contains(got, secret) || !strings.Contains(got, "connection refused") {
			t.Errorf("/readyz from %s = %d %q, want the names and the error", remote, code, got)
		}
	}

	// A reason without a public form (a pass in progress, an unreadable
	// list's path) says no more than that.
	ready.SetNotReady("3 of 9 images missing, pulling them: " + secret)
	if _, got := body("10.88.0.7:1"); got != "not ready\n" {
		t.Errorf("/readyz from the pod network = %q, want only \"not ready\"", got)
	}
}
