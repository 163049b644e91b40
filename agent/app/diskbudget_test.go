package app

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/diskbudget"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// A pass that reaches the disk budget stops pulling: the images pulled before
// stay, the others fail with DiskBudget, the node says failed, and the log
// and the node's events name the filesystem, the budget and the bytes to
// free. The image filesystem here is 4 MiB, filled by the fake runtime's
// 1 MiB pulls, with a budget of 60 %: the fourth pull would start at 75 %.
func TestPassStopsPullingAtTheDiskBudget(t *testing.T) {
	cri := critest.Start(t)
	refs := make([]string, 5)
	for i := range refs {
		refs[i] = fmt.Sprintf("docker.io/library/app%d:1", i)
	}
	o := testOptions(cri.Path(), writeList(t, refs...))
	o.Pull.MaxParallel = 1
	o.DiskBudget.Percent = 60
	p, client, logs := newTestPrefetcher(t, o)
	const capacity = 4 * critest.DefaultPullSize
	var asked []string
	p.statfs = func(path string) (diskbudget.Space, error) {
		asked = append(asked, path)
		info, err := cri.ImageFsInfo(context.Background(), nil)
		if err != nil {
			return diskbudget.Space{}, err
		}
		used := info.GetImageFilesystems()[0].GetUsedBytes().GetValue()
		return diskbudget.Space{Capacity: capacity, Available: capacity - min(used, capacity)}, nil
	}
	rep, err := p.pass(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.State != nodelabel.Failed {
		t.Errorf("state %s, want failed", rep.State)
	}
	for i, r := range rep.Results {
		want, reason := pull.OutcomePulled, pull.ReasonNone
		if i >= 3 {
			want, reason = pull.OutcomeFailed, pull.ReasonDiskBudget
		}
		if r.Outcome != want || r.Reason != reason {
			t.Errorf("%s: %s %s, want %s %s", r.Image, r.Outcome, r.Reason, want, reason)
		}
	}
	if n := cri.PullCalls(refs[3]) + cri.PullCalls(refs[4]); n != 0 {
		t.Errorf("%d PullImage calls past the budget, want 0", n)
	}
	if len(asked) == 0 || asked[0] != "/host/var/lib/critest" {
		t.Errorf("statfs asked for %v, want the runtime's image filesystem below --host-root", asked)
	}
	if labels, _ := nodeLabels(t, client); labels[nodelabel.Key(testInstance)] != string(nodelabel.Failed) {
		t.Errorf("label %q, want failed", labels[nodelabel.Key(testInstance)])
	}
	const why = "image filesystem /var/lib/critest is 75% full (3.0 MiB used of 4.0 MiB), at or over the disk budget of 60% (2.4 MiB, --disk-budget-percent): no pull starts until 0.6 MiB are freed"
	found := false
	for _, e := range nodeEvents(t, client) {
		found = found || (strings.Contains(e.Message, refs[3]) && strings.Contains(e.Message, why))
	}
	if !found {
		t.Errorf("no node event names %s and says %q", refs[3], why)
	}
	if !strings.Contains(logs.String(), "disk budget") || !strings.Contains(logs.String(), "reason=DiskBudget images=2") {
		t.Errorf("the log does not say once that 2 images met the disk budget:\n%s", logs)
	}
}

// A budget whose filesystem the agent cannot see (not mounted below
// --host-root) is said once, and the pulls go on.
func TestUnreadableDiskBudgetLetsPullsGo(t *testing.T) {
	cri := critest.Start(t)
	o := testOptions(cri.Path(), writeList(t, "docker.io/library/app:1"))
	o.HostRoot = t.TempDir()
	p, _, logs := newTestPrefetcher(t, o)
	for range 2 {
		if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
			t.Fatalf("pass: %s, %v; want succeeded", rep.State, err)
		}
		cri.DeleteImage("docker.io/library/app:1")
	}
	if n := strings.Count(logs.String(), "disk budget not in force"); n != 1 {
		t.Errorf("said %d times that the budget is not in force, want once:\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), "/var/lib/critest (as "+o.HostRoot+"/var/lib/critest)") {
		t.Errorf("the log does not name the filesystem and where it was looked for:\n%s", logs)
	}
}
