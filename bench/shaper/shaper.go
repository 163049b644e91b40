// Package shaper is a loopback TCP proxy that shapes the traffic to a
// registry the way a real network would: a one-way delay in each direction
// (without cutting throughput, like netem), a bandwidth cap shared by all
// connections (one link), and a stall mode in which new connections are
// accepted but never answered, and a mid-transfer hold in which one
// connection stops forwarding after its first bytes while others go on. This
// kernel has no netem, and on bare loopback
// containerd's CPU is the only limit, so concurrency choices only show behind
// such a proxy. It also counts what passes (connections, HTTP requests,
// bytes), so a benchmark can prove that a warm pass never reached the
// registry.
package shaper

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Config shapes a Proxy.
type Config struct {
	// Upstream is the host:port everything is forwarded to.
	Upstream string
	// Delay is added to every chunk in each direction: the round trip grows
	// by 2*Delay.
	Delay time.Duration
	// BitsPerSecond caps each direction, shared by all connections (one
	// link); 0 means no cap.
	BitsPerSecond int64
}

// Stats counts what the proxy saw since it started or since ResetStats.
type Stats struct {
	Conns     int64 // connections accepted and forwarded
	Stalled   int64 // connections accepted and held without an answer
	Held      int64 // connections held after their first bytes (HoldAfter)
	Requests  int64 // HTTP request headers seen going upstream
	BytesUp   int64 // client to upstream
	BytesDown int64 // upstream to client
}

// Proxy forwards connections on a loopback port to Config.Upstream.
type Proxy struct {
	cfg  Config
	ln   net.Listener
	up   *link
	down *link

	conns, stalled, held, requests, bytesUp, bytesDown atomic.Int64
	// holdAfter arms HoldAfter: the byte count after which the next
	// connection is held; 0 when disarmed.
	holdAfter atomic.Int64

	mu         sync.Mutex
	stallUntil time.Time
	open       map[net.Conn]struct{} // every accepted and dialled connection
	closed     bool
	wg         sync.WaitGroup
}

