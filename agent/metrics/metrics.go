// Package metrics holds the agent's Prometheus metrics, on a registry of its
// own so that nothing registered globally by a library leaks into /metrics.
//
// No metric has an image label. Image lists are user input and may hold
// hundreds of references that change with every tag bump; a per-image label
// would multiply every series by the list size and leave dead series behind
// until the process restarts. Per-image details go to the logs, the Node
// Events and the results collector instead; the metrics answer "is this node
// healthy, how fast, and why not".
package metrics

import (
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Namespace prefixes every metric name.
const Namespace = "image_prefetcher"

// Attempt outcomes (label "outcome" of the attempt counter).
const (
	AttemptSuccess = "success"
	AttemptFailure = "failure"
)

// LabelStates are the values of the "state" label of the node label gauge.
// "none" is the state before the first write and after a removal.
var LabelStates = []string{"succeeded", "failed", "none"}

// PinOperations are the values of the "operation" label of the pin failure
// counter.
var PinOperations = []string{"pin", "release", "list"}

// Metrics are the agent's collectors. The zero value is not usable; call New.
type Metrics struct {
	registry *prometheus.Registry

	pullDuration  *prometheus.HistogramVec
	attempts      *prometheus.CounterVec
	failures      *prometheus.CounterVec
	bytesPulled   prometheus.Counter
	imagesPresent prometheus.Gauge
	imagesMissing prometheus.Gauge
	labelState    *prometheus.GaugeVec
	passes        *prometheus.CounterVec
	lastPass      prometheus.Gauge
	lastSuccess   prometheus.Gauge
	passDuration  prometheus.Gauge
	pinnedImages  prometheus.Gauge
	pinFailures   *prometheus.CounterVec
	bytesInFlight prometheus.Gauge
	bytesFetched  prometheus.Counter
	stalls        prometheus.Counter
	leaseHeld     prometheus.Gauge
	imageFsUsed   prometheus.Gauge

	mu    sync.Mutex
	state string
}

// pullBuckets span a present image (one ImageStatus RPC, milliseconds) to a
// multi-gigabyte pull near the default overall timeout (20 minutes).
var pullBuckets = []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200}

// New creates the collectors on a new registry, with the Go and process
// collectors.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	// promauto registers each collector where it is made: none is made and forgotten.
	f := promauto.With(reg)
	m := &Metrics{
		registry: reg,
		pullDuration: f.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "image_duration_seconds",
			Help:    "Time to make one image present in a pass, attempts and waits between them included, by outcome (present, pulled, failed).",
			Buckets: pullBuckets,
		}, []string{"outcome"}),
		attempts: f.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "pull_attempts_total",
			Help: "CRI PullImage attempts, by outcome (success, failure) and classified reason (empty on success).",
		}, []string{"outcome", "reason"}),
		failures: f.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "image_failures_total",
			Help: "Images that ended a pass not present, by classified reason.",
		}, []string{"reason"}),
		bytesPulled: f.NewCounter(prometheus.CounterOpts{
			Namespace: Namespace, Name: "pulled_bytes_total",
			Help: "Size of the images pulled, as reported by the runtime (present images are not counted).",
		}),
		imagesPresent: f.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "images_present",
			Help: "Images of the current list present on the node after the last pass.",
		}),
		imagesMissing: f.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "images_missing",
			Help: "Images of the current list not present on the node after the last pass (malformed lines included).",
		}),
		labelState: f.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "node_label_state",
			Help: "1 for the value the node label has (succeeded, failed, or none when absent), 0 for the others.",
		}, []string{"state"}),
		passes: f.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "passes_total",
			Help: "Finished passes over the list, by result (succeeded when every image is present, else failed).",
		}, []string{"result"}),
		lastPass: f.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "last_pass_timestamp_seconds",
			Help: "Unix time the last pass finished.",
		}),
		lastSuccess: f.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "last_success_timestamp_seconds",
			Help: "Unix time the last pass that found every image present finished.",
		}),
		passDuration: f.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "last_pass_duration_seconds",
			Help: "Duration of the last pass.",
		}),
		pinnedImages: f.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "pinned_images",
			Help: "Images of the current list that this instance holds pinned against the kubelet's image GC (--pin-images) after the last pass; 0 when pinning is off.",
		}),
		pinFailures: f.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "pin_failures_total",
			Help: "Image pins that could not be set (operation pin) or let go of (release), and passes whose pins could not be read (list).",
		}, []string{"operation"}),
		bytesInFlight: f.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "pull_bytes_in_flight",
			Help: "Bytes written so far by the pulls in progress, partial blobs included, as containerd's content store shows them; 0 between pulls and on runtimes without that API.",
		}),
		bytesFetched: f.NewCounter(prometheus.CounterOpts{
			Namespace: Namespace, Name: "pull_fetched_bytes_total",
			Help: "Bytes that arrived for pulls, counted as they arrive (containerd's content store); rate() is the node's pull bandwidth.",
		}),
		stalls: f.NewCounter(prometheus.CounterOpts{
			Namespace: Namespace, Name: "pull_stalls_total",
			Help: "Pull attempts ended because no byte arrived for --pull-progress-timeout (also counted as attempts failed with reason Timeout).",
		}),
		leaseHeld: f.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "lease_held_bytes",
			Help: "Bytes containerd holds under this instance's leases after the last pass: what failed pulls fetched, kept for a resume, which the kubelet's image GC cannot reclaim; 0 on runtimes without leases.",
		}),
		imageFsUsed: f.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "image_fs_used_bytes",
			Help: "Bytes the runtime's image filesystems use, as CRI ImageFsInfo reports them after the last pass.",
		}),
	}
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	// Series that exist from the start, so that rate() and alerts see zeros
	// rather than absent series.
	for _, o := range []pull.Outcome{pull.OutcomePresent, pull.OutcomePulled, pull.OutcomeFailed} {
		m.pullDuration.WithLabelValues(string(o))
	}
	for _, r := range []string{"succeeded", "failed"} {
		m.passes.WithLabelValues(r)
	}
	for _, op := range PinOperations {
		m.pinFailures.WithLabelValues(op)
	}
	m.SetLabelState("none")
	return m
}

