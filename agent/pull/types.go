package pull

import "time"

// Reason is the classified cause of a failed attempt or image.
type Reason string

const (
	ReasonNone             Reason = ""
	ReasonNotFound         Reason = "NotFound"
	ReasonUnauthorized     Reason = "Unauthorized"
	ReasonInvalidReference Reason = "InvalidReference"
	ReasonTimeout          Reason = "Timeout"
	ReasonUnavailable      Reason = "Unavailable"
	ReasonServerError      Reason = "ServerError"
	ReasonCanceled         Reason = "Canceled"
	ReasonUnknown          Reason = "Unknown"
)

// Outcome is what happened to one image in a pass.
type Outcome string

const (
	OutcomePresent Outcome = "present" // already on the node, no pull needed
	OutcomePulled  Outcome = "pulled"
	OutcomeFailed  Outcome = "failed"
)

// Attempt describes one PullImage call.
type Attempt struct {
	Image      string // the reference as sent to CRI
	Number     int    // 1-based
	Start      time.Time
	Duration   time.Duration
	Timeout    time.Duration // the per-attempt timeout it ran under
	Hedges     int           // PullImage calls started besides the first (see Engine)
	Credential string        // credentials.Credential.Source, or "" for anonymous
	Err        error
	Reason     Reason
	ImageRef   string // image ID the runtime returned on success
	Size       uint64
	// Bytes are what the runtime wrote of the image during the attempt, when
	// the engine follows progress (Engine.Progress); zero otherwise.
	Bytes Bytes
}

// Result is the final state of one image after a pass.
type Result struct {
	Image       string
	Line        int
	Outcome     Outcome
	Reason      Reason
	Err         error
	Attempts    int
	Start       time.Time
	Duration    time.Duration
	ImageRef    string   // image ID reported by the runtime
	RepoDigests []string // as reported by ImageStatus
	Size        uint64
}

// Observer is told about every attempt and every image result, for logs,
// metrics and the results collector. Implementations must not block.
type Observer interface {
	AttemptFinished(Attempt)
	ImageFinished(Result)
}
