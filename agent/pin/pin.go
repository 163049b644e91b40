// Package pin keeps the images of a list on a containerd node against the
// kubelet's image garbage collection. The kubelet never collects an image that
// CRI reports pinned, and containerd's CRI plugin reports pinned an image one of
// whose records carries the label io.cri-containerd.pinned=pinned (honoured
// from containerd 1.6.25, 1.7.10 and 2.0). CRI itself cannot set that label,
// so this package sets it through containerd's own images API, which containerd
// serves on the same socket as CRI.
//
// Each instance of image-prefetcher also marks the records it wants pinned with
// a label of its own, and the pin label is marked as set by image-prefetcher
// when it was absent before, so that an instance letting go of an image removes
// the pin only when no instance still wants it and only when image-prefetcher
// set it: a pin set by anyone else (containerd pins its sandbox image itself)
// is never removed.
//
// containerd 2.x replaces a record's labels whenever it pulls the image again
// (its transfer service updates the whole record), which drops the pin and the
// marks together; the next Reconcile sets them again.
package pin

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	"github.com/distribution/reference"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
)

const (
	// Namespace is the containerd namespace that holds the images CRI pulls.
	Namespace = "k8s.io"
	// NamespaceHeader is the gRPC metadata key containerd reads the namespace
	// of a request from.
	NamespaceHeader = "containerd-namespace"

	// PinLabel=PinValue on an image record makes containerd's CRI report the
	// image pinned.
	PinLabel = "io.cri-containerd.pinned"
	PinValue = "pinned"

	// ownerDomain prefixes the ownership label of each instance.
	ownerDomain = "pinned." + nodelabel.Domain
	// ownerValue is the value of an ownership label; only its presence counts.
	ownerValue = "true"
	// SetLabel marks a pin label that image-prefetcher set (the label was
	// absent when an instance asked for the pin). Only such a pin is removed,
	// by the last instance that lets go of the image.
	SetLabel = nodelabel.Domain + "/pin-set"
	setValue = "true"
)

// OwnerLabel is the label that records that instance wants the image pinned.
func OwnerLabel(instance string) string { return ownerDomain + "/" + instance }

// isOwnerLabel reports whether key is the ownership label of any instance.
func isOwnerLabel(key string) bool { return strings.HasPrefix(key, ownerDomain+"/") }

// RecordName returns the name of the containerd image record that CRI keeps
// for a reference pulled through it: the fully qualified reference, with the
// tag dropped when a digest is given (CRI stores name:tag@digest as
// name@digest).
func RecordName(ref string) (string, error) {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return "", fmt.Errorf("image reference %q: %w", ref, err)
	}
	return named.String(), nil
}

// ErrUnsupported is returned when the socket serves no containerd images API
// (CRI-O, cri-dockerd, or a containerd without its images service).
var ErrUnsupported = errors.New("the runtime does not serve containerd's images API")

// Client calls containerd's images service in Namespace.
type Client struct {
	images imagesapi.ImagesClient
	// timeout bounds each call, so a runtime that hangs cannot hang a pass.
	timeout time.Duration
}

// DefaultTimeout bounds each call when none is given.
const DefaultTimeout = 5 * time.Second

// NewClient returns a client on the runtime's connection (cri.Client.Conn),
// which its owner closes.
func NewClient(conn grpc.ClientConnInterface, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Client{images: imagesapi.NewImagesClient(conn), timeout: timeout}
}

// call returns the context of one call: in Namespace, within the timeout.
func (c *Client) call(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx = metadata.AppendToOutgoingContext(ctx, NamespaceHeader, Namespace)
	return context.WithTimeout(ctx, c.timeout)
}

// get returns the record named name; a missing record is a NotFound error.
func (c *Client) get(ctx context.Context, name string) (*imagesapi.Image, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	resp, err := c.images.Get(ctx, &imagesapi.GetImageRequest{Name: name})
	if err != nil {
		return nil, err
	}
	return resp.GetImage(), nil
}

