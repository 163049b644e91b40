package progress

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Slot leases. A lease of its own per image costs two calls (create, delete)
// that, for a small image, are as many as its pull itself: most of what
// following progress cost a pass of small images. With Containerd.Slots, an
// image that has no lease of its own borrows a slot lease: one of a few
// leases that images pulled one after another share, made when none is free
// and deleted at the end of the pass (Drain). A pulled image gives its slot
// back as it is: the image's record holds its content from then on, so the
// slot's reference to it is redundant until the pass ends. Only an image that
// failed costs calls:
//   - for good: its slot is deleted (what it fetched would only hold disk);
//   - otherwise: what it fetched is moved to its own lease (LeaseID, labelled
//     like one made by Open), which the next pass resumes from and Prune and
//     Held see, and its slot is deleted. An image that fetched nothing gives
//     its slot back.
//
// An image whose own lease exists (an earlier pass left it) does not borrow a
// slot: Open reuses that lease as without slots. The images with a lease are
// listed once (the first Open) and then kept up to date by this process's
// own calls and by each Prune's listing.
//
// A slot's blobs from before the image took it are an earlier image's: its
// state leaves out the blobs committed before then (blob.prior).

// LeaseSlotLabel marks a slot lease.
const LeaseSlotLabel = nodelabel.Domain + "/slot"

// openSlot lends image a slot lease, unless image has a lease of its own
// (ok false: Open uses that one).
func (c *Containerd) openSlot(ctx context.Context, image string) (key string, ok bool, err error) {
	if err := c.loadKnown(ctx); err != nil {
		return "", false, err
	}
	c.mu.Lock()
	if c.known[image] {
		c.mu.Unlock()
		return "", false, nil
	}
	var id string
	if n := len(c.idle); n > 0 {
		id, c.idle = c.idle[n-1], c.idle[:n-1]
	}
	c.mu.Unlock()
	if id == "" {
		id = LeasePrefix + "slot-" + randomHex()
		labels := c.labels(LeaseSlotLabel, "true", time.Now())
		if _, err := c.leases.Create(ctx, &leasesapi.CreateRequest{ID: id, Labels: labels}); err != nil {
			return "", true, apiError("create slot lease "+id, err)
		}
	}
	st := newLeaseState(image, time.Now(), true)
	st.slot = true
	c.mu.Lock()
	c.leased[id] = st
	c.mu.Unlock()
	return id, true, nil
}

func randomHex() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}

// loadKnown lists the images that have a lease of their own, once.
func (c *Containerd) loadKnown(ctx context.Context) error {
	c.loadMu.Lock()
	defer c.loadMu.Unlock()
	c.mu.Lock()
	loaded := c.known != nil
	c.mu.Unlock()
	if loaded {
		return nil
	}
	req := &leasesapi.ListRequest{}
	if c.Instance != "" {
		req.Filters = []string{c.instanceFilter()}
	}
	list, err := c.leases.List(ctx, req)
	if err != nil {
		return apiError("list leases", err)
	}
	c.setKnown(list.GetLeases())
	return nil
}

