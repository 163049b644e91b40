package pin_test

import (
	"context"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/pin/pintest"
)

// Pin pins one record as Reconcile would, and Reconcile afterwards finds it
// done: no write, and nothing released.
func TestPinOneRecord(t *testing.T) {
	t.Parallel()
	srv := pintest.Start(t)
	srv.Add(imgA, criLabels)
	srv.Add(sandbox, map[string]string{pin.PinLabel: pin.PinValue})
	p := newPinner(t, srv, "team")
	ctx := context.Background()

	for name, want := range map[string]pin.Action{imgA: pin.Set, sandbox: pin.Claimed} {
		if got, err := p.Pin(ctx, name); err != nil || got != want {
			t.Errorf("Pin(%s) = %q, %v; want %q", name, got, err, want)
		}
		if got, err := p.Pin(ctx, name); err != nil || got != "" {
			t.Errorf("Pin(%s) again = %q, %v; want nothing to do", name, got, err)
		}
	}
	l, _ := srv.Labels(imgA)
	if l[pin.PinLabel] != pin.PinValue || l[pin.OwnerLabel("team")] == "" || l[pin.SetLabel] == "" || l["io.cri-containerd.image"] != "managed" {
		t.Errorf("labels of %s after Pin: %v", imgA, l)
	}
	updates := srv.Updates()
	rep, err := p.Reconcile(ctx, []string{imgA, sandbox}, nil)
	if err != nil || len(rep.Changes) != 0 || rep.Pinned != 2 || srv.Updates() != updates {
		t.Errorf("Reconcile after Pin: %+v, %v, %d writes; want nothing to do", rep, err, srv.Updates()-updates)
	}

	if _, err := p.Pin(ctx, imgC); status.Code(err) != codes.NotFound {
		t.Errorf("Pin of a record that does not exist: %v, want NotFound", err)
	}
}
