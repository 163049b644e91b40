package metrics

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

func TestObserverAndPass(t *testing.T) {
	t.Parallel()
	m := New()
	notFound := errors.New("rpc error: code = NotFound")
	m.AttemptFinished(pull.Attempt{Image: "a", Number: 1, Size: 100})
	m.AttemptFinished(pull.Attempt{Image: "b", Number: 1, Err: errors.New("timeout"), Reason: pull.ReasonTimeout})
	m.AttemptFinished(pull.Attempt{Image: "b", Number: 2, Size: 50})
	m.AttemptFinished(pull.Attempt{Image: "c", Number: 1, Err: notFound, Reason: pull.ReasonNotFound})
	m.AttemptFinished(pull.Attempt{Image: "d", Number: 1, Err: errors.New("?")}) // unclassified

	results := []pull.Result{
		{Image: "a", Outcome: pull.OutcomePulled, Size: 100, Duration: 2 * time.Second},
		{Image: "b", Outcome: pull.OutcomePulled, Size: 50, Duration: 3 * time.Second},
		{Image: "c", Outcome: pull.OutcomeFailed, Reason: pull.ReasonNotFound, Err: notFound, Duration: time.Second},
		{Image: "d", Outcome: pull.OutcomeFailed, Reason: "SomethingNew", Duration: time.Second},
		{Image: "e", Outcome: pull.OutcomePresent, Size: 1 << 30, Duration: time.Millisecond},
	}
	for _, r := range results {
		m.ImageFinished(r)
	}
	m.PassFinished(results, 42*time.Second)
	m.SetLabelState("failed")

	want := `
# HELP image_prefetcher_pull_attempts_total CRI PullImage attempts, by outcome (success, failure) and classified reason (empty on success).
# TYPE image_prefetcher_pull_attempts_total counter
image_prefetcher_pull_attempts_total{outcome="failure",reason="NotFound"} 1
image_prefetcher_pull_attempts_total{outcome="failure",reason="Timeout"} 1
image_prefetcher_pull_attempts_total{outcome="failure",reason="Unknown"} 1
image_prefetcher_pull_attempts_total{outcome="success",reason=""} 2
# HELP image_prefetcher_image_failures_total Images that ended a pass not present, by classified reason.
# TYPE image_prefetcher_image_failures_total counter
image_prefetcher_image_failures_total{reason="NotFound"} 1
image_prefetcher_image_failures_total{reason="Unknown"} 1
# HELP image_prefetcher_pulled_bytes_total Size of the images pulled, as reported by the runtime (present images are not counted).
# TYPE image_prefetcher_pulled_bytes_total counter
image_prefetcher_pulled_bytes_total 150
# HELP image_prefetcher_images_present Images of the current list present on the node after the last pass.
# TYPE image_prefetcher_images_present gauge
image_prefetcher_images_present 3
# HELP image_prefetcher_images_missing Images of the current list not present on the node after the last pass (malformed lines included).
# TYPE image_prefetcher_images_missing gauge
image_prefetcher_images_missing 2
# HELP image_prefetcher_node_label_state 1 for the value the node label has (succeeded, failed, or none when absent), 0 for the others.
# TYPE image_prefetcher_node_label_state gauge
image_prefetcher_node_label_state{state="failed"} 1
image_prefetcher_node_label_state{state="none"} 0
image_prefetcher_node_label_state{state="succeeded"} 0
# HELP image_prefetcher_passes_total Finished passes over the list, by result (succeeded when every image is present, else failed).
# TYPE image_prefetcher_passes_total counter
image_prefetcher_passes_total{result="failed"} 1
image_prefetcher_passes_total{result="succeeded"} 0
# HELP image_prefetcher_last_pass_duration_seconds Duration of the last pass.
# TYPE image_prefetcher_last_pass_duration_seconds gauge
image_prefetcher_last_pass_duration_seconds 42
`
	names := []string{
		"image_prefetcher_pull_attempts_total", "image_prefetcher_image_failures_total",
		"image_prefetcher_pulled_bytes_total", "image_prefetcher_images_present", "image_prefetcher_images_missing",
		"image_prefetcher_node_label_state", "image_prefetcher_passes_total",
		"image_prefetcher_last_pass_duration_seconds",
	}
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want), names...); err != nil {
		t.Error(err)
	}

	// The histogram: one observation per image, by outcome.
	if got := histogramCount(t, m, "failed"); got != 2 {
		t.Errorf("failed duration observations = %d, want 2", got)
	}
	if got := histogramCount(t, m, "pulled"); got != 2 {
		t.Errorf("pulled duration observations = %d, want 2", got)
	}
	if got := histogramCount(t, m, "present"); got != 1 {
		t.Errorf("present duration observations = %d, want 1", got)
	}

	last := testutil.ToFloat64(m.lastPass)
	if last < float64(time.Now().Add(-time.Hour).Unix()) {
		t.Errorf("last pass timestamp %v, want about now", last)
	}
	if got := testutil.ToFloat64(m.lastSuccess); got != 0 {
		t.Errorf("last success timestamp %v after a failed pass, want 0", got)
	}
}

