package app

import (
	"log/slog"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// logObserver writes one structured line per attempt and per image result;
// an image found already present is logged at debug level only.
// Credentials appear only as their Source, never as secrets.
type logObserver struct{ log *slog.Logger }

var _ pull.Observer = logObserver{}

func (o logObserver) AttemptFinished(a pull.Attempt) {
	attrs := []any{
		"image", a.Image, "attempt", a.Number, "duration", a.Duration.Round(1e6), "timeout", a.Timeout,
	}
	if a.Hedges > 0 {
		attrs = append(attrs, "hedges", a.Hedges)
	}
	if a.Credential != "" {
		attrs = append(attrs, "credential", a.Credential)
	}
	if b := a.Bytes; b.Fetched > 0 || b.Resumed > 0 {
		attrs = append(attrs, "fetchedBytes", b.Fetched, "resumedFromBytes", b.Resumed)
	}
	if a.Err != nil {
		o.log.Warn("pull attempt failed", append(attrs, "reason", string(a.Reason), "error", a.Err.Error())...)
		return
	}
	o.log.Info("pull attempt succeeded", append(attrs, "imageRef", a.ImageRef)...)
}

func (o logObserver) ImageFinished(r pull.Result) {
	attrs := []any{
		"image", r.Image, "outcome", string(r.Outcome), "attempts", r.Attempts, "duration", r.Duration.Round(1e6),
	}
	if r.Err != nil {
		o.log.Error("image failed", append(attrs, "reason", string(r.Reason), "error", r.Err.Error())...)
		return
	}
	attrs = append(attrs, "imageRef", r.ImageRef, "size", r.Size)
	if r.Outcome == pull.OutcomePresent {
		// A steady re-check finds every image present: one line each would
		// be thousands of lines a pass saying nothing new. The pass's summary
		// line counts them.
		o.log.Debug("image ready", attrs...)
		return
	}
	o.log.Info("image ready", attrs...)
}

// observers fans out to several observers.
type observers []pull.Observer

func (os observers) AttemptFinished(a pull.Attempt) {
	for _, o := range os {
		o.AttemptFinished(a)
	}
}

func (os observers) ImageFinished(r pull.Result) {
	for _, o := range os {
		o.ImageFinished(r)
	}
}
