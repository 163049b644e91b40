// Package collectortest serves a results collector on loopback for tests of
// the collector and of the agents that send to it.
package collectortest

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
)

// Running is a collector serving on loopback until Stop or the test's end.
type Running struct {
	// GRPC is the address the agents send to; HTTP the base URL of the
	// read API (http://host:port).
	GRPC, HTTP string

	cancel context.CancelFunc
	done   chan error
}

// Start serves c with its gRPC server on grpcAddr ("127.0.0.1:0" for any
// port; the address of a stopped collector to restart it there) and its HTTP
// server on a free loopback port.
func Start(t testing.TB, c *collector.Collector, grpcAddr string) *Running {
	t.Helper()
	var gl net.Listener
	var err error
	// A restarted collector takes the same port back; a moment may pass
	// before the old socket is gone.
	for i := 0; ; i++ {
		if gl, err = net.Listen("tcp", grpcAddr); err == nil || i == 100 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Running{GRPC: gl.Addr().String(), HTTP: "http://" + hl.Addr().String(), cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- c.Serve(ctx, gl, hl) }()
	t.Cleanup(func() { r.Stop(t) })
	return r
}

// Stop shuts the collector down and fails the test if it stopped with an
// error. Stopping twice is a no-op.
func (r *Running) Stop(t testing.TB) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	if err := <-r.done; err != nil {
		t.Errorf("collector stopped with %v", err)
	}
}
