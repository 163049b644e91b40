package progress

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

const (
	// LeaseHeader is the gRPC metadata key containerd reads a request's lease
	// from. CRI hands the PullImage request's context down to the pull, so
	// the pull runs under that lease instead of one of its own (containerd
	// 1.6 and 2.x; the e2e tests check it).
	LeaseHeader = "containerd-lease"
	// LeasePrefix starts the ID of every lease the agent makes.
	LeasePrefix = "image-prefetcher-"
	// LeaseImageLabel and LeaseInstanceLabel say on a lease which image and
	// instance it is for (`ctr -n k8s.io leases ls`).
	LeaseImageLabel    = nodelabel.Domain + "/image"
	LeaseInstanceLabel = nodelabel.Domain + "/instance"
	// LeaseOwnerLabel names the process that made the lease (Owner): two
	// processes of one instance on a node (run and a fetch beside it) share
	// the lease of an image they both pull, and only its maker deletes it
	// while the image is not present.
	LeaseOwnerLabel = nodelabel.Domain + "/owner"
	// StaleAfter: a lease another process made this long ago is no longer
	// followed by it (no pass holds an image that long by default: the
	// pass deadline is 20 minutes), so any process of the instance may
	// delete it.
	StaleAfter = time.Hour
	// expireLabel is the label containerd's garbage collection deletes an
	// expired lease by.
	expireLabel = "containerd.io/gc.expire"
	// LeaseLifetime is how long a lease lives: what it holds of an image not
	// yet pulled stays for the next pass to resume from, and goes once the
	// lease expires.
	LeaseLifetime = 24 * time.Hour
	// renewAfter: an older lease is replaced rather than reused, so that it
	// cannot expire in the middle of a pull.
	renewAfter = LeaseLifetime / 2
	// maxManifestSize bounds the blobs read to find the image's manifest
	// (and so its total size). Manifests are a few KiB.
	maxManifestSize = 1 << 20
)

// Containerd is a Source on containerd's leases and content API, in the
// namespace CRI uses. Each image gets a lease of its own, named from the
// instance and the image, which its PullImage calls carry (Bind): everything
// the pulls fetch is held by it and listed under it.
type Containerd struct {
	leases  leasesapi.LeasesClient
	content contentapi.ContentClient
	// Instance is part of each lease's name, so two instances pulling the
	// same image keep leases of their own.
	Instance string
	// Owner names this process on its leases (LeaseOwnerLabel); set it
	// before the first Open.
	Owner string
	// Slots: images pulled one after another share slot leases, so that a
	// pull costs no call of its own (see slots.go); set it before the first
	// Open. Off, each image gets its own lease at Open.
	Slots bool

	mu     sync.Mutex
	leased map[string]*leaseState // by lease ID
	// idle are the slot leases free for the next image.
	idle []string
	// known are the images whose own lease (LeaseID) exists, as far as this
	// process saw; nil until listed.
	known  map[string]bool
	loadMu sync.Mutex // one listing at a time
}

var _ Source = (*Containerd)(nil)

// leaseState caches what does not change of a lease's blobs.
type leaseState struct {
	opened time.Time
	// deletable: this process made the lease, or its maker made it more
	// than StaleAfter ago.
	deletable bool
	blobs     map[string]blob // by digest
	// ingested are the digests seen being fetched under the lease.
	ingested map[string]bool
	// total is the size of the manifests found among the blobs and of what
	// they describe.
	total int64
	// described are the blobs a manifest found names: no need to read them.
	described map[string]bool
	// slot: a slot lease, lent to image (slots.go).
	slot  bool
	image string
}

type blob struct {
	size    int64
	fetched bool // written under the lease, not found on the node already
	// prior: in a slot lease from before the image took it (an earlier
	// image's); not the image's at all.
	prior bool
}

// NewContainerd returns a Containerd on the runtime's connection
// (cri.Client.Conn), which its owner closes.
func NewContainerd(conn grpc.ClientConnInterface, instance string) *Containerd {
	return &Containerd{leases: leasesapi.NewLeasesClient(conn), content: contentapi.NewContentClient(conn),
		Instance: instance, leased: map[string]*leaseState{}}
}

// LeaseID is the lease of instance's pulls of image: stable, so that the
// next pass finds what an unfinished one left.
func LeaseID(instance, image string) string {
	sum := sha256.Sum256([]byte(instance + "\x00" + image))
	return LeasePrefix + hex.EncodeToString(sum[:16])
}

func namespaced(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, pin.NamespaceHeader, pin.Namespace)
}

