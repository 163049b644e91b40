package pull

import (
	"context"
	"errors"
	"time"
)

// Progress follows the bytes of an image's pulls where the runtime shows them
// (containerd; see agent/progress). With it the engine ends an attempt for
// being stuck only when no byte arrived for Config.ProgressTimeout, and lets
// an attempt whose bytes flow run up to MaxAttemptTimeout, the outer cap.
type Progress interface {
	// Follow starts following one image's pulls, over all its attempts. It
	// returns nil when it cannot (the engine then uses the escalating
	// per-attempt timeouts alone).
	Follow(ctx context.Context, image string) Transfer
}

// Transfer is one image's pulls as the runtime sees them.
type Transfer interface {
	// Bind returns ctx for a PullImage call of the image, marked so that the
	// runtime accounts what the call fetches to this transfer.
	Bind(ctx context.Context) context.Context
	// Watch starts watching attempt number (1-based) with the no-progress
	// window.
	Watch(number int, window time.Duration) AttemptWatch
	// Close ends following, saying how the image's pull ended.
	Close(end TransferEnd)
}

// TransferEnd is how the pulls of a followed image ended: whether what the
// runtime kept for a resume is still worth keeping.
type TransferEnd int

const (
	// TransferFailed: the image failed for a reason another attempt may get
	// past (a timeout, a stall): what was fetched is kept for a resume.
	TransferFailed TransferEnd = iota
	// TransferFailedForGood: it failed for a reason another attempt cannot
	// help (Reason.Permanent: a missing tag, a refused credential, a full
	// disk); what was fetched would only hold disk space.
	TransferFailedForGood
	// TransferPulled: the image is present; its record holds its content.
	TransferPulled
)

// transferEnd is how r's transfer ended.
func transferEnd(r Result) TransferEnd {
	switch {
	case r.Outcome == OutcomePulled:
		return TransferPulled
	case r.Reason.Permanent():
		return TransferFailedForGood
	default:
		return TransferFailed
	}
}

// AttemptWatch watches one attempt.
type AttemptWatch interface {
	// Stalled is closed once the attempt has made no progress for the window.
	Stalled() <-chan struct{}
	// Resolving reports whether the pull has not begun fetching any blob
	// yet. Only then can another PullImage (a new registry connection) get
	// past a hung one: once blobs are being fetched, a second call waits on
	// the runtime's per-blob locks behind the first.
	Resolving() bool
	// CallStarted tells that another PullImage call of the attempt (a hedge)
	// has started.
	CallStarted()
	// Stop ends the watch and returns the attempt's bytes.
	Stop() Bytes
}

// Bytes is what the runtime wrote of an image during one attempt, as the
// runtime's content store shows it.
type Bytes struct {
	// Fetched arrived during the attempt.
	Fetched int64
	// Resumed were there from earlier attempts when it started: the attempt
	// went on from there.
	Resumed int64
	// Total is the size of the image's content, 0 when not known.
	Total int64
}

// ErrStalled ends an attempt on which no byte arrived for the no-progress
// window (Config.ProgressTimeout). It is classified as a timeout.
var ErrStalled = errors.New("pull made no progress")

// ErrRuntimeCanceled marks an attempt the runtime cancelled by itself while
// the agent still waited for it, such as CRI-O at its pull_progress_timeout.
// It is classified as a timeout.
var ErrRuntimeCanceled = errors.New("cancelled by the runtime")