// setKnown takes the images with a lease of their own from a listing.
func (c *Containerd) setKnown(leases []*leasesapi.Lease) {
	known := map[string]bool{}
	for _, l := range leases {
		if img := l.GetLabels()[LeaseImageLabel]; img != "" && l.GetID() == LeaseID(c.Instance, img) {
			known[img] = true
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.known = known
}

// forget notes that image's own lease is gone.
func (c *Containerd) forget(image string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.known, image)
}

// releaseSlot ends st's loan of slot id (see the comment at the top).
func (c *Containerd) releaseSlot(ctx context.Context, id string, st *leaseState, end pull.TransferEnd) error {
	switch end {
	case pull.TransferPulled:
		c.giveBack(id)
		return nil
	case pull.TransferFailed:
		moved, err := c.promote(ctx, id, st)
		if err != nil {
			// The slot keeps what the image fetched; Prune deletes it
			// once it is stale.
			return err
		}
		if !moved {
			c.giveBack(id)
			return nil
		}
	}
	if _, err := c.leases.Delete(ctx, &leasesapi.DeleteRequest{ID: id}); err != nil && status.Code(err) != codes.NotFound {
		return fmt.Errorf("delete slot lease %s: %w", id, err)
	}
	return nil
}

func (c *Containerd) giveBack(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.idle = append(c.idle, id)
}

// promote moves what st's image fetched under slot id (its partial blobs, and
// the blobs committed since it took the slot) to the image's own lease, made
// if need be. It reports whether there was anything to move.
func (c *Containerd) promote(ctx context.Context, id string, st *leaseState) (bool, error) {
	res, err := c.leases.ListResources(ctx, &leasesapi.ListResourcesRequest{ID: id})
	if err != nil {
		return false, fmt.Errorf("slot lease %s of %s: %w", id, st.image, err)
	}
	var mine []*leasesapi.Resource
	for _, r := range res.GetResources() {
		switch r.GetType() {
		case "ingests":
			// An earlier image's ingests were committed before it gave
			// the slot back: the open ones are this image's.
			mine = append(mine, r)
		case "content":
			b, err := c.blob(ctx, st, r.GetID())
			if status.Code(err) == codes.NotFound {
				continue
			}
			if err != nil {
				return false, fmt.Errorf("slot lease %s of %s: blob %s: %w", id, st.image, r.GetID(), err)
			}
			if !b.prior {
				mine = append(mine, r)
			}
		}
	}
	if len(mine) == 0 {
		return false, nil
	}
	own := LeaseID(c.Instance, st.image)
	_, err = c.leases.Create(ctx, &leasesapi.CreateRequest{ID: own, Labels: c.labels(LeaseImageLabel, st.image, time.Now())})
	if err != nil && status.Code(err) != codes.AlreadyExists {
		return false, apiError("create lease "+own, err)
	}
	for _, r := range mine {
		if _, err := c.leases.AddResource(ctx, &leasesapi.AddResourceRequest{ID: own, Resource: r}); err != nil {
			return false, fmt.Errorf("lease %s of %s: add %s %s: %w", own, st.image, r.GetType(), r.GetID(), err)
		}
	}
	c.mu.Lock()
	if c.known != nil {
		c.known[st.image] = true
	}
	c.mu.Unlock()
	return true, nil
}

// Drain deletes the slot leases no image holds. Call it at the end of a pass,
// before Prune and Held: what they hold are images pulled in the pass, which
// hold their content themselves.
func (c *Containerd) Drain(ctx context.Context) error {
	c.mu.Lock()
	idle := c.idle
	c.idle = nil
	c.mu.Unlock()
	ctx = namespaced(ctx)
	var errs []error
	for _, id := range idle {
		if _, err := c.leases.Delete(ctx, &leasesapi.DeleteRequest{ID: id}); err != nil && status.Code(err) != codes.NotFound {
			errs = append(errs, fmt.Errorf("delete slot lease %s: %w", id, err))
		}
	}
	return errors.Join(errs...)
}

// pruneSlot deletes slot lease l of the instance when nobody can be using it:
// not lent or idle here, and this process made it (a slot whose image's
// fetched part could not be moved) or its maker made it more than StaleAfter
// ago (a process that ended without draining).
func (c *Containerd) pruneSlot(ctx context.Context, l *leasesapi.Lease, following bool) error {
	c.mu.Lock()
	idle := false
	for _, id := range c.idle {
		idle = idle || id == l.GetID()
	}
	c.mu.Unlock()
	if following || idle || !c.deletable(l) {
		return nil
	}
	if _, err := c.leases.Delete(ctx, &leasesapi.DeleteRequest{ID: l.GetID()}); err != nil && status.Code(err) != codes.NotFound {
		return fmt.Errorf("delete slot lease %s: %w", l.GetID(), err)
	}
	return nil
}