// Listen starts a proxy on addr ("127.0.0.1:0" picks a free port).
func Listen(addr string, cfg Config) (*Proxy, error) {
	if cfg.Upstream == "" {
		return nil, errors.New("shaper: no upstream")
	}
	if cfg.Delay < 0 || cfg.BitsPerSecond < 0 {
		return nil, fmt.Errorf("shaper: negative delay (%s) or rate (%d)", cfg.Delay, cfg.BitsPerSecond)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("shaper: listen %s: %w", addr, err)
	}
	p := &Proxy{cfg: cfg, ln: ln, open: map[net.Conn]struct{}{},
		up: newLink(cfg.BitsPerSecond), down: newLink(cfg.BitsPerSecond)}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's host:port, usable as a registry name.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// StallFor makes the registry look hung: every connection open now is
// dropped (so clients cannot keep using a kept-alive one), and every
// connection accepted during the next d is held open and never answered,
// also after d has passed, like a connection whose peer went silent. Only
// connections made after d are forwarded again.
func (p *Proxy) StallFor(d time.Duration) {
	p.mu.Lock()
	p.stallUntil = time.Now().Add(d)
	conns := make([]net.Conn, 0, len(p.open))
	for c := range p.open {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// HoldAfter makes the registry hang in the middle of a transfer: the first
// connection, open now or later, whose answers pass n bytes gets exactly its
// first n and then nothing more, and stays open for as long as the client
// keeps it, like a peer gone silent mid-blob. It happens once per call; every
// other connection is forwarded as usual. n = 0 disarms it.
func (p *Proxy) HoldAfter(n int64) { p.holdAfter.Store(max(n, 0)) }

// Stats returns the counters.
func (p *Proxy) Stats() Stats {
	return Stats{Conns: p.conns.Load(), Stalled: p.stalled.Load(), Held: p.held.Load(), Requests: p.requests.Load(),
		BytesUp: p.bytesUp.Load(), BytesDown: p.bytesDown.Load()}
}

// ResetStats sets the counters to zero.
func (p *Proxy) ResetStats() {
	for _, c := range []*atomic.Int64{&p.conns, &p.stalled, &p.held, &p.requests, &p.bytesUp, &p.bytesDown} {
		c.Store(0)
	}
}

// Close stops accepting, closes every connection (held ones included) and
// waits for the proxy's goroutines.
func (p *Proxy) Close() error {
	err := p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for c := range p.open {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

// track registers c as open; false when the proxy is closing.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.open[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.open, c)
	p.mu.Unlock()
	c.Close()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			c.Close()
			return
		}
		p.mu.Lock()
		stall := time.Now().Before(p.stallUntil)
		p.mu.Unlock()
		p.wg.Add(1)
		if stall {
			p.stalled.Add(1)
			go p.hold(c)
		} else {
			p.conns.Add(1)
			go p.forward(c)
		}
	}
}

// hold reads and drops whatever the client sends and never answers, until
// the client or Close ends the connection.
func (p *Proxy) hold(c net.Conn) {
	defer p.wg.Done()
	defer p.untrack(c)
	io.Copy(io.Discard, c) //nolint:errcheck // ends when either side closes
}

func (p *Proxy) forward(c net.Conn) {
	defer p.wg.Done()
	defer p.untrack(c)
	u, err := net.DialTimeout("tcp", p.cfg.Upstream, 10*time.Second)
	if err != nil {
		return
	}
	if !p.track(u) {
		u.Close()
		return
	}
	defer p.untrack(u)
	done := make(chan struct{})
	go func() {
		p.pipe(u, c, p.up, &p.bytesUp, true, nil)
		close(done)
	}()
	p.pipe(c, u, p.down, &p.bytesDown, false, done)
	<-done
}

// chunk is data read at one moment, due for writing Delay later.
type chunk struct {
	data []byte
	due  time.Time
}

// pipe copies src to dst through the delay line and the link's cap. A
// reader goroutine stamps chunks as they arrive, so the delay adds latency
// without limiting throughput (the queue holds up to 1 MiB in flight).
// clientGone is set on the direction towards the client (answers), which
// HoldAfter may hold: it is closed when the client's side has ended.
func (p *Proxy) pipe(dst, src net.Conn, l *link, counter *atomic.Int64, countRequests bool, clientGone <-chan struct{}) {
	const size = 32 << 10
	queue := make(chan chunk, 32)
	go func() {
		defer close(queue)
		for {
			buf := make([]byte, size)
			n, err := src.Read(buf)
			if n > 0 {
				queue <- chunk{data: buf[:n], due: time.Now().Add(p.cfg.Delay)}
			}
			if err != nil {
				return
			}
		}
	}()
	var tail []byte // the end of the previous chunk, for headers split across reads
	broken, held := false, false
	var sent int64
	for ch := range queue {
		if broken || held {
			continue // drain, so the reader ends
		}
		if clientGone != nil {
			if n := p.holdAfter.Load(); n > 0 && sent+int64(len(ch.data)) >= n && p.holdAfter.CompareAndSwap(n, 0) {
				held = true
				p.held.Add(1)
				ch.data = ch.data[:n-sent]
			}
		}
		if d := time.Until(ch.due); d > 0 {
			time.Sleep(d)
		}
		l.wait(len(ch.data))
		if countRequests {
			joined := append(tail, ch.data...)
			p.requests.Add(int64(bytes.Count(joined, []byte("\r\n\r\n"))))
			tail = append(tail[:0], joined[max(0, len(joined)-3):]...)
		}
		if _, err := dst.Write(ch.data); err != nil {
			broken = true
			src.Close()
			continue
		}
		sent += int64(len(ch.data))
		counter.Add(int64(len(ch.data)))
	}
	if held {
		// Silent, not closed: the client learns nothing until it gives up.
		<-clientGone
		dst.Close()
		return
	}
	// Half close: the other direction may still carry an answer.
	if tc, ok := dst.(*net.TCPConn); ok && !broken {
		tc.CloseWrite() //nolint:errcheck // the peer may be gone already
	} else {
		dst.Close()
	}
}

// link is a bandwidth cap shared by connections: a virtual clock of when the
// link is free again. A small burst lets short idle gaps be used.
type link struct {
	bytesPerSec float64
	mu          sync.Mutex
	free        time.Time
}

const burst = 5 * time.Millisecond

func newLink(bitsPerSec int64) *link {
	return &link{bytesPerSec: float64(bitsPerSec) / 8}
}

// wait blocks until n bytes may be sent.
func (l *link) wait(n int) {
	if l.bytesPerSec <= 0 {
		return
	}
	now := time.Now()
	l.mu.Lock()
	start := l.free
	if earliest := now.Add(-burst); start.Before(earliest) {
		start = earliest
	}
	l.free = start.Add(time.Duration(float64(n) / l.bytesPerSec * float64(time.Second)))
	until := l.free
	l.mu.Unlock()
	if d := until.Sub(now); d > 0 {
		time.Sleep(d)
	}
}