// withLabel lists the records that carry the label key, whatever its value.
func (c *Client) withLabel(ctx context.Context, key string) ([]*imagesapi.Image, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	// containerd's filter syntax: a quoted field name (the key holds dots and
	// a slash), and no operator, which matches any record that has the label.
	resp, err := c.images.List(ctx, &imagesapi.ListImagesRequest{Filters: []string{`labels."` + key + `"`}})
	if err != nil {
		if status.Code(err) == codes.Unimplemented {
			return nil, fmt.Errorf("%w: %w", ErrUnsupported, err)
		}
		return nil, err
	}
	return resp.GetImages(), nil
}

// setLabels sets (value not empty) or removes (value empty) the given labels
// of img and nothing else: the update mask names each label, so labels that
// CRI or anyone else keeps on the record are left alone.
func (c *Client) setLabels(ctx context.Context, img *imagesapi.Image, changes map[string]string) error {
	ctx, cancel := c.call(ctx)
	defer cancel()
	labels := map[string]string{}
	var paths []string
	for _, k := range slices.Sorted(maps.Keys(changes)) {
		paths = append(paths, "labels."+k)
		if v := changes[k]; v != "" {
			labels[k] = v
		}
	}
	// The target is sent although the mask leaves it unchanged: containerd
	// 2.x reads it from the request whatever the mask says, and a request
	// without one crashes it (2.2.1 panics on the nil descriptor and exits).
	_, err := c.images.Update(ctx, &imagesapi.UpdateImageRequest{
		Image:      &imagesapi.Image{Name: img.GetName(), Target: img.GetTarget(), Labels: labels},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: paths},
	})
	return err
}

// Action is what Reconcile did to one image record.
type Action string

const (
	// Set: the pin label was absent; it is set, marked as set by
	// image-prefetcher, and owned by this instance.
	Set Action = "set"
	// Repaired: this instance owned the record but its pin label was gone
	// (removed by hand, or the record was re-created); it is set again.
	Repaired Action = "repaired"
	// Claimed: the pin label was there already (another instance's, or a
	// pin image-prefetcher did not set); only this instance's ownership is
	// added, so letting go later leaves that pin as it is.
	Claimed Action = "claimed"
	// Released: this instance's ownership is removed and the pin stays,
	// because another instance still owns the record or the pin was not set
	// by image-prefetcher.
	Released Action = "released"
	// Unpinned: this instance was the last owner of a pin image-prefetcher
	// set: ownership, pin and its mark are removed, so the kubelet may
	// collect the image again.
	Unpinned Action = "unpinned"
)

// Change is one record Reconcile wrote.
type Change struct {
	Image  string // the record name
	Action Action
}

// Op says what failed: pinning an image of the list or letting go of one.
type Op string

const (
	OpPin     Op = "pin"
	OpRelease Op = "release"
)

// Failure is a record Reconcile could not bring to the wanted state.
type Failure struct {
	Image string
	Op    Op
	Err   error
}

// Report is the outcome of Reconcile.
type Report struct {
	// Pinned counts the records asked for that now carry the pin and this
	// instance's ownership.
	Pinned   int
	Changes  []Change
	Failures []Failure
}

// Pinner pins images for one instance.
type Pinner struct {
	Client   *Client
	Instance string
}

