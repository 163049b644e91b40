package app

import (
	"context"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
)

func leaseActions(client *fake.Clientset) []string {
	var out []string
	for _, a := range client.Actions() {
		if a.GetResource().Resource == "leases" {
			out = append(out, a.GetVerb())
		}
	}
	return out
}

// With --max-concurrent-nodes a pass that pulls holds a slot Lease for the
// pulls and frees it after; a pass with every image present asks for none.
func TestGateHeldOnlyWhilePulling(t *testing.T) {
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 10})
	o := testOptions(cri.Path(), writeList(t, present, pullable))
	o.MaxConcurrentNodes, o.Namespace = 2, "prefetch"
	p, client, logs := newTestPrefetcher(t, o)
	if p.slots == nil {
		t.Fatal("no pull slots with --max-concurrent-nodes=2")
	}
	rep, err := p.pass(context.Background())
	if err != nil || rep.State != nodelabel.Succeeded {
		t.Fatalf("pass: %v %s\n%s", err, rep.State, logs)
	}
	leases, err := client.CoordinationV1().Leases("prefetch").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(leases.Items) != 1 || !strings.HasPrefix(leases.Items[0].Name, testInstance+"-pull-slot-") {
		t.Fatalf("leases %v", leases.Items)
	}
	if h := leases.Items[0].Spec.HolderIdentity; h != nil && *h != "" {
		t.Errorf("slot still held by %q after the pass", *h)
	}
	before := len(leaseActions(client))
	if _, err := p.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := leaseActions(client)[before:]; len(got) != 0 {
		t.Errorf("steady-state pass touched leases: %v", got)
	}
}

func TestGateOptionsValidated(t *testing.T) {
	o := testOptions("/nonexistent.sock", "/nonexistent.txt")
	o.MaxConcurrentNodes, o.Namespace = 3, ""
	if _, err := newPrefetcher(o, &strings.Builder{}, fake.NewClientset()); err == nil || !strings.Contains(err.Error(), "--namespace") {
		t.Errorf("no namespace: %v", err)
	}
	o.MaxConcurrentNodes = -1
	if _, err := newPrefetcher(o, &strings.Builder{}, fake.NewClientset()); err == nil {
		t.Error("negative --max-concurrent-nodes accepted")
	}
	o = testOptions("/nonexistent.sock", "/nonexistent.txt")
	if p, err := newPrefetcher(o, &strings.Builder{}, fake.NewClientset()); err != nil || p.slots != nil {
		t.Errorf("default: pull slots %v, err %v", p.slots, err)
	}
}