func histogramCount(t *testing.T, m *Metrics, outcome string) uint64 {
	t.Helper()
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != "image_prefetcher_image_duration_seconds" {
			continue
		}
		for _, metric := range f.GetMetric() {
			for _, l := range metric.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == outcome {
					return metric.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	t.Fatalf("no histogram series for outcome %q", outcome)
	return 0
}

func TestSucceededPassAndLabelStates(t *testing.T) {
	t.Parallel()
	m := New()
	if got := testutil.ToFloat64(m.labelState.WithLabelValues("none")); got != 1 {
		t.Errorf("initial label state none = %v, want 1", got)
	}
	m.PassFinished([]pull.Result{{Image: "a", Outcome: pull.OutcomePresent}}, time.Second)
	if testutil.ToFloat64(m.lastSuccess) == 0 || testutil.ToFloat64(m.passes.WithLabelValues("succeeded")) != 1 {
		t.Error("a pass with every image present is not counted as succeeded")
	}
	m.SetLabelState("succeeded")
	m.SetLabelState("bogus")
	for _, s := range LabelStates {
		if got := testutil.ToFloat64(m.labelState.WithLabelValues(s)); got != 0 {
			t.Errorf("state %s = %v after an unknown state, want 0", s, got)
		}
	}
	if n := testutil.CollectAndCount(m.labelState); n != len(LabelStates) {
		t.Errorf("%d label state series, want %d (unknown values add none)", n, len(LabelStates))
	}
	m.SetLabelState("")
	if got := testutil.ToFloat64(m.labelState.WithLabelValues("none")); got != 1 {
		t.Errorf("state none = %v after removal, want 1", got)
	}
}

func TestRegistryIsOwnAndComplete(t *testing.T) {
	t.Parallel()
	a, b := New(), New() // two instances do not collide: nothing is global
	a.SetLabelState("succeeded")
	if testutil.ToFloat64(b.labelState.WithLabelValues("succeeded")) != 0 {
		t.Error("metrics instances share state")
	}
	families, err := a.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, f := range families {
		seen[f.GetName()] = true
		for _, metric := range f.GetMetric() {
			for _, l := range metric.GetLabel() {
				if l.GetName() == "image" {
					t.Errorf("%s has an image label", f.GetName())
				}
			}
		}
	}
	for _, name := range []string{"go_goroutines", "process_start_time_seconds", "image_prefetcher_last_pass_timestamp_seconds"} {
		if !seen[name] {
			t.Errorf("%s not exposed", name)
		}
	}
}

func TestConcurrentUpdates(t *testing.T) {
	t.Parallel()
	m := New()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 100 {
				m.AttemptFinished(pull.Attempt{Number: j})
				m.ImageFinished(pull.Result{Outcome: pull.OutcomePulled, Size: 1})
				if j%10 == 0 {
					m.SetLabelState(LabelStates[(i+j)%2])
				}
			}
		}()
	}
	wg.Wait()
	if got := testutil.ToFloat64(m.attempts.WithLabelValues(AttemptSuccess, "")); got != 800 {
		t.Errorf("attempts = %v, want 800", got)
	}
	if got := testutil.ToFloat64(m.bytesPulled); got != 800 {
		t.Errorf("bytes = %v, want 800", got)
	}
}

func TestPinMetrics(t *testing.T) {
	t.Parallel()
	m := New()
	m.SetPinnedImages(3)
	m.PinFailed("pin")
	m.PinFailed("release")
	m.PinFailed("release")
	m.PinFailed("docker.io/library/busybox:latest") // never a series of its own
	want := `
# HELP image_prefetcher_pinned_images Images of the current list that this instance holds pinned against the kubelet's image GC (--pin-images) after the last pass; 0 when pinning is off.
# TYPE image_prefetcher_pinned_images gauge
image_prefetcher_pinned_images 3
# HELP image_prefetcher_pin_failures_total Image pins that could not be set (operation pin) or let go of (release), and passes whose pins could not be read (list).
# TYPE image_prefetcher_pin_failures_total counter
image_prefetcher_pin_failures_total{operation="list"} 0
image_prefetcher_pin_failures_total{operation="pin"} 2
image_prefetcher_pin_failures_total{operation="release"} 2
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want),
		"image_prefetcher_pinned_images", "image_prefetcher_pin_failures_total"); err != nil {
		t.Error(err)
	}
}

func TestProgressMetrics(t *testing.T) {
	t.Parallel()
	m := New()
	m.SetPullBytesInFlight(5 << 20)
	m.AddFetchedBytes(3 << 20)
	m.AddFetchedBytes(2 << 20)
	stalled := fmt.Errorf("no byte arrived for 20s: %w", pull.ErrStalled)
	m.AttemptFinished(pull.Attempt{Image: "a", Number: 1, Err: stalled, Reason: pull.Classify(stalled)})
	m.AttemptFinished(pull.Attempt{Image: "a", Number: 2, Err: errors.New("i/o timeout"), Reason: pull.ReasonTimeout})
	want := `
# HELP image_prefetcher_pull_bytes_in_flight Bytes written so far by the pulls in progress, partial blobs included, as containerd's content store shows them; 0 between pulls and on runtimes without that API.
# TYPE image_prefetcher_pull_bytes_in_flight gauge
image_prefetcher_pull_bytes_in_flight 5.24288e+06
# HELP image_prefetcher_pull_fetched_bytes_total Bytes that arrived for pulls, counted as they arrive (containerd's content store); rate() is the node's pull bandwidth.
# TYPE image_prefetcher_pull_fetched_bytes_total counter
image_prefetcher_pull_fetched_bytes_total 5.24288e+06
# HELP image_prefetcher_pull_stalls_total Pull attempts ended because no byte arrived for --pull-progress-timeout (also counted as attempts failed with reason Timeout).
# TYPE image_prefetcher_pull_stalls_total counter
image_prefetcher_pull_stalls_total 1
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want),
		"image_prefetcher_pull_bytes_in_flight", "image_prefetcher_pull_fetched_bytes_total", "image_prefetcher_pull_stalls_total"); err != nil {
		t.Error(err)
	}
	if got := testutil.ToFloat64(m.attempts.WithLabelValues(AttemptFailure, "Timeout")); got != 2 {
		t.Errorf("failed Timeout attempts = %v, want 2 (a stall is a timeout)", got)
	}
}