// Open makes the image's lease, or reuses the one an earlier pass left
// (fresh is then false: it may hold what that pass fetched).
//
// With Slots, an image that has no lease of its own gets a slot lease instead
// (always fresh); see slots.go.
func (c *Containerd) Open(ctx context.Context, image string) (key string, fresh bool, err error) {
	ctx = namespaced(ctx)
	if c.Slots {
		if key, ok, err := c.openSlot(ctx, image); ok || err != nil {
			return key, true, err
		}
	}
	id := LeaseID(c.Instance, image)
	opened := time.Now()
	create := func() error {
		_, err := c.leases.Create(ctx, &leasesapi.CreateRequest{ID: id, Labels: c.labels(LeaseImageLabel, image, opened)})
		return err
	}
	err = create()
	if status.Code(err) == codes.AlreadyExists {
		// An earlier pass left it: reuse it unless it could expire during
		// this pull.
		var list *leasesapi.ListResponse
		if list, err = c.leases.List(ctx, &leasesapi.ListRequest{Filters: []string{fmt.Sprintf("id==%q", id)}}); err != nil {
			return "", false, apiError("list leases", err)
		}
		for _, l := range list.GetLeases() {
			if l.GetID() == id && time.Since(l.GetCreatedAt().AsTime()) < renewAfter {
				c.remember(id, image, opened, c.deletable(l))
				return id, false, nil
			}
		}
		if _, err := c.leases.Delete(ctx, &leasesapi.DeleteRequest{ID: id}); err != nil && status.Code(err) != codes.NotFound {
			return "", false, apiError("replace old lease "+id, err)
		}
		err = create()
	}
	if err != nil {
		return "", false, apiError("create lease "+id, err)
	}
	c.remember(id, image, opened, true)
	return id, true, nil
}

// labels are those of a lease made at opened: key=value, the expiry, the
// instance and the owner.
func (c *Containerd) labels(key, value string, opened time.Time) map[string]string {
	labels := map[string]string{
		key:         value,
		expireLabel: opened.Add(LeaseLifetime).UTC().Format(time.RFC3339),
	}
	if c.Instance != "" {
		labels[LeaseInstanceLabel] = c.Instance
	}
	if c.Owner != "" {
		labels[LeaseOwnerLabel] = c.Owner
	}
	return labels
}

func (c *Containerd) remember(id, image string, opened time.Time, deletable bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.leased[id] = newLeaseState(image, opened, deletable)
	if c.known != nil {
		c.known[image] = true
	}
}

func newLeaseState(image string, opened time.Time, deletable bool) *leaseState {
	return &leaseState{opened: opened, deletable: deletable, image: image, blobs: map[string]blob{}, ingested: map[string]bool{},
		described: map[string]bool{}}
}

// deletable reports whether this process may delete l while its image is not
// present: it made it, or its maker stopped following it long ago (a process
// that ended: a restarted agent's predecessor, a finished fetch).
func (c *Containerd) deletable(l *leasesapi.Lease) bool {
	return l.GetLabels()[LeaseOwnerLabel] == c.Owner || time.Since(l.GetCreatedAt().AsTime()) > StaleAfter
}

