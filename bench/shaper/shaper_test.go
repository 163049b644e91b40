package shaper

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// echo starts a TCP server that echoes every connection.
func echo(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

func start(t *testing.T, cfg Config) *Proxy {
	t.Helper()
	p, err := Listen("127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if string(buf) != msg {
		t.Fatalf("echo = %q, want %q", buf, msg)
	}
}

// The delay applies in both directions: a round trip takes at least twice
// it (a lower bound only: sleeping never ends early).
func TestDelayAddsToEveryRoundTrip(t *testing.T) {
	const delay = 30 * time.Millisecond
	p := start(t, Config{Upstream: echo(t), Delay: delay})
	c := dial(t, p.Addr())
	for i := range 3 {
		begin := time.Now()
		roundTrip(t, c, fmt.Sprintf("ping %d", i))
		if rtt := time.Since(begin); rtt < 2*delay {
			t.Fatalf("round trip %d took %s, less than 2 x %s", i, rtt, delay)
		}
	}
}

// The cap holds: 512 KiB at 8 Mbit/s (1 MB/s) cannot arrive in much under
// half a second (the burst allowance is a few milliseconds).
func TestBandwidthCap(t *testing.T) {
	p := start(t, Config{Upstream: echo(t), BitsPerSecond: 8_000_000})
	c := dial(t, p.Addr())
	const n = 512 << 10
	begin := time.Now()
	go func() { c.Write(make([]byte, n)) }()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(begin); took < 400*time.Millisecond {
		t.Fatalf("512 KiB at 1 MB/s took %s", took)
	}
	// The proxy counts a chunk after writing it: the client may read it first.
	deadline := time.Now().Add(10 * time.Second)
	for s := p.Stats(); s.BytesUp != n || s.BytesDown != n; s = p.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v, want %d bytes each way", s, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A connection made during the stall is accepted but never answered, even
// after the stall window; a connection made after it is forwarded; a
// connection open when the stall began is dropped.
func TestStall(t *testing.T) {
	p := start(t, Config{Upstream: echo(t)})
	before := dial(t, p.Addr())
	roundTrip(t, before, "before")

	p.StallFor(300 * time.Millisecond)
	before.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := before.Read(make([]byte, 1)); err == nil {
		t.Fatal("a connection open when the stall began still works")
	}

	held := dial(t, p.Addr())
	if _, err := io.WriteString(held, "hello"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond) // past the window
	held.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := held.Read(make([]byte, 8)); err == nil || n > 0 {
		t.Fatalf("held connection answered (%d bytes, %v)", n, err)
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("held connection: %v, want a read timeout", err)
	}

	after := dial(t, p.Addr())
	roundTrip(t, after, "after")
	s := p.Stats()
	if s.Stalled != 1 || s.Conns != 2 {
		t.Fatalf("stats %+v, want 1 stalled and 2 forwarded", s)
	}

	// Close ends held connections too.
	p.Close()
	held.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := held.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("held connection after Close: %v, want EOF", err)
	}
}

// Requests are counted by their header blocks, also when a header is split
// across writes and when a connection is kept alive.
func TestCountsRequests(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	defer srv.Close()
	p := start(t, Config{Upstream: strings.TrimPrefix(srv.URL, "http://"), Delay: time.Millisecond})
	client := &http.Client{Timeout: 20 * time.Second}
	for range 3 {
		resp, err := client.Get("http://" + p.Addr() + "/v2/")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	c := dial(t, p.Addr())
	io.WriteString(c, "HEAD /v2/ HTTP/1.1\r\nHost: x\r\n\r")
	time.Sleep(20 * time.Millisecond)
	io.WriteString(c, "\n")
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil {
		t.Fatal(err)
	}
	if s := p.Stats(); s.Requests != 4 {
		t.Fatalf("stats %+v, want 4 requests", s)
	}
	p.ResetStats()
	if s := p.Stats(); s != (Stats{}) {
		t.Fatalf("after reset: %+v", s)
	}
}

func TestListenRejectsBadConfig(t *testing.T) {
	for _, cfg := range []Config{{}, {Upstream: "x:1", Delay: -1}, {Upstream: "x:1", BitsPerSecond: -1}} {
		if p, err := Listen("127.0.0.1:0", cfg); err == nil {
			p.Close()
			t.Errorf("Listen(%+v) accepted", cfg)
		}
	}
}

// HoldAfter: the first connection to pass n bytes gets exactly n and then
// silence (not a close), once; a new connection gets everything.
func TestHoldAfterStopsOneConnectionMidTransfer(t *testing.T) {
	body := strings.Repeat("x", 1<<20)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	p := start(t, Config{Upstream: strings.TrimPrefix(srv.URL, "http://")})
	const n = 100 << 10
	p.HoldAfter(n)

	get := func() (int, error) {
		c := dial(t, p.Addr())
		c.SetDeadline(time.Now().Add(500 * time.Millisecond))
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		b, err := io.ReadAll(c)
		return len(b), err
	}
	got, err := get()
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("held connection: read %d bytes, err %v; want a timeout (silence, not a close)", got, err)
	}
	if got != n {
		t.Errorf("held connection got %d bytes, want exactly %d", got, n)
	}
	got, err = get()
	if err != nil || got < len(body) {
		t.Errorf("next connection got %d bytes (err %v), want the whole answer", got, err)
	}
	if st := p.Stats(); st.Held != 1 || st.Conns != 2 {
		t.Errorf("stats %+v, want 1 held of 2 forwarded", st)
	}
}
