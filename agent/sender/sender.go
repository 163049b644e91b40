// Package sender delivers every pull attempt to the results collector over
// gRPC. It is a pull.Observer that never blocks the pull engine: attempts go
// into a bounded in-memory queue (the oldest is dropped, counted and logged
// when it is full) and a background loop sends them in batches, retrying with
// backoff while the collector is unavailable. Close flushes what is queued
// within a deadline of its own.
package sender

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

// Defaults of Config.
const (
	DefaultBufferSize     = 10000
	DefaultBatchSize      = 100
	DefaultInitialBackoff = 200 * time.Millisecond
	DefaultMaxBackoff     = 10 * time.Second
	DefaultRPCTimeout     = 10 * time.Second
)

// Config configures a Sender.
type Config struct {
	// Address is the collector's gRPC address (host:port).
	Address string
	// Node and Instance are stamped on every result.
	Node     string
	Instance string
	// BufferSize bounds the queued results; when full, the oldest is dropped.
	BufferSize int
	// BatchSize bounds the results of one Submit call.
	BatchSize int
	// InitialBackoff and MaxBackoff bound the wait between failed sends: it
	// doubles from InitialBackoff up to MaxBackoff, plus up to 20% jitter.
	// gRPC's reconnects follow the same schedule.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
	// RPCTimeout bounds one Submit call.
	RPCTimeout time.Duration
	Log        *slog.Logger
	// TokenFile, when set, is the projected ServiceAccount token the
	// collector authenticates the agent with. It is read again for every
	// call, so the token the kubelet rotates into the file is used as soon
	// as it is there.
	TokenFile string
	// DialOptions are added to the defaults (insecure transport, a reconnect
	// backoff bounded by MaxBackoff).
	DialOptions []grpc.DialOption
}

// Bounds of a result's free-text fields: with them an agent's largest batch
// stays well inside collector.MaxMessageBytes. An image reference is at most
// about 530 bytes (255 of name, 128 of tag, a sha512 digest); the runtime's
// error text is cut.
const (
	maxImageBytes = 1024
	maxRefBytes   = 512
	maxErrorBytes = 1024
)

// maxBatchBytes bounds the encoded size of one Submit request: a batch is
// cut short before it would reach the collector's limit, whatever its
// records hold.
const maxBatchBytes = collector.MaxMessageBytes - 4<<10

// backoff is the schedule of retries after failed sends (and of gRPC's
// reconnects). The jitter keeps the agents of a cluster from retrying in step
// after a collector restart.
func (c *Config) backoff() wait.Backoff {
	return wait.Backoff{Duration: c.InitialBackoff, Factor: 2, Jitter: 0.2, Steps: math.MaxInt32, Cap: c.MaxBackoff}
}

func (c *Config) setDefaults() {
	if c.BufferSize <= 0 {
		c.BufferSize = DefaultBufferSize
	}
	if c.BatchSize <= 0 {
		c.BatchSize = DefaultBatchSize
	}
	if c.InitialBackoff <= 0 {
		c.InitialBackoff = DefaultInitialBackoff
	}
	if c.MaxBackoff <= 0 {
		c.MaxBackoff = DefaultMaxBackoff
	}
	if c.MaxBackoff < c.InitialBackoff {
		c.MaxBackoff = c.InitialBackoff
	}
	if c.RPCTimeout <= 0 {
		c.RPCTimeout = DefaultRPCTimeout
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// submitter is the part of the generated client the sender uses; tests
// replace it.
type submitter interface {
	Submit(ctx context.Context, in *resultsv1.SubmitRequest, opts ...grpc.CallOption) (*resultsv1.SubmitResponse, error)
}

// Stats are the sender's counters.
type Stats struct {
	Queued    int    // waiting or in flight now
	Delivered uint64 // acknowledged by the collector
	Dropped   uint64 // dropped because the buffer was full
	Failures  uint64 // failed Submit calls
}

// Sender is a pull.Observer that sends attempts to the collector.
type Sender struct {
	cfg    Config
	client submitter
	conn   *grpc.ClientConn

	mu       sync.Mutex
	queue    []*resultsv1.Result // oldest first, not in flight
	inflight int                 // results taken by the loop and not yet settled
	stats    Stats
	closed   bool
	idle     chan struct{} // closed and replaced when queue and inflight are empty

	wake chan struct{} // buffered(1): something was queued
	stop chan struct{} // closed by Close: the loop ends after the flush
	done chan struct{} // closed when the loop has ended
	// flushCtx is the context of the final flush; set before stop is closed.
	flushCtx context.Context
	// sendCtx is the context of Submit calls; cancelSend ends it when the
	// flush deadline passes, cutting a call in progress short.
	sendCtx    context.Context
	cancelSend context.CancelFunc
}

var _ pull.Observer = (*Sender)(nil)

// New creates a Sender connected (lazily) to cfg.Address and starts its
// background loop. Call Close to flush and stop it.
func New(cfg Config) (*Sender, error) {
	if cfg.Address == "" {
		return nil, errors.New("collector address is empty")
	}
	cfg.setDefaults()
	b := cfg.backoff()
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// gRPC's own reconnect backoff grows to two minutes; a collector
		// that restarts should be found again within our own bound.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: b.Duration, Multiplier: b.Factor, Jitter: b.Jitter, MaxDelay: b.Cap},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
	if cfg.TokenFile != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(tokenFile(cfg.TokenFile)))
	}
	opts = append(opts, cfg.DialOptions...)
	conn, err := grpc.NewClient(cfg.Address, opts...)
	if err != nil {
		return nil, fmt.Errorf("results collector client for %s: %w", cfg.Address, err)
	}
	s := newSender(cfg, resultsv1.NewResultsClient(conn))
	s.conn = conn
	return s, nil
}