// apiError marks the errors of a runtime that does not serve the API.
func apiError(what string, err error) error {
	if status.Code(err) == codes.Unimplemented {
		return fmt.Errorf("%s: %w: %w", what, ErrUnsupported, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// errReleased: the key was released (or never opened).
var errReleased = errors.New("lease released")

// Bind adds the lease header to the outgoing metadata of ctx.
func (c *Containerd) Bind(ctx context.Context, key string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, LeaseHeader, key)
}

// Poll lists the node's ingests once, then each lease's resources.
func (c *Containerd) Poll(ctx context.Context, keys []string) (Snapshot, error) {
	ctx = namespaced(ctx)
	st, err := c.content.ListStatuses(ctx, &contentapi.ListStatusesRequest{})
	if err != nil {
		return Snapshot{Transfers: map[string]State{}}, apiError("list ingests", err)
	}
	snap := Snapshot{Transfers: make(map[string]State, len(keys)), Node: make(map[string]int64, len(st.GetStatuses()))}
	expected := map[string]string{} // ingest ref -> digest
	for _, s := range st.GetStatuses() {
		snap.Node[s.GetRef()] = s.GetOffset()
		expected[s.GetRef()] = s.GetExpected()
	}
	var errs []error
	for _, key := range keys {
		state, err := c.state(ctx, key, snap.Node, expected)
		if errors.Is(err, errReleased) {
			continue // released while the poll ran: nobody asks for it
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		snap.Transfers[key] = state
	}
	return snap, errors.Join(errs...)
}

// state reads one lease: its open ingests (bytes from the node's list) and
// its blobs (sizes from Info, once each).
func (c *Containerd) state(ctx context.Context, key string, node map[string]int64, expected map[string]string) (State, error) {
	c.mu.Lock()
	ls := c.leased[key]
	c.mu.Unlock()
	if ls == nil {
		return State{}, errReleased
	}
	res, err := c.leases.ListResources(ctx, &leasesapi.ListResourcesRequest{ID: key})
	if err != nil {
		return State{}, apiError("lease "+key, err)
	}
	s := State{Ingests: map[string]int64{}}
	var digests []string
	for _, r := range res.GetResources() {
		switch r.GetType() {
		case "ingests":
			off, open := node[r.GetID()]
			if !open {
				continue // committed or aborted since
			}
			s.Ingests[r.GetID()] = off
			if d := expected[r.GetID()]; d != "" {
				c.mu.Lock()
				ls.ingested[d] = true
				c.mu.Unlock()
			}
		case "content":
			digests = append(digests, r.GetID())
		}
	}
	for _, d := range digests {
		b, err := c.blob(ctx, ls, d)
		if err != nil {
			if status.Code(err) == codes.NotFound {
				continue
			}
			return State{}, fmt.Errorf("lease %s: blob %s: %w", key, d, err)
		}
		if b.prior {
			continue
		}
		s.Blobs++
		if b.fetched {
			s.Fetched += b.size
		} else {
			s.Present += b.size
		}
	}
	c.mu.Lock()
	s.Total = ls.total
	c.mu.Unlock()
	return s, nil
}

// blob returns what is known of digest under ls, asking containerd the first
// time. A small blob is read once to see whether it is the image's manifest,
// whose descriptors give the image's total size.
func (c *Containerd) blob(ctx context.Context, ls *leaseState, digest string) (blob, error) {
	c.mu.Lock()
	b, ok := ls.blobs[digest]
	ingested, described := ls.ingested[digest], ls.described[digest]
	c.mu.Unlock()
	if ok {
		return b, nil
	}
	info, err := c.content.Info(ctx, &contentapi.InfoRequest{Digest: digest})
	if err != nil {
		return blob{}, err
	}
	// A blob counts as fetched when it was seen being fetched under the
	// lease, or committed after the lease was opened (small blobs are often
	// committed between two polls). Older ones were on the node already.
	created := info.GetInfo().GetCreatedAt().AsTime()
	b = blob{size: info.GetInfo().GetSize(), fetched: ingested || !created.Before(ls.opened.Add(-time.Second))}
	if ls.slot {
		// No slack in a slot: an earlier image committed its blobs just
		// before this one took the slot. Older ones were not added by this
		// image's pulls, or were found on the node (not counted either).
		b.fetched = ingested || !created.Before(ls.opened)
		b.prior = !b.fetched
	}
	var total int64
	var names []string
	if b.size <= maxManifestSize && !described && !b.prior {
		total, names = c.manifestTotal(ctx, digest, b.size)
	}
	c.mu.Lock()
	ls.blobs[digest] = b
	ls.total += total
	for _, n := range names {
		ls.described[n] = true
	}
	c.mu.Unlock()
	return b, nil
}

// manifest is the part of an OCI or Docker image manifest or index that
// gives sizes.
type manifest struct {
	Config    *descriptor  `json:"config"`
	Layers    []descriptor `json:"layers"`
	Manifests []descriptor `json:"manifests"`
}

type descriptor struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

// peekSize is how much of a blob is read to tell JSON (a manifest, maybe)
// from a layer.
const peekSize = 64

// manifestTotal returns ManifestTotal of digest and the blobs it names (no
// need to read those). Only a blob that starts like a JSON document is read
// whole.
func (c *Containerd) manifestTotal(ctx context.Context, digest string, size int64) (int64, []string) {
	head, err := c.read(ctx, digest, 0, min(size, peekSize))
	if err != nil || !bytes.HasPrefix(bytes.TrimLeft(head, " \t\r\n"), []byte("{")) {
		return 0, nil
	}
	data, err := c.read(ctx, digest, 0, size)
	if err != nil {
		return 0, nil
	}
	var m manifest
	if json.Unmarshal(data, &m) != nil {
		return 0, nil
	}
	var names []string
	if m.Config != nil {
		names = append(names, m.Config.Digest)
	}
	for _, l := range m.Layers {
		names = append(names, l.Digest)
	}
	return ManifestTotal(data), names
}

// ManifestTotal returns the bytes an image manifest or index stands for:
// a manifest with its config and layers, an index alone; 0 for other blobs.
func ManifestTotal(data []byte) int64 {
	var m manifest
	if json.Unmarshal(data, &m) != nil {
		return 0
	}
	switch {
	case m.Config != nil && m.Layers != nil:
		n := int64(len(data)) + m.Config.Size
		for _, l := range m.Layers {
			n += l.Size
		}
		return n
	case len(m.Manifests) > 0:
		return int64(len(data))
	}
	return 0
}

// read returns size bytes of digest from offset.
func (c *Containerd) read(ctx context.Context, digest string, offset, size int64) ([]byte, error) {
	stream, err := c.content.Read(ctx, &contentapi.ReadContentRequest{Digest: digest, Offset: offset, Size: size})
	if err != nil {
		return nil, err
	}
	data := make([]byte, 0, size)
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return data, nil
		}
		if err != nil {
			return nil, err
		}
		data = append(data, msg.GetData()...)
		if int64(len(data)) > size {
			return nil, fmt.Errorf("blob %s: more than the %d bytes asked for", digest, size)
		}
	}
}

// Release deletes the lease of a pulled image: the image's own record holds
// its content from then on. It deletes the lease of an image that failed for
// good too (its partial blobs would only hold disk space the kubelet cannot
// reclaim). An image that failed otherwise keeps its lease, and with it the
// partial blobs the next pass resumes from, until the image leaves the list
// (Prune) or the lease expires; unless the lease holds nothing, which would
// only linger. While the image is not present, only a lease this process may
// delete (deletable) goes: another process of the instance may be pulling
// under it.
func (c *Containerd) Release(ctx context.Context, key string, end pull.TransferEnd) error {
	c.mu.Lock()
	st := c.leased[key]
	delete(c.leased, key)
	c.mu.Unlock()
	ctx = namespaced(ctx)
	if st != nil && st.slot {
		return c.releaseSlot(ctx, key, st, end)
	}
	if end != pull.TransferPulled {
		if st == nil || !st.deletable {
			return nil
		}
	}
	if end == pull.TransferFailed {
		res, err := c.leases.ListResources(ctx, &leasesapi.ListResourcesRequest{ID: key})
		if err != nil || len(res.GetResources()) > 0 {
			return nil // kept for the next pass (or gone already)
		}
	}
	if _, err := c.leases.Delete(ctx, &leasesapi.DeleteRequest{ID: key}); err != nil && status.Code(err) != codes.NotFound {
		return fmt.Errorf("delete lease %s: %w", key, err)
	}
	if st != nil {
		c.forget(st.image)
	}
	return nil
}

// Prune deletes this instance's leases of images that are not in images (they
// left the list: what their failed pulls kept would otherwise hold disk space
// until the lease expires) and returns the images whose leases it deleted.
// Leases this process follows right now are left alone, and so are those
// another process made less than StaleAfter ago (a fetch beside run may be
// pulling a list of its own).
func (c *Containerd) Prune(ctx context.Context, images []string) ([]string, error) {
	if c.Instance == "" {
		return nil, nil
	}
	ctx = namespaced(ctx)
	list, err := c.leases.List(ctx, &leasesapi.ListRequest{Filters: []string{c.instanceFilter()}})
	if err != nil {
		return nil, apiError("list leases", err)
	}
	keep := make(map[string]bool, len(images))
	for _, img := range images {
		keep[img] = true
	}
	c.setKnown(list.GetLeases())
	var pruned []string
	var errs []error
	for _, l := range list.GetLeases() {
		img := l.GetLabels()[LeaseImageLabel]
		c.mu.Lock()
		_, following := c.leased[l.GetID()]
		c.mu.Unlock()
		if l.GetLabels()[LeaseSlotLabel] != "" {
			errs = append(errs, c.pruneSlot(ctx, l, following))
			continue
		}
		// Only the leases this code makes: its ID for the instance and image.
		if keep[img] || following || l.GetID() != LeaseID(c.Instance, img) || !c.deletable(l) {
			continue
		}
		if _, err := c.leases.Delete(ctx, &leasesapi.DeleteRequest{ID: l.GetID()}); err != nil && status.Code(err) != codes.NotFound {
			errs = append(errs, fmt.Errorf("delete lease %s of %s: %w", l.GetID(), img, err))
			continue
		}
		pruned = append(pruned, img)
		c.forget(img)
	}
	return pruned, errors.Join(errs...)
}

// instanceFilter selects this instance's leases in a List.
func (c *Containerd) instanceFilter() string {
	return fmt.Sprintf("labels.%q==%q", LeaseInstanceLabel, c.Instance)
}

// Held sums what containerd holds under this instance's leases: the blobs
// committed under them and the bytes of their partial downloads. After a pass
// those are the leases of images that failed and are kept for a resume: disk
// the kubelet's image GC cannot reclaim.
func (c *Containerd) Held(ctx context.Context) (int64, error) {
	held, err := c.holdings(ctx)
	var n int64
	for _, h := range held {
		n += h.bytes
	}
	return n, err
}

// holding is one of this instance's leases and the bytes it alone adds.
type holding struct {
	lease *leasesapi.Lease
	bytes int64
}

// holdings lists this instance's leases, oldest first, with what each holds
// (a blob two leases hold counts for the older one).
func (c *Containerd) holdings(ctx context.Context) ([]holding, error) {
	if c.Instance == "" {
		return nil, nil
	}
	ctx = namespaced(ctx)
	list, err := c.leases.List(ctx, &leasesapi.ListRequest{Filters: []string{c.instanceFilter()}})
	if err != nil {
		return nil, apiError("list leases", err)
	}
	if len(list.GetLeases()) == 0 {
		return nil, nil
	}
	st, err := c.content.ListStatuses(ctx, &contentapi.ListStatusesRequest{})
	if err != nil {
		return nil, apiError("list ingests", err)
	}
	offsets := make(map[string]int64, len(st.GetStatuses()))
	for _, s := range st.GetStatuses() {
		offsets[s.GetRef()] = s.GetOffset()
	}
	leases := slices.Clone(list.GetLeases())
	slices.SortStableFunc(leases, func(a, b *leasesapi.Lease) int {
		return a.GetCreatedAt().AsTime().Compare(b.GetCreatedAt().AsTime())
	})
	var out []holding
	counted := map[string]bool{} // two leases may hold one blob
	for _, l := range leases {
		res, err := c.leases.ListResources(ctx, &leasesapi.ListResourcesRequest{ID: l.GetID()})
		if err != nil {
			if status.Code(err) == codes.NotFound {
				continue // deleted since it was listed
			}
			return out, fmt.Errorf("lease %s: %w", l.GetID(), err)
		}
		h := holding{lease: l}
		for _, r := range res.GetResources() {
			k := r.GetType() + "\x00" + r.GetID()
			if counted[k] {
				continue
			}
			counted[k] = true
			switch r.GetType() {
			case "ingests":
				h.bytes += offsets[r.GetID()]
			case "content":
				info, err := c.content.Info(ctx, &contentapi.InfoRequest{Digest: r.GetID()})
				if err == nil {
					h.bytes += info.GetInfo().GetSize()
				}
			}
		}
		out = append(out, h)
	}
	return out, nil
}

// Trim bounds what this instance's leases of failed images keep for a resume:
// while they hold more than limit bytes it deletes them, oldest first (the
// image failing longest), and returns the images let go and the bytes still
// held. Leases this process follows right now, slot leases and another
// process's leases younger than StaleAfter are left alone, as in Prune.
func (c *Containerd) Trim(ctx context.Context, limit int64) ([]string, int64, error) {
	held, err := c.holdings(ctx)
	if err != nil {
		return nil, 0, err
	}
	var total int64
	for _, h := range held {
		total += h.bytes
	}
	ctx = namespaced(ctx)
	var trimmed []string
	var errs []error
	for _, h := range held {
		if total <= limit {
			break
		}
		l := h.lease
		img := l.GetLabels()[LeaseImageLabel]
		c.mu.Lock()
		_, following := c.leased[l.GetID()]
		c.mu.Unlock()
		if h.bytes == 0 || following || l.GetLabels()[LeaseSlotLabel] != "" || l.GetID() != LeaseID(c.Instance, img) || !c.deletable(l) {
			continue
		}
		if _, err := c.leases.Delete(ctx, &leasesapi.DeleteRequest{ID: l.GetID()}); err != nil && status.Code(err) != codes.NotFound {
			errs = append(errs, fmt.Errorf("delete lease %s of %s: %w", l.GetID(), img, err))
			continue
		}
		total -= h.bytes
		trimmed = append(trimmed, img)
		c.forget(img)
	}
	return trimmed, total, errors.Join(errs...)
}
