package nodestate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// node is a fake of everything Node writes: each write is recorded, in
// order, as "<what> <how>", and a write named in fail fails that many times
// (as against an API server that then answers again). It keeps what the node
// says, so a row can check where it ends.
type node struct {
	mu     sync.Mutex
	writes []string
	fail   map[string]int

	label, condition string // "" when absent
	tainted          bool
}

func (f *node) write(w string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, w)
	if f.fail[w] > 0 {
		f.fail[w]--
		return errAPI
	}
	return nil
}

func (f *node) sequence() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.writes)
}

type labels struct{ *node }

func (l labels) Begin(_ context.Context, _ string) error {
	if l.label == "" || l.label == "other-list" {
		if err := l.write("label begin"); err != nil {
			return err
		}
		l.label = ""
	}
	return nil
}

func (l labels) Withdraw(_ context.Context, _ string) error {
	if err := l.write("label withdraw"); err != nil {
		return err
	}
	l.label = ""
	return nil
}

func (l labels) Set(_ context.Context, _ string, s nodelabel.State) (bool, error) {
	if err := l.write("label " + string(s)); err != nil {
		return false, err
	}
	changed := l.label != string(s)
	l.label = string(s)
	return changed, nil
}

func (l labels) Claim(context.Context, string) (nodelabel.State, error) {
	return nodelabel.State(l.label), nil
}

func (l labels) CheckOwner(context.Context) error { return nil }

func (l labels) Remove(context.Context) error {
	if err := l.write("label remove"); err != nil {
		return err
	}
	l.label = ""
	return nil
}

type condition struct{ *node }

func (c condition) Set(_ context.Context, s corev1.ConditionStatus, reason, _ string) (bool, error) {
	if c.condition == string(s)+"/"+reason {
		return false, nil
	}
	if err := c.write("condition " + string(s) + "/" + reason); err != nil {
		return false, err
	}
	c.condition = string(s) + "/" + reason
	return true, nil
}

func (c condition) Remove(context.Context) (bool, error) {
	if err := c.write("condition remove"); err != nil {
		return false, err
	}
	c.condition = ""
	return true, nil
}

type taint struct{ *node }

func (t taint) Sync(_ context.Context, complete bool) (nodelabel.TaintState, error) {
	switch {
	case !t.tainted:
		return nodelabel.TaintAbsent, nil
	case !complete:
		return nodelabel.TaintKept, nil
	}
	if err := t.write("taint remove"); err != nil {
		return nodelabel.TaintKept, err
	}
	t.tainted = false
	return nodelabel.TaintRemoved, nil
}

func (taint) String() string { return "image-prefetcher.stackrox.io/test:NoSchedule" }

type events struct{ *node }

func (e events) Report(_ context.Context, o nodelabel.Outcome) error {
	var reasons []string
	for _, p := range o.Problems {
		reasons = append(reasons, p.Reason)
	}
	for _, r := range o.Results {
		if r.Outcome == pull.OutcomeFailed {
			reasons = append(reasons, string(r.Reason))
		}
	}
	if len(reasons) == 0 && o.LabelChanged {
		reasons = append(reasons, "succeeded")
	}
	if len(reasons) == 0 {
		return nil
	}
	return e.write("events " + strings.Join(reasons, ","))
}

func newNode(f *node) (*Node, *bytes.Buffer) {
	var logs bytes.Buffer
	return &Node{
		Labels: labels{f}, Cond: condition{f}, Taint: taint{f}, Events: events{f},
		Log: slog.New(slog.NewTextHandler(&logs, nil)), Instance: "test", ListFile: "/etc/images.txt",
	}, &logs
}

const digest = "0123456789abcdef"

var errAPI = errors.New("the API server did not answer")

func results(failed ...string) []pull.Result {
	out := []pull.Result{{Image: "a:1", Outcome: pull.OutcomePresent}, {Image: "b:1", Outcome: pull.OutcomePulled}}
	for _, f := range failed {
		out = append(out, pull.Result{Image: f, Outcome: pull.OutcomeFailed, Reason: pull.ReasonNotFound})
	}
	return out
}