// newSender starts a sender over client; cfg must have its defaults set.
func newSender(cfg Config, client submitter) *Sender {
	s := &Sender{
		cfg:    cfg,
		client: client,
		idle:   make(chan struct{}),
		wake:   make(chan struct{}, 1),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	close(s.idle) // nothing queued yet
	s.sendCtx, s.cancelSend = context.WithCancel(context.Background())
	go s.loop()
	return s
}

// AttemptFinished queues the attempt. It never blocks on the network.
func (s *Sender) AttemptFinished(a pull.Attempt) {
	s.Enqueue(s.result(a))
}

// ImageFinished is not sent: the collector holds attempts, and an image's
// result is the last of its attempts. An image that needed no pull (already
// present) has no attempt.
func (s *Sender) ImageFinished(pull.Result) {}

func (s *Sender) result(a pull.Attempt) *resultsv1.Result {
	r := &resultsv1.Result{
		AttemptId:         uuid.NewString(),
		Instance:          s.cfg.Instance,
		Node:              s.cfg.Node,
		Image:             truncate(a.Image, maxImageBytes),
		ImageRef:          truncate(a.ImageRef, maxRefBytes),
		StartedAt:         a.Start.Unix(),
		StartedAtUnixNano: a.Start.UnixNano(),
		DurationMs:        uint64(max(a.Duration, 0).Milliseconds()),
		SizeBytes:         a.Size,
		Attempt:           uint32(max(a.Number, 0)),
		Outcome:           resultsv1.Outcome_OUTCOME_SUCCEEDED,
		TimeoutMs:         uint64(max(a.Timeout, 0).Milliseconds()),
		FetchedBytes:      uint64(max(a.Bytes.Fetched, 0)),
		ResumedBytes:      uint64(max(a.Bytes.Resumed, 0)),
		TotalBytes:        uint64(max(a.Bytes.Total, 0)),
	}
	if a.Err != nil {
		r.Outcome = resultsv1.Outcome_OUTCOME_FAILED
		r.Error = truncate(a.Err.Error(), maxErrorBytes)
		r.Reason = string(a.Reason)
		if r.Reason == "" {
			r.Reason = string(pull.ReasonUnknown)
		}
	}
	return r
}

// Enqueue queues r for sending. When the buffer is full the oldest queued
// result is dropped: the newest attempts say most about the node's state.
// After Close, results are dropped.
func (s *Sender) Enqueue(r *resultsv1.Result) {
	s.mu.Lock()
	if s.closed {
		s.stats.Dropped++
		s.mu.Unlock()
		s.cfg.Log.Warn("results collector: attempt after shutdown not sent", "image", r.GetImage())
		return
	}
	if len(s.queue) == 0 && s.inflight == 0 {
		s.idle = make(chan struct{})
	}
	s.queue = append(s.queue, r)
	dropped := s.trimLocked()
	s.mu.Unlock()
	s.logDropped(dropped)
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// trimLocked drops the oldest queued results beyond the buffer size. In
// flight results count against the size too.
func (s *Sender) trimLocked() []*resultsv1.Result {
	over := len(s.queue) + s.inflight - s.cfg.BufferSize
	if over <= 0 {
		return nil
	}
	over = min(over, len(s.queue))
	dropped := append([]*resultsv1.Result(nil), s.queue[:over]...)
	s.queue = append(s.queue[:0:0], s.queue[over:]...)
	s.stats.Dropped += uint64(len(dropped))
	return dropped
}

func (s *Sender) logDropped(dropped []*resultsv1.Result) {
	for _, r := range dropped {
		s.cfg.Log.Warn("results collector: buffer full, oldest attempt dropped",
			"image", r.GetImage(), "attemptID", r.GetAttemptId(), "buffer", s.cfg.BufferSize)
	}
}

// Stats returns the counters.
func (s *Sender) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.Queued = len(s.queue) + s.inflight
	return st
}

// Flush waits until everything queued so far is delivered or dropped, or ctx
// is done.
func (s *Sender) Flush(ctx context.Context) error {
	s.mu.Lock()
	idle := s.idle
	s.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("results collector: %d attempts not delivered: %w", s.Stats().Queued, context.Cause(ctx))
	}
}

