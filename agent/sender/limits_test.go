package sender

import (
	"math"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"google.golang.org/protobuf/proto"

	"github.com/nodeprefetch/image-prefetcher/agent/collector"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
	resultsv1 "github.com/nodeprefetch/image-prefetcher/api/results/v1"
)

// The largest batch an agent sends, every field at the most it can hold,
// fits the collector's message limit with room to spare. The figure is the
// one collector.MaxMessageBytes is sized from.
func TestLargestBatchFitsTheCollectorsLimit(t *testing.T) {
	t.Parallel()
	s := &Sender{cfg: Config{
		Node:     strings.Repeat("n", 253), // a Node name is a DNS subdomain
		Instance: strings.Repeat("i", 63),  // the instance is a DNS label
	}}
	// A reference longer than any valid one (name 255, tag 128, a sha512
	// digest), an image ID and an error text longer than any runtime's.
	a := pull.Attempt{
		Image:    strings.Repeat("r", 4096),
		ImageRef: "sha256:" + strings.Repeat("f", 4096),
		Number:   math.MaxInt32,
		Start:    time.Unix(math.MaxInt32, 999999999),
		Duration: time.Duration(math.MaxInt64),
		Timeout:  time.Duration(math.MaxInt64),
		Size:     math.MaxUint64,
		Bytes:    pull.Bytes{Fetched: math.MaxInt64, Resumed: math.MaxInt64, Total: math.MaxInt64},
		Err:      errorText(strings.Repeat("é", 8192)),
		Reason:   pull.ReasonInvalidReference,
	}
	req := &resultsv1.SubmitRequest{}
	for range DefaultBatchSize {
		req.Results = append(req.Results, s.result(a))
	}
	size := proto.Size(req)
	t.Logf("largest batch of %d attempts: %d bytes (%.0f KiB); collector limit %d KiB",
		DefaultBatchSize, size, float64(size)/1024, collector.MaxMessageBytes>>10)
	if size > collector.MaxMessageBytes*3/4 {
		t.Errorf("largest batch is %d bytes, less than a quarter of headroom under the collector's %d", size, collector.MaxMessageBytes)
	}
	if r := req.Results[0]; !utf8.ValidString(r.GetError()) || len(r.GetError()) > maxErrorBytes {
		t.Errorf("error text cut to %d bytes, valid UTF-8 %v", len(r.GetError()), utf8.ValidString(r.GetError()))
	}
}

type errorText string

func (e errorText) Error() string { return string(e) }

// Whatever the queue holds, one Submit stays under the collector's limit:
// a batch is cut by bytes, not only by count.
func TestBatchesAreCutByBytes(t *testing.T) {
	t.Parallel()
	s := &Sender{cfg: Config{BatchSize: 100}}
	for range 10 {
		s.queue = append(s.queue, &resultsv1.Result{AttemptId: uuid.NewString(), Error: strings.Repeat("x", 200<<10)})
	}
	var batches []int
	for {
		b := s.take()
		if b == nil {
			break
		}
		if size := proto.Size(&resultsv1.SubmitRequest{Results: b}); size > collector.MaxMessageBytes {
			t.Errorf("batch of %d results is %d bytes, over the collector's %d", len(b), size, collector.MaxMessageBytes)
		}
		batches = append(batches, len(b))
		s.inflight = 0
	}
	if len(batches) != 5 {
		t.Errorf("10 results of 200 KiB went in batches %v, want 5 of 2", batches)
	}
}
