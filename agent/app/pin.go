package app

import (
	"context"
	"errors"
	"fmt"

	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// pinning is the state of --pin-images across passes. Pins are reconciled on
// containerd even with the option off, so that turning it off (or an empty
// list) lets go of every pin this instance set.
type pinning struct {
	// pinner is set once the runtime is known to be a containerd; it stays
	// nil on other runtimes, where nothing of ours can be pinned.
	pinner *pin.Pinner
	// pinned are the records the last reconcile left pinned and owned by
	// this instance: an image found present among them needs no pin during
	// the pass (only a pull can drop a pin: containerd 2.x rewrites the
	// record's labels). Written only between passes, read by the pulls.
	pinned map[string]bool
}

// close forgets the pinner; its connection is the CRI client's.
func (s *pinning) close() {
	s.pinner = nil
	s.pinned = nil
}

// pinUnsupported is the error of a pass with --pin-images on a runtime that
// cannot pin through containerd's images API.
func pinUnsupported(c *cri.Client, cause error) error {
	msg := fmt.Sprintf("--pin-images needs containerd's images API, which the runtime on %s (%s %s) does not serve; "+
		"on CRI-O pin images with CRI-O's own pinned_images setting ([crio.image] in crio.conf), "+
		"on OpenShift with a PinnedImageSet (machineconfiguration.openshift.io/v1), and run the agent without --pin-images",
		c.Path, c.RuntimeName, c.RuntimeVersion)
	if cause != nil {
		return fmt.Errorf("%s: %w", msg, cause)
	}
	return errors.New(msg)
}

// startPinning runs when the runtime has just been reached, before anything
// is pulled. With --pin-images, a runtime without containerd's images API
// fails the pass here, so the misconfiguration shows at once rather than
// after a whole pass of pulls.
func (p *prefetcher) startPinning(ctx context.Context, c *cri.Client) error {
	if p.opts.Instance == "" {
		// Only with --label=false and --pin-images=false: without an
		// instance nothing can have been pinned as ours.
		return nil
	}
	if !c.IsContainerd() {
		if p.opts.PinImages {
			return pinUnsupported(c, nil)
		}
		return nil
	}
	pinner := &pin.Pinner{Client: pin.NewClient(c.Conn(), p.opts.DialTimeout), Instance: p.opts.Instance}
	if p.opts.PinImages {
		owned, err := pinner.Owned(ctx)
		switch {
		case errors.Is(err, pin.ErrUnsupported):
			return pinUnsupported(c, err)
		case err != nil:
			// Not the runtime's kind, only this call: the pass goes on and
			// its end tries again.
			p.log.Warn("containerd images API did not answer; pins are tried again at the end of the pass", "error", err.Error())
		default:
			p.log.Info("pinning images through containerd's images API", "namespace", pin.Namespace,
				"ownerLabel", pin.OwnerLabel(p.opts.Instance), "pinnedByThisInstance", len(owned))
		}
	}
	p.pins.close()
	p.pins.pinner = pinner
	return nil
}

// pinMessages say in the logs what each pin action means.
var pinMessages = map[pin.Action]string{
	pin.Set:      "image pinned",
	pin.Repaired: "image pin repaired: it had been removed",
	pin.Claimed:  "image pinned: the pin was there already and stays when this instance lets go",
	pin.Released: "image released by this instance: its pin stays (another instance wants it, or image-prefetcher did not set it)",
	pin.Unpinned: "image unpinned: the kubelet's image GC may collect it again",
}

// pinPresent pins an image as soon as the pass knows it present, right after
// its pull or its presence check and before its pull slot goes to the next
// image: the pulls that follow fill the disk and may start the kubelet's
// image GC, which must not find it unpinned. It runs in the image's own
// goroutine (pull.Engine.Settled). A failure is left to reconcilePins at the
// end of the pass, which tries again and counts what still fails.
func (p *prefetcher) pinPresent(ctx context.Context, r pull.Result) {
	pinner := p.pins.pinner
	if pinner == nil || !p.opts.PinImages || r.Outcome == pull.OutcomeFailed {
		return
	}
	name, err := pin.RecordName(r.Image)
	if err != nil {
		return // reconcilePins logs and counts it
	}
	if r.Outcome == pull.OutcomePresent && p.pins.pinned[name] {
		return
	}
	action, err := pinner.Pin(ctx, name)
	if err != nil {
		p.log.Warn("image not pinned yet; tried again at the end of the pass", "image", r.Image, "error", err.Error())
		return
	}
	if action != "" {
		p.log.Info(pinMessages[action], "image", name, "action", string(action))
	}
}

// releasesPins: run owns the instance's pins on its node and releases them;
// fetch does only with --release-pins.
func (p *prefetcher) releasesPins() bool { return p.opts.Run != nil || p.opts.ReleasePins }

// reconcilePins pins the images of the list that are present and, when this
// process releases pins (releasesPins), lets go of those this instance pinned
// that left the list (all of them with --pin-images=false). Failures are logged and counted; they never change
// the pass's outcome, which says whether the images are present.
func (p *prefetcher) reconcilePins(ctx context.Context, list *imagelist.List, results []pull.Result) {
	pinner := p.pins.pinner
	if pinner == nil {
		return
	}
	var toPin, keep []string
	if p.opts.PinImages {
		present := map[string]bool{}
		for _, r := range results {
			if r.Outcome != pull.OutcomeFailed {
				present[r.Image] = true
			}
		}
		for _, e := range list.Entries {
			name, err := pin.RecordName(e.Ref)
			if err != nil {
				p.log.Error("image not pinned", "image", e.Ref, "error", err.Error())
				p.metrics.PinFailed(string(pin.OpPin))
				continue
			}
			keep = append(keep, name)
			if present[e.Ref] {
				toPin = append(toPin, name)
			}
		}
	}
	p.pins.pinned = nil
	var err error
	if !p.releasesPins() {
		// Every record this instance owns is kept: a fetch beside run (an
		// init container, a Job) must not release what run pinned.
		var owned []string
		owned, err = pinner.Owned(ctx)
		keep = append(keep, owned...)
	}
	var rep pin.Report
	if err == nil {
		rep, err = pinner.Reconcile(ctx, toPin, keep)
	}
	if err != nil {
		if !p.opts.PinImages && errors.Is(err, pin.ErrUnsupported) {
			// Off, and a containerd without the images API: nothing can
			// have been pinned; stop asking.
			p.log.Debug("no containerd images API: no pins to let go of", "error", err.Error())
			p.pins.close()
			return
		}
		p.metrics.PinFailed("list")
		p.log.Error("image pins not reconciled (the node label is unaffected)", "error", err.Error())
		return
	}
	for _, c := range rep.Changes {
		p.log.Info(pinMessages[c.Action], "image", c.Image, "action", string(c.Action))
	}
	pinned := make(map[string]bool, len(toPin))
	for _, name := range toPin {
		pinned[name] = true
	}
	for _, f := range rep.Failures {
		p.metrics.PinFailed(string(f.Op))
		p.log.Error("image pin failed (the node label is unaffected)", "operation", string(f.Op), "image", f.Image,
			"error", f.Err.Error())
		if f.Op == pin.OpPin {
			delete(pinned, f.Image)
		}
	}
	p.pins.pinned = pinned
	p.metrics.SetPinnedImages(rep.Pinned)
	if len(rep.Changes) > 0 || len(rep.Failures) > 0 {
		p.log.Info("image pins reconciled", "pinned", rep.Pinned, "changed", len(rep.Changes), "failed", len(rep.Failures),
			"pinImages", p.opts.PinImages)
	}
}