// Reconcile makes every record named in pin carry the pin label and this
// instance's ownership, and lets go of every record this instance owns whose
// name is not in keep (pin's names count as kept). Records are named as
// RecordName names them. With pin and keep empty it lets go of everything this
// instance pinned (the option turned off, or an empty list).
//
// It returns an error only when the records this instance owns cannot be
// listed (nothing is written then; ErrUnsupported when the socket has no
// containerd images API); a record that cannot be written is a Failure and
// the others are still done.
//
// containerd's images API has no compare-and-swap: an instance letting go of
// a record while another claims it at the same moment may leave it unpinned
// until the claiming instance's next Reconcile, which repairs it.
func (p *Pinner) Reconcile(ctx context.Context, pin, keep []string) (Report, error) {
	owner := OwnerLabel(p.Instance)
	owned, err := p.Client.withLabel(ctx, owner)
	if err != nil {
		return Report{}, fmt.Errorf("list the images pinned by instance %s: %w", p.Instance, err)
	}
	byName := make(map[string]*imagesapi.Image, len(owned))
	for _, img := range owned {
		byName[img.GetName()] = img
	}
	var rep Report
	wanted := map[string]bool{}
	for _, name := range keep {
		wanted[name] = true
	}
	done := map[string]bool{}
	for _, name := range pin {
		if done[name] {
			continue
		}
		done[name], wanted[name] = true, true
		action, err := p.pin(ctx, name, byName[name])
		if err != nil {
			rep.Failures = append(rep.Failures, Failure{Image: name, Op: OpPin, Err: err})
			continue
		}
		if action != "" {
			rep.Changes = append(rep.Changes, Change{Image: name, Action: action})
		}
		rep.Pinned++
	}
	for _, name := range slices.Sorted(maps.Keys(byName)) {
		if wanted[name] {
			continue
		}
		action, err := p.release(ctx, byName[name])
		if err != nil {
			rep.Failures = append(rep.Failures, Failure{Image: name, Op: OpRelease, Err: err})
			continue
		}
		rep.Changes = append(rep.Changes, Change{Image: name, Action: action})
	}
	return rep, nil
}

// pin makes the record named name carry the pin and this instance's
// ownership. img is the record as listed when this instance already owns it
// (nil otherwise: it is read first). The action is empty when nothing had to
// be written.
func (p *Pinner) pin(ctx context.Context, name string, img *imagesapi.Image) (Action, error) {
	if img == nil {
		var err error
		if img, err = p.Client.get(ctx, name); err != nil {
			if status.Code(err) == codes.NotFound {
				return "", fmt.Errorf("no containerd image record %s in namespace %s: %w", name, Namespace, err)
			}
			return "", fmt.Errorf("get image record %s: %w", name, err)
		}
	}
	labels := img.GetLabels()
	owner := OwnerLabel(p.Instance)
	mine := labels[owner] != ""
	pinned := labels[PinLabel] == PinValue
	var action Action
	changes := map[string]string{owner: ownerValue}
	switch {
	case pinned && mine:
		return "", nil
	case pinned:
		action = Claimed
	default:
		// Absent (or another value, which does not pin): ours from now on.
		action = Set
		if mine {
			action = Repaired
		}
		changes[PinLabel], changes[SetLabel] = PinValue, setValue
	}
	if err := p.Client.setLabels(ctx, img, changes); err != nil {
		return "", fmt.Errorf("label image record %s: %w", name, err)
	}
	return action, nil
}

// release removes this instance's ownership of img, and the pin with its mark
// when no other instance owns the record and image-prefetcher set the pin.
func (p *Pinner) release(ctx context.Context, img *imagesapi.Image) (Action, error) {
	labels := img.GetLabels()
	owner := OwnerLabel(p.Instance)
	others := false
	for k := range labels {
		if k != owner && isOwnerLabel(k) {
			others = true
		}
	}
	changes := map[string]string{owner: ""}
	action := Released
	if !others && labels[SetLabel] != "" {
		changes[PinLabel], changes[SetLabel] = "", ""
		action = Unpinned
	}
	if err := p.Client.setLabels(ctx, img, changes); err != nil {
		if status.Code(err) == codes.NotFound {
			// Removed since it was listed: nothing is pinned any more.
			return action, nil
		}
		return "", fmt.Errorf("unlabel image record %s: %w", img.GetName(), err)
	}
	return action, nil
}

// Owned returns the names of the records this instance owns, sorted. A
// runtime without containerd's images API gives ErrUnsupported.
func (p *Pinner) Owned(ctx context.Context) ([]string, error) {
	imgs, err := p.Client.withLabel(ctx, OwnerLabel(p.Instance))
	if err != nil {
		return nil, fmt.Errorf("list the images pinned by instance %s: %w", p.Instance, err)
	}
	names := make([]string, 0, len(imgs))
	for _, img := range imgs {
		names = append(names, img.GetName())
	}
	slices.Sort(names)
	return names, nil
}