// Each row is a sequence a node goes through; the writes must come in the
// order that keeps the label's promise at every moment, and the faults of
// agent issue 22 are rows: a hole at the start of a pass, a hole the
// kubelet's GC makes during it, a withdrawal that fails, an outcome whose
// label write fails, the disk budget, leaving (and failing to).
func TestWriteOrder(t *testing.T) {
	t.Parallel()
	missing := func(refs ...string) Missing {
		return Missing{Digest: digest, Images: 3, Refs: refs, Known: true}
	}
	succeeded := Outcome{Digest: digest, State: nodelabel.Succeeded, Results: results()}
	for _, c := range []struct {
		name string
		// the node before; the faults
		label, cond string
		tainted     bool
		fail        []string
		steps       func(ctx context.Context, n *Node) error
		want        []string
		// what the node says after
		wantLabel string
		wantErr   string
	}{{
		name:  "a new node: nothing known missing, the outcome lifts the gate in order",
		label: "", tainted: true,
		steps: func(ctx context.Context, n *Node) error {
			if err := n.StopClaiming(ctx, Missing{Digest: digest, Images: 3, Known: true}); err != nil {
				return err
			}
			n.Record(ctx, succeeded)
			return nil
		},
		want: []string{"condition False/ImagesPulling", "label begin", "label succeeded", "condition True/ImagesPresent",
			"taint remove", "events succeeded"},
		wantLabel: "succeeded",
	}, {
		name:  "a steady node: nothing missing, nothing written",
		label: "succeeded", cond: "True/ImagesPresent",
		steps: func(ctx context.Context, n *Node) error {
			if err := n.StopClaiming(ctx, Missing{Digest: digest, Images: 3, Known: true}); err != nil {
				return err
			}
			n.Record(ctx, succeeded)
			return nil
		},
		want:      []string{"label succeeded"},
		wantLabel: "succeeded",
	}, {
		name:  "a hole at the start: condition False before the label is withdrawn, and both before any pull",
		label: "succeeded", cond: "True/ImagesPresent",
		steps: func(ctx context.Context, n *Node) error {
			return n.StopClaiming(ctx, missing("c:1"))
		},
		want:      []string{"condition False/ImagesPulling", "label withdraw"},
		wantLabel: "",
	}, {
		name:  "the kubelet's GC during the pass: the hole found at the end is withdrawn like one at the start, then the outcome",
		label: "succeeded", cond: "True/ImagesPresent",
		steps: func(ctx context.Context, n *Node) error {
			if err := n.StopClaiming(ctx, Missing{Digest: digest, Images: 3, Known: true}); err != nil {
				return err
			}
			if err := n.StopClaiming(ctx, missing("a:1")); err != nil { // the end-of-pass check
				return err
			}
			n.Record(ctx, succeeded) // pulled again and checked
			return nil
		},
		want: []string{"condition False/ImagesPulling", "label withdraw", "label succeeded", "condition True/ImagesPresent",
			"events succeeded"},
		wantLabel: "succeeded",
	}, {
		name:  "a failed withdrawal is retried in the background until it lands, before the outcome",
		label: "succeeded", cond: "True/ImagesPresent",
		fail: []string{"label withdraw"},
		steps: func(ctx context.Context, n *Node) error {
			m := missing("c:1")
			if err := n.StopClaiming(ctx, m); err == nil {
				return errors.New("StopClaiming hid the failed withdrawal")
			}
			w := n.KeepWithdrawing(ctx, m)
			// The fake API server answers the retry: wait for it, then end.
			for deadline := time.Now().Add(10 * time.Second); ; {
				if slices.Index(n.Labels.(labels).sequence()[2:], "label withdraw") >= 0 {
					break
				}
				if time.Now().After(deadline) {
					return errors.New("the withdrawal was not retried")
				}
				time.Sleep(10 * time.Millisecond)
			}
			w.End(true)
			n.Record(ctx, succeeded)
			return nil
		},
		want: []string{"condition False/ImagesPulling", "label withdraw", "label withdraw", "label succeeded",
			"condition True/ImagesPresent", "events succeeded"},
		wantLabel: "succeeded",
	}, {
		name:  "the outcome's label write fails: neither condition nor taint claims it, the events still go",
		label: "", cond: "False/ImagesPulling", tainted: true,
		fail: []string{"label succeeded"},
		steps: func(ctx context.Context, n *Node) error {
			o := succeeded
			o.Problems = []nodelabel.Problem{{Reason: nodelabel.EventReasonCredentialFileSkipped}}
			if r := n.Record(ctx, o); r.LabelErr == nil {
				return errors.New("Record hid the label's error")
			}
			return nil
		},
		want:      []string{"label succeeded", "events PrefetchCredentialFileSkipped"},
		wantLabel: "",
	}, {
		name:  "the disk budget stops the pulls: failed, condition False, the taint stays and says why",
		label: "", cond: "False/ImagesPulling", tainted: true,
		steps: func(ctx context.Context, n *Node) error {
			res := append(results(), pull.Result{Image: "c:1", Outcome: pull.OutcomeFailed, Reason: pull.ReasonDiskBudget})
			n.Record(ctx, Outcome{Digest: digest, State: nodelabel.Failed, Results: res})
			return nil
		},
		want:      []string{"label failed", "condition False/ImagesMissing", "events PrefetchNodeGated,DiskBudget"},
		wantLabel: "failed",
	}, {
		name:  "an unreadable list: failed, the condition says so, the taint stays",
		label: "succeeded", cond: "True/ImagesPresent", tainted: true,
		steps: func(ctx context.Context, n *Node) error {
			n.Record(ctx, Outcome{Digest: nodelabel.UnreadableList, State: nodelabel.Failed,
				Problems: []nodelabel.Problem{{Reason: nodelabel.EventReasonFailed}}})
			return nil
		},
		want:      []string{"label failed", "condition False/ListUnreadable", "events PrefetchFailed,PrefetchNodeGated"},
		wantLabel: "failed",
	}, {
		name:  "leaving: label, condition, taint, and the pins last",
		label: "succeeded", cond: "True/ImagesPresent", tainted: true,
		steps: func(ctx context.Context, n *Node) error {
			return n.Leave(ctx, func(context.Context) error { return n.Labels.(labels).write("pins release") })
		},
		want:      []string{"label remove", "condition remove", "taint remove", "pins release"},
		wantLabel: "",
	}, {
		name:  "leaving when the label cannot be removed: the rest goes, the pins stay",
		label: "succeeded", cond: "True/ImagesPresent",
		fail: []string{"label remove"},
		steps: func(ctx context.Context, n *Node) error {
			return n.Leave(ctx, func(context.Context) error { return n.Labels.(labels).write("pins release") })
		},
		want:      []string{"label remove", "condition remove"},
		wantLabel: "succeeded",
		wantErr:   "pins kept",
	}} {
		t.Run(c.name, func(t *testing.T) {
			f := &node{label: c.label, condition: c.cond, tainted: c.tainted, fail: map[string]int{}}
			for _, w := range c.fail {
				f.fail[w]++
			}
			n, logs := newNode(f)
			err := c.steps(context.Background(), n)
			switch {
			case c.wantErr == "" && err != nil:
				t.Fatalf("error %v\n%s", err, logs)
			case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
				t.Fatalf("error %v, want one saying %q", err, c.wantErr)
			}
			if got := f.sequence(); !slices.Equal(got, c.want) {
				t.Errorf("writes\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(c.want, "\n  "))
			}
			if f.label != c.wantLabel {
				t.Errorf("the label says %q, want %q", f.label, c.wantLabel)
			}
		})
	}
}

func TestMissingText(t *testing.T) {
	t.Parallel()
	m := Missing{Digest: digest + "ffff", Images: 40, Refs: []string{"a:1", "b:1", "c:1", "d:1"}, Known: true}
	if got, want := m.Text(), "4 of 40 images of list 0123456789ab missing, pulling them: a:1, b:1, c:1"; got != want {
		t.Errorf("Text() = %q, want %q", got, want)
	}
	res := results("z:1", "y:1", "x:1", "w:1")
	if got, want := MissingSummary(res, 3), "4 of 6 images missing: w:1 (NotFound), x:1 (NotFound), y:1 (NotFound) and 1 more"; got != want {
		t.Errorf("MissingSummary = %q, want %q", got, want)
	}
	if got := fmt.Sprint(MissingSummary(results(), 3)); got != "0 of 2 images missing" {
		t.Errorf("MissingSummary of none = %q", got)
	}
}