// Close stops accepting results, keeps sending what is queued until it is
// delivered or ctx is done, then closes the connection. It returns an error
// naming the number of attempts that were not delivered.
func (s *Sender) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.done
		return nil
	}
	s.closed = true
	s.flushCtx = ctx
	s.mu.Unlock()
	stopCancel := context.AfterFunc(ctx, s.cancelSend)
	close(s.stop)
	<-s.done
	stopCancel()
	s.cancelSend()
	var err error
	if st := s.Stats(); st.Queued > 0 {
		err = fmt.Errorf("results collector %s: %d attempts not delivered before the flush deadline", s.cfg.Address, st.Queued)
	}
	if s.conn != nil {
		if cerr := s.conn.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close results collector connection: %w", cerr)
		}
	}
	return err
}

// loop sends batches until Close, then flushes until the queue is empty or
// the flush context is done.
func (s *Sender) loop() {
	defer close(s.done)
	ctx := s.sendCtx
	stop := s.stop // nil once Close was seen
	var flushDone <-chan struct{}
	onStop := func() {
		stop = nil
		flushDone = s.flushCtx.Done()
	}
	retry := s.cfg.backoff()
	var delay time.Duration
	for {
		if delay > 0 {
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-stop:
				// Shutting down: retry at once, within the flush deadline.
				t.Stop()
				onStop()
			case <-flushDone:
				t.Stop()
				return
			}
		}
		if flushDone != nil {
			select {
			case <-flushDone:
				return
			default:
			}
		}
		batch := s.take()
		if batch == nil {
			if stop == nil {
				return // flushed
			}
			select {
			case <-s.wake:
			case <-stop:
				onStop()
			}
			continue
		}
		if err := s.send(ctx, batch); err != nil {
			delay = retry.Step()
			s.cfg.Log.Warn("results collector unavailable, will retry", "address", s.cfg.Address,
				"queued", s.Stats().Queued, "retryIn", delay.Round(time.Millisecond), "error", err.Error())
			continue
		}
		retry, delay = s.cfg.backoff(), 0
	}
}

// take moves up to BatchSize results, and at most maxBatchBytes of them,
// from the queue into flight.
func (s *Sender) take() []*resultsv1.Result {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, size := 0, 0
	for n < min(len(s.queue), s.cfg.BatchSize) {
		// A repeated field's element: its tag, length and body.
		rs := proto.Size(s.queue[n])
		size += 1 + protowire.SizeVarint(uint64(rs)) + rs
		if n > 0 && size > maxBatchBytes {
			break
		}
		n++
	}
	if n == 0 {
		return nil
	}
	batch := append([]*resultsv1.Result(nil), s.queue[:n]...)
	s.queue = append(s.queue[:0:0], s.queue[n:]...)
	s.inflight = n
	return batch
}

// send submits batch and settles it: acknowledged results are done, the
// others go back to the head of the queue.
func (s *Sender) send(ctx context.Context, batch []*resultsv1.Result) error {
	rctx, cancel := context.WithTimeout(ctx, s.cfg.RPCTimeout)
	resp, err := s.client.Submit(rctx, &resultsv1.SubmitRequest{Results: batch})
	cancel()
	acked := map[string]bool{}
	if err == nil {
		for _, id := range resp.GetAcknowledgedIds() {
			acked[id] = true
		}
	}
	var back []*resultsv1.Result
	for _, r := range batch {
		if !acked[r.GetAttemptId()] {
			back = append(back, r)
		}
	}
	s.mu.Lock()
	s.inflight = 0
	s.stats.Delivered += uint64(len(batch) - len(back))
	if err != nil {
		s.stats.Failures++
	}
	rejected := err == nil && len(back) > 0
	if !rejected {
		s.queue = append(back, s.queue...)
	} else {
		// The collector answered but refused these (e.g. invalid): sending
		// them again would fail the same way forever.
		s.stats.Dropped += uint64(len(back))
	}
	dropped := s.trimLocked()
	if len(s.queue) == 0 && s.inflight == 0 {
		close(s.idle)
	}
	s.mu.Unlock()
	s.logDropped(dropped)
	if rejected {
		for _, r := range back {
			s.cfg.Log.Error("results collector rejected an attempt", "image", r.GetImage(), "attemptID", r.GetAttemptId())
		}
	}
	if err != nil {
		return fmt.Errorf("submit %d results: %w", len(batch), err)
	}
	return nil
}

// truncate cuts s to at most n bytes on a rune boundary, marking the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	const mark = "..."
	cut := n - len(mark)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + mark
}