// Registry is the registry holding every collector, for /metrics.
func (m *Metrics) Registry() *prometheus.Registry { return m.registry }

var (
	_ pull.Observer     = (*Metrics)(nil)
	_ progress.Recorder = (*Metrics)(nil)
)

// AttemptFinished counts one PullImage attempt. It only updates atomic
// counters and never blocks.
func (m *Metrics) AttemptFinished(a pull.Attempt) {
	outcome := AttemptSuccess
	reason := ""
	if a.Err != nil {
		outcome = AttemptFailure
		reason = reasonLabel(a.Reason)
	}
	m.attempts.WithLabelValues(outcome, reason).Inc()
	if errors.Is(a.Err, pull.ErrStalled) {
		m.stalls.Inc()
	}
}

// SetPullBytesInFlight sets the bytes written so far by the pulls in
// progress (agent/progress).
func (m *Metrics) SetPullBytesInFlight(n int64) { m.bytesInFlight.Set(float64(n)) }

// AddFetchedBytes counts bytes that arrived for pulls (agent/progress).
func (m *Metrics) AddFetchedBytes(n int64) { m.bytesFetched.Add(float64(n)) }

// ImageFinished records one image's result.
func (m *Metrics) ImageFinished(r pull.Result) {
	m.pullDuration.WithLabelValues(string(r.Outcome)).Observe(r.Duration.Seconds())
	switch r.Outcome {
	case pull.OutcomePulled:
		m.bytesPulled.Add(float64(r.Size))
	case pull.OutcomeFailed:
		m.failures.WithLabelValues(reasonLabel(r.Reason)).Inc()
	}
}

// PassFinished records the end of a pass over the whole list: how many images
// are present and missing, when, and how long it took.
func (m *Metrics) PassFinished(results []pull.Result, duration time.Duration) {
	present, missing := 0, 0
	for _, r := range results {
		if r.Outcome == pull.OutcomeFailed {
			missing++
		} else {
			present++
		}
	}
	m.imagesPresent.Set(float64(present))
	m.imagesMissing.Set(float64(missing))
	m.passDuration.Set(duration.Seconds())
	now := float64(time.Now().UnixNano()) / 1e9
	m.lastPass.Set(now)
	if missing == 0 {
		m.passes.WithLabelValues("succeeded").Inc()
		m.lastSuccess.Set(now)
	} else {
		m.passes.WithLabelValues("failed").Inc()
	}
}

// SetLabelState records the node label's value: "succeeded", "failed", or
// "" / "none" when the label is absent. Any other value sets every state to 0
// rather than adding a series.
func (m *Metrics) SetLabelState(state string) {
	if state == "" {
		state = "none"
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state == state {
		return
	}
	m.state = state
	for _, s := range LabelStates {
		v := 0.0
		if s == state {
			v = 1
		}
		m.labelState.WithLabelValues(s).Set(v)
	}
}

// reasonLabel bounds the reason label to the classified reasons.
func reasonLabel(r pull.Reason) string {
	switch r {
	case pull.ReasonNotFound, pull.ReasonUnauthorized, pull.ReasonInvalidReference, pull.ReasonTimeout,
		pull.ReasonUnavailable, pull.ReasonServerError, pull.ReasonCanceled, pull.ReasonDiskFull, pull.ReasonDiskBudget, pull.ReasonArtifactUnsupported, pull.ReasonRemoved:
		return string(r)
	}
	return string(pull.ReasonUnknown)
}

// SetLeaseHeldBytes records the bytes held under this instance's leases.
func (m *Metrics) SetLeaseHeldBytes(n int64) { m.leaseHeld.Set(float64(n)) }

// SetImageFsUsedBytes records the image filesystems' use.
func (m *Metrics) SetImageFsUsedBytes(n uint64) { m.imageFsUsed.Set(float64(n)) }

// SetPinnedImages records how many images of the list this instance holds
// pinned.
func (m *Metrics) SetPinnedImages(n int) { m.pinnedImages.Set(float64(n)) }

// PinFailed counts one failure of a pin operation (one of PinOperations; any
// other value is counted as "pin" rather than adding a series).
func (m *Metrics) PinFailed(operation string) {
	if !slices.Contains(PinOperations, operation) {
		operation = "pin"
	}
	m.pinFailures.WithLabelValues(operation).Inc()
}
