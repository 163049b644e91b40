package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"k8s.io/client-go/kubernetes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/credentials"
	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/diskbudget"
	"github.com/nodeprefetch/image-prefetcher/agent/health"
	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/metrics"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/nodestate"
	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// prefetcher runs passes: read the list, pull what is missing, then record
// the outcome on the node (label, events), in metrics and in readiness.
type prefetcher struct {
	opts *Options
	log  *slog.Logger
	cfg  pull.Config
	// node writes the instance's state on its node (label, annotation,
	// condition, taint, events); nil with --label=false.
	node      *nodestate.Node
	metrics   *metrics.Metrics
	readiness *health.Readiness
	// extra observers see every attempt and result too (e.g. the results
	// collector's sender).
	extra []pull.Observer
	// slots, when set, bounds how many nodes pull at once cluster-wide. It is
	// asked for a slot only when some image is missing.
	slots pullSlots
	// kube reads the instance's DaemonSet as the ServiceAccount (leave.go);
	// nil without --label or --namespace.
	kube kubernetes.Interface

	// client is the CRI connection, dialled lazily and kept across passes.
	client *cri.Client
	// keyring is built at the first pull and kept across passes, so that
	// credential plugins' answers stay cached as long as they allow.
	keyring *credentials.Keyring
	// pins: --pin-images, on containerd's images API (pin.go).
	pins pinning
	// progress follows the bytes of pulls on containerd (progress.go).
	progress progressFollowing
	// budget admits pulls while the image filesystem is under
	// --disk-budget-percent; budgetErr is why it could not be read, logged
	// when it changes.
	budget    *diskbudget.Checker
	budgetErr string
	// statfs reads the image filesystem's space for the budget; nil: the
	// real one (tests set a fake).
	statfs func(path string) (diskbudget.Space, error)
	// lastDigest is the list the previous pass was for: readiness goes to
	// not ready as soon as another list starts.
	lastDigest string
	// retryAfter is the first delay after a pass that failed or could not
	// write its outcome; it doubles up to the recheck interval.
	retryAfter time.Duration
}

// pullSlots is a cluster-wide bound on pulling nodes: Acquire blocks until
// this node may pull and returns the function that gives the slot back.
type pullSlots interface {
	Acquire(ctx context.Context, list string) (release func(), err error)
}

// passReport is the outcome of one pass: what the node holds, and whether
// the node says so.
type passReport struct {
	// Digest is the list's digest, or nodelabel.UnreadableList when the list
	// file could not be read.
	Digest  string
	Results []pull.Result
	State   nodelabel.State
	// Missing counts the images of the list found absent before pulling (a
	// new list, or a hole left by image GC), or not known present (the
	// runtime's answer failed): the label was withdrawn for them.
	Missing int
	// Repulled counts the images found gone at the presence check that ends
	// the pass (removed while it ran) and pulled again within it.
	Repulled int
	// Canceled: stopped by shutdown; the outcome was not recorded on the node
	// (a label withdrawn at the start stays withdrawn).
	Canceled bool
	// LabelErr is the error of the write that records State on the node; nil
	// when it was written (or the node already said so), or with --label=false.
	LabelErr error
	// NodeErr is the error of the other node writes of the outcome (the Node
	// condition, the startup taint's removal), when asked for.
	NodeErr error
	// pulledAt is when the whole list was last seen present: the end of the
	// presence check the outcome rests on.
	pulledAt time.Time
}

// Failed lists the results that are not present on the node.
func (r passReport) Failed() []pull.Result {
	var out []pull.Result
	for _, res := range r.Results {
		if res.Outcome == pull.OutcomeFailed {
			out = append(out, res)
		}
	}
	return out
}

// outcomes counts the results by outcome.
func (r passReport) outcomes() map[pull.Outcome]int {
	n := make(map[pull.Outcome]int, 3)
	for _, res := range r.Results {
		n[res.Outcome]++
	}
	return n
}

// maxBadLinesLogged bounds how many malformed list lines one pass logs in
// full (each at most imagelist.MaxShown bytes); the rest are counted.
const maxBadLinesLogged = 20

// pass runs one pass: read the list, learn which images are missing, make
// the node stop claiming a list it does not hold (new list, or a hole), pull,
// check that the whole list is still present (pulling again what went
// meanwhile), then record the outcome (label, events, metrics, readiness). It
// returns an error only when the pass could not run at all (unreadable list,
// no CRI runtime); the node is then labelled failed too.
func (p *prefetcher) pass(ctx context.Context) (passReport, error) {
	start := time.Now()
	list, err := p.readList()
	if err != nil {
		return p.listUnreadable(ctx, err), err
	}
	rep := passReport{Digest: list.Digest}
	if err := p.ownsNodeKeys(ctx); err != nil {
		return rep, err
	}
	p.logLineErrors(list)
	if list.Digest != p.lastDigest {
		p.readiness.SetNotReady("pass of list " + nodestate.ShortDigest(list.Digest) + " in progress")
		p.lastDigest = list.Digest
	}

	pres := p.presence(ctx, list)
	rep.Missing = len(pres.missing)
	var wd *nodestate.Withdrawal
	p.stopClaiming(ctx, list, pres, &wd)

	results, problems, err := p.pull(ctx, list.Digest, list.Entries, pres)
	if err != nil {
		p.log.Error("pass could not pull", "error", err.Error())
	}
	if err == nil && ctx.Err() == nil && !anyFailed(results) {
		// Only a pass about to claim the list needs the check: a failed one
		// says failed whatever else went.
		results, rep.Repulled = p.confirm(ctx, list, results, &wd)
	}
	rep.pulledAt = time.Now()
	rep.Results = append(lineErrorResults(list), results...)
	// No withdrawal may land after the outcome's write.
	wd.End(ctx.Err() == nil)
	if ctx.Err() != nil {
		// Only a shutdown cancels this context (the pass deadline lives
		// inside the engine). Its outcome says nothing about the list, so
		// nothing more is written: a label removed for a new list or a hole
		// at the start stays removed, and the next start decides again.
		rep.Canceled = true
		p.readiness.SetNotReady("shutting down")
		return rep, nil
	}

	rep.State = nodelabel.Succeeded
	if err != nil || len(rep.Failed()) > 0 {
		rep.State = nodelabel.Failed
	}
	p.metrics.PassFinished(rep.Results, time.Since(start))
	p.logDiskFull(rep.Results)
	if err != nil && len(rep.Results) == 0 {
		// An empty list that could not even start still deserves an event.
		problems = append(problems, nodelabel.Problem{Reason: nodelabel.EventReasonFailed, Key: "pass\x00" + err.Error(),
			Message: "pass could not run: " + err.Error()})
	}
	// Right after the presence check the outcome rests on; the pins of the
	// images present were set as each became present (pinPresent).
	p.record(ctx, &rep, problems)
	p.reconcilePins(ctx, list, results)
	p.pruneLeases(ctx, list)
	p.recordImageFs(ctx)
	p.readiness.SetRecorded(rep.Results, rep.LabelErr, rep.NodeErr)
	if err != nil {
		p.readiness.SetNotReady(err.Error())
	}
	n := rep.outcomes()
	attrs := []any{"state", string(rep.State), "images", len(rep.Results), "present", n[pull.OutcomePresent],
		"pulled", n[pull.OutcomePulled], "failed", n[pull.OutcomeFailed],
		"duration", time.Since(start).Round(time.Millisecond), "listDigest", rep.Digest}
	if rep.Repulled > 0 {
		attrs = append(attrs, "removedDuringPass", rep.Repulled)
	}
	if p.node != nil {
		attrs = append(attrs, "labelWritten", rep.LabelErr == nil)
	}
	p.log.Info("pass finished", attrs...)
	return rep, err
}

// listUnreadable records a list file that cannot be read (missing, a
// directory in its place, no permission): the node is labelled failed, with
// the list annotation saying the list was unreadable (so the label cannot be
// taken for an outcome of the previous list), and a Node Event names the path.
func (p *prefetcher) listUnreadable(ctx context.Context, err error) passReport {
	rep := passReport{Digest: nodelabel.UnreadableList, State: nodelabel.Failed}
	p.log.Error("image list unreadable: the node is labelled failed", "file", p.opts.ImageList, "error", err.Error())
	p.lastDigest = rep.Digest
	problem := nodelabel.Problem{
		Reason:  nodelabel.EventReasonFailed,
		Key:     "list\x00" + err.Error(),
		Message: fmt.Sprintf("image list %s cannot be read (node labelled failed): %v", p.opts.ImageList, err),
	}
	p.record(ctx, &rep, []nodelabel.Problem{problem})
	p.readiness.SetNotReady(err.Error())
	if p.node != nil {
		p.log.Info("pass finished", "state", string(rep.State), "listDigest", rep.Digest, "labelWritten", rep.LabelErr == nil)
	}
	return rep
}

// logLineErrors logs the malformed lines of the list, each once and cut to
// imagelist.MaxShown bytes, and at most maxBadLinesLogged of them per pass.
func (p *prefetcher) logLineErrors(list *imagelist.List) {
	for i := range list.Errors {
		le := &list.Errors[i]
		if i == maxBadLinesLogged {
			p.log.Error("more bad image list lines, not logged", "file", le.Source, "count", len(list.Errors)-i,
				"badLines", len(list.Errors))
			return
		}
		p.log.Error("bad image list line", "file", le.Source, "line", le.Line, "text", le.ShortText(),
			"error", imagelist.Shorten(le.Err.Error()))
	}
}

// readList reads the list file every pass: a mounted ConfigMap may change in
// place.
func (p *prefetcher) readList() (*imagelist.List, error) {
	return imagelist.ParseFile(p.opts.ImageList)
}

// presence is what the node held when the pass started.
type presence struct {
	// known: the runtime was asked; missing then holds every image not known
	// to be present: absent, or not answered for (err).
	known   bool
	missing []imagelist.Entry
	// present are the images the runtime reported, by reference: the engine
	// does not ask for them again.
	present map[string]*runtimeapi.Image
	// err: the runtime could not be reached (dial) or asked (ImageStatus).
	err error
}

// presence connects to the runtime (once) and, when the answer matters
// (labels, readiness or the cluster-wide pull slots), asks it which images of the
// list are missing before anything is pulled.
func (p *prefetcher) presence(ctx context.Context, list *imagelist.List) presence {
	if p.client == nil {
		c, err := p.dial(ctx)
		if err != nil {
			return presence{err: err}
		}
		if err := p.startPinning(ctx, c); err != nil {
			c.Close()
			return presence{err: err}
		}
		p.startProgress(c)
		p.client = c
		p.budget = &diskbudget.Checker{Percent: p.opts.DiskBudget.Percent, HostRoot: p.opts.HostRoot,
			Images: c.Images, Timeout: p.criTimeout(), Statfs: p.statfs}
	}
	if p.node == nil && p.slots == nil && p.opts.Run == nil {
		return presence{}
	}
	absent, present, unanswered, err := p.missing(ctx, list.Entries)
	if err != nil {
		// Not known present is not present: the node stops claiming the
		// list before anything else happens, and the engine asks again.
		p.log.Warn("the runtime did not say whether images of the list are present: they count as missing",
			"unanswered", len(unanswered), "images", len(list.Entries), "error", err.Error())
	}
	return presence{known: true, missing: append(absent, unanswered...), present: present, err: err}
}

// ownsNodeKeys refuses the pass, before anything is pulled or written, while
// an instance of the same name in another namespace holds the node's label
// key (nodelabel.ConflictError): the pod stays unready and says why.
func (p *prefetcher) ownsNodeKeys(ctx context.Context) error {
	if p.node == nil {
		return nil
	}
	err := p.node.Labels.CheckOwner(ctx)
	var conflict *nodelabel.ConflictError
	if !errors.As(err, &conflict) {
		// The node could not be read, or the owner not asked: the pass goes
		// on, and its label writes (which check again) say what failed.
		return nil
	}
	p.readiness.SetNotReady(err.Error())
	p.log.Error("instance name taken: the node is left alone", "otherNamespace", conflict.Other, "error", err.Error())
	return err
}

// missingOf is what pres found of list, for the node's state.
func missingOf(list *imagelist.List, pres presence) nodestate.Missing {
	m := nodestate.Missing{Digest: list.Digest, Images: len(list.Entries), Known: pres.known}
	for _, e := range pres.missing {
		m.Refs = append(m.Refs, e.Ref)
	}
	return m
}

// stopClaiming makes the node stop claiming the list for the images pres
// finds missing (nodestate.Node.StopClaiming), and readiness say which are
// being pulled. A withdrawal that failed, after its whole write budget, is
// not left to the outcome's write at the end of the pass, which may be many
// pulls away: it goes on in the background (*wd) while the pass pulls. While
// *wd runs, a hole found later in the pass leaves the node to it.
func (p *prefetcher) stopClaiming(ctx context.Context, list *imagelist.List, pres presence, wd **nodestate.Withdrawal) {
	m := missingOf(list, pres)
	if len(m.Refs) > 0 && m.Known {
		p.readiness.SetNotReady(m.Text())
	}
	if p.node == nil || *wd != nil {
		return
	}
	err := p.node.StopClaiming(ctx, m)
	if err == nil {
		return
	}
	p.log.Error("node label not withdrawn although images are missing: pulls go on, and the withdrawal is "+
		"retried until it lands or the pass writes its outcome", "error", err.Error())
	*wd = p.node.KeepWithdrawing(ctx, m)
}

// maxRepullRounds bounds the rounds of pulls for images found gone at the
// presence check that ends a pass. One round fills a hole the kubelet's GC
// made while the pass pulled; an image gone again after it is removed as fast
// as it comes, and the pass says so instead of pulling it forever.
const maxRepullRounds = 1

// confirm is the presence check the pass's claim rests on: just before the
// node is told that the whole list is present, the runtime is asked again for
// every image, since the pass's own pulls fill the disk and so start the
// kubelet's image GC, which may take an image the pass found or pulled a
// moment ago. Images gone are treated as a hole found at the start: the node
// stops claiming the list (stopClaiming), they are pulled again (at most
// maxRepullRounds rounds), and the check repeats; an image still gone after
// that fails with pull.ReasonRemoved. It returns the results updated and how
// many images were pulled again.
func (p *prefetcher) confirm(ctx context.Context, list *imagelist.List, results []pull.Result, wd **nodestate.Withdrawal) ([]pull.Result, int) {
	at := make(map[string]int, len(results))
	for i, r := range results {
		at[r.Image] = i
	}
	repulled := 0
	for round := 0; ; round++ {
		absent, unanswered, err := p.absent(ctx, list.Entries)
		gone := append(absent, unanswered...)
		if ctx.Err() != nil || len(gone) == 0 {
			return results, repulled
		}
		if round == maxRepullRounds {
			for _, e := range absent {
				r := &results[at[e.Ref]]
				r.Outcome, r.Reason = pull.OutcomeFailed, pull.ReasonRemoved
				r.Err = fmt.Errorf("%s: present after its pull, gone again at the end of the pass: something on the node "+
					"removes it (the kubelet's image GC when the disk is short)", e.Ref)
				p.observers().ImageFinished(*r)
			}
			for _, e := range unanswered {
				r := &results[at[e.Ref]]
				r.Outcome, r.Reason = pull.OutcomeFailed, pull.Classify(err)
				r.Err = fmt.Errorf("%s: not known present at the end of the pass: %w", e.Ref, err)
				p.observers().ImageFinished(*r)
			}
			return results, repulled
		}
		attrs := []any{"gone", len(gone), "images", len(list.Entries), "first", gone[0].Ref}
		if err != nil {
			attrs = append(attrs, "unanswered", len(unanswered), "error", err.Error())
		}
		p.log.Warn("images of the list gone since the pass found them present (the kubelet's image GC?): "+
			"the node does not claim the list until they are pulled again", attrs...)
		hole := presence{known: true, missing: gone}
		p.stopClaiming(ctx, list, hole, wd)
		again, _, err := p.pull(ctx, list.Digest, gone, hole)
		repulled += len(gone)
		for _, r := range again {
			results[at[r.Image]] = r
		}
		if err != nil || ctx.Err() != nil || anyFailed(again) {
			// The pass fails on the images that did not come back.
			return results, repulled
		}
	}
}

// absent returns the entries of the list the runtime does not hold now, and
// those it could not say it holds (with the error; see missing). One
// ListImages call answers for the whole list: an entry is held when the name
// containerd's CRI gives its reference (pin.RecordName: normalized,
// name@digest when a digest is given) is among an image's repo tags or
// digests. An entry it does not find is asked by ImageStatus, as at the start
// of the pass (missing), so the runtime's own matching has the last word
// (CRI-O resolves short names by its registries.conf). Should ListImages
// fail, every entry is asked that way.
func (p *prefetcher) absent(ctx context.Context, entries []imagelist.Entry) (gone, unanswered []imagelist.Entry, err error) {
	lctx, cancel := context.WithTimeout(ctx, p.criTimeout())
	resp, err := p.client.Images.ListImages(lctx, &runtimeapi.ListImagesRequest{})
	cancel()
	unmatched := entries
	if err != nil {
		p.log.Warn("list images failed: asking for each image of the list", "error", err.Error())
	} else {
		held := make(map[string]bool, 2*len(resp.GetImages()))
		for _, img := range resp.GetImages() {
			for _, n := range img.GetRepoTags() {
				held[n] = true
			}
			for _, n := range img.GetRepoDigests() {
				held[n] = true
			}
		}
		unmatched = nil
		for _, e := range entries {
			if name, err := pin.RecordName(e.Ref); err != nil || !held[name] {
				unmatched = append(unmatched, e)
			}
		}
	}
	if len(unmatched) == 0 {
		return nil, nil, nil
	}
	gone, _, unanswered, err = p.missing(ctx, unmatched)
	return gone, unanswered, err
}

// pull runs the engine over entries. It also returns the problems with the
// agent's credential files, which never stop a pull.
// listDigest names the list for the cluster-wide pull slots (seeding).
func (p *prefetcher) pull(ctx context.Context, listDigest string, entries []imagelist.Entry, pres presence) ([]pull.Result, []nodelabel.Problem, error) {
	if p.client == nil {
		return failAll(entries, pull.ReasonUnavailable, pres.err), nil, pres.err
	}
	// Refresh re-reads the credential files that changed, so that rotated pull
	// secrets (mounted Secrets are updated in place) are used without a restart.
	if p.keyring == nil {
		p.keyring = credentials.NewKeyring(p.opts.DockerConfigs, p.opts.CredProviderConfig, p.opts.CredProviderBinDir)
	} else {
		p.keyring.Refresh()
	}
	keyring := p.keyring
	problems := p.credentialProblems(keyring)
	engine := &pull.Engine{
		Images:   p.client.Images,
		Creds:    keyring,
		Observer: p.observers(),
		Present:  pres.present,
		Progress: p.progress.engine(),
		Settled:  p.pinPresent,
		Admit:    p.admitter(ctx),
		Config:   p.cfg,
	}
	if p.slots != nil && p.cfg.Policy != pull.PolicyAlways {
		if pres.err != nil {
			return failAll(entries, pull.ReasonUnavailable, pres.err), problems, pres.err
		}
		if len(pres.missing) == 0 {
			// Everything is present: no slot needed, the engine only confirms.
			return engine.Run(ctx, entries), problems, nil
		}
	}
	if p.slots != nil {
		// The wait for a slot counts against the pass's deadline: held slots
		// that never free (a stuck or malicious holder) end the pass as
		// failed instead of stalling it (and a node kept tainted by it) forever.
		if p.cfg.OverallTimeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, p.cfg.OverallTimeout)
			defer cancel()
		}
		release, err := p.slots.Acquire(ctx, listDigest)
		if err != nil {
			err = fmt.Errorf("wait for a cluster-wide pull slot: %w", err)
			return failAll(entries, pull.ReasonUnavailable, err), problems, err
		}
		defer release()
	}
	return engine.Run(ctx, entries), problems, nil
}

// admitter learns the image filesystems for the disk budget and returns the
// engine's Admit, or nil when the budget is off or cannot be read: an
// unreadable budget is said (once per cause) and lets the pulls go, since
// stopping every pull of the node would be worse than the risk it guards.
func (p *prefetcher) admitter(ctx context.Context) func() error {
	if p.budget == nil || p.budget.Percent == 0 {
		return nil
	}
	err := p.budget.Refresh(ctx)
	if err == nil {
		if p.budgetErr != "" {
			p.log.Info("disk budget in force again", "imageFilesystems", p.budget.Paths(),
				"percent", p.budget.Percent)
		}
		p.budgetErr = ""
		return p.budget.Admit
	}
	if err.Error() != p.budgetErr {
		p.budgetErr = err.Error()
		hint := ""
		if errors.Is(err, diskbudget.ErrNotVisible) {
			hint = "mount the runtime's state directory (e.g. /var/lib/containerd) read-only below --host-root, as the base DaemonSet does, or set --" +
				diskbudget.FlagName + "=0"
		}
		p.log.Warn("disk budget not in force: the image filesystem's space cannot be read, pulls go on unbounded",
			"error", err.Error(), "fix", hint)
	}
	return nil
}

// observers see every attempt and result: the log, the metrics and the
// extra ones.
func (p *prefetcher) observers() observers {
	return append(observers{logObserver{p.log}, p.metrics}, p.extra...)
}

// logDiskFull says once per pass that images failed for want of disk on the
// node (full, or at the disk budget), which is not the images' fault and
// which the next pass tries again.
func (p *prefetcher) logDiskFull(results []pull.Result) {
	for _, reason := range []pull.Reason{pull.ReasonDiskFull, pull.ReasonDiskBudget} {
		var first *pull.Result
		n := 0
		for i, r := range results {
			if r.Outcome == pull.OutcomeFailed && r.Reason == reason {
				if first == nil {
					first = &results[i]
				}
				n++
			}
		}
		if first == nil {
			continue
		}
		msg := "the node's image file system is full: images not pulled (not their fault); the next pass tries again"
		if reason == pull.ReasonDiskBudget {
			msg = "the node's image file system is at the disk budget: images not pulled, so that the kubelet's image GC " +
				"does not delete images for them; the next pass tries again"
		}
		p.log.Error(msg, "reason", string(reason), "images", n, "first", first.Image, "error", fmt.Sprint(first.Err))
	}
}

func anyFailed(results []pull.Result) bool {
	for _, r := range results {
		if r.Outcome == pull.OutcomeFailed {
			return true
		}
	}
	return false
}

// credentialProblems logs what could not be used of the credential files and
// turns it into Node Event problems: whole files left out, and entries left
// out of files that loaded. Messages name the file (and key), never a secret.
func (p *prefetcher) credentialProblems(k *credentials.Keyring) []nodelabel.Problem {
	var out []nodelabel.Problem
	for _, err := range k.Problems() {
		p.log.Error("credential file skipped: pulls go on without it (anonymous where no other credential matches)",
			"error", err.Error())
		out = append(out, nodelabel.Problem{
			Reason:  nodelabel.EventReasonCredentialFileSkipped,
			Key:     "credentials\x00" + err.Error(),
			Message: "credential file skipped, pulls go on without it: " + err.Error(),
		})
	}
	for _, w := range k.Warnings() {
		p.log.Warn("credentials", "warning", w.Error())
		var ee *credentials.EntryError
		if errors.As(w, &ee) {
			out = append(out, nodelabel.Problem{
				Reason:  nodelabel.EventReasonCredentialFileSkipped,
				Key:     "credentials\x00" + w.Error(),
				Message: "credential entry skipped: " + w.Error(),
			})
		}
	}
	return out
}

// missing asks the runtime for each entry with one ImageStatus call: it
// returns the entries absent, the images present, and the entries not
// answered for. The first call that fails ends the asking (a runtime that
// fails one answer would likely make each of the others wait for its
// timeout): that entry and the ones not asked yet are unanswered, and the
// error comes with them.
func (p *prefetcher) missing(ctx context.Context, entries []imagelist.Entry) (
	absent []imagelist.Entry, present map[string]*runtimeapi.Image, unanswered []imagelist.Entry, err error) {
	timeout := p.criTimeout()
	present = make(map[string]*runtimeapi.Image, len(entries))
	for i, e := range entries {
		sctx, cancel := context.WithTimeout(ctx, timeout)
		st, err := p.client.Images.ImageStatus(sctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: e.Ref}})
		cancel()
		if err != nil {
			return absent, present, entries[i:], fmt.Errorf("image status %s: %w", e.Ref, err)
		}
		if st.GetImage() == nil {
			absent = append(absent, e)
		} else {
			present[e.Ref] = st.GetImage()
		}
	}
	return absent, present, nil, nil
}

// criTimeout bounds each presence answer: a runtime that hangs must not hang
// the pass outside the engine's deadlines.
func (p *prefetcher) criTimeout() time.Duration {
	if p.opts.DialTimeout > 0 {
		return p.opts.DialTimeout
	}
	return cri.DefaultTimeout
}

// recordImageFs reads the image filesystems' use (CRI ImageFsInfo) into the
// metrics at the end of a pass.
func (p *prefetcher) recordImageFs(ctx context.Context) {
	if p.client == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, p.criTimeout())
	defer cancel()
	resp, err := p.client.Images.ImageFsInfo(ctx, &runtimeapi.ImageFsInfoRequest{})
	if err != nil {
		p.log.Debug("image filesystem use not read", "error", err.Error())
		return
	}
	var used uint64
	for _, fs := range resp.GetImageFilesystems() {
		used += fs.GetUsedBytes().GetValue()
	}
	p.metrics.SetImageFsUsedBytes(used)
}

func (p *prefetcher) dial(ctx context.Context) (*cri.Client, error) {
	endpoint := p.opts.CRISocket
	if endpoint == "" {
		found, err := cri.Detect(p.opts.HostRoot)
		if err != nil {
			return nil, fmt.Errorf("detect CRI socket: %w", err)
		}
		p.log.Info("detected CRI socket", "path", found)
		endpoint = found
	}
	c, err := cri.Dial(ctx, endpoint, p.opts.DialTimeout)
	if err != nil {
		return nil, err
	}
	p.log.Info("connected to CRI runtime", "socket", c.Path, "runtime", c.RuntimeName, "version", c.RuntimeVersion)
	if cri.JoinsConcurrentPulls(c.RuntimeName) && p.cfg.HedgeAfter > 0 && p.cfg.MaxHedges > 0 {
		p.log.Info("hedged pulls off: this runtime makes a second pull of an image wait for the first, so a hedge cannot get past a stalled connection",
			"runtime", c.RuntimeName, "hedgeAfter", p.cfg.HedgeAfter)
		p.cfg.HedgeAfter = 0
	}
	return c, nil
}

// record writes the pass's outcome to the node (nodestate.Node.Record:
// label, condition, taint, events). The label write's error is kept in rep:
// `fetch` exits ExitNotRecorded for it, `run` retries it within seconds and
// stays not ready meanwhile.
func (p *prefetcher) record(ctx context.Context, rep *passReport, problems []nodelabel.Problem) {
	if p.node == nil {
		return
	}
	r := p.node.Record(ctx, nodestate.Outcome{Digest: rep.Digest, State: rep.State, Results: rep.Results,
		Problems: problems, PresentAt: rep.pulledAt})
	rep.LabelErr, rep.NodeErr = r.LabelErr, r.NodeErr
}

// lineErrorResults turns malformed list lines into failed results, so that
// they count everywhere a failed image counts: label, readiness, events,
// metrics, exit code.
func lineErrorResults(list *imagelist.List) []pull.Result {
	out := make([]pull.Result, 0, len(list.Errors))
	for i := range list.Errors {
		le := list.Errors[i]
		out = append(out, pull.Result{
			// Cut: a garbage line must not flood events, readiness or logs.
			Image:   le.ShortText(),
			Line:    le.Line,
			Outcome: pull.OutcomeFailed,
			Reason:  pull.ReasonInvalidReference,
			Err:     &le,
		})
	}
	return out
}

func failAll(entries []imagelist.Entry, reason pull.Reason, err error) []pull.Result {
	out := make([]pull.Result, len(entries))
	for i, e := range entries {
		out[i] = pull.Result{Image: e.Ref, Line: e.Line, Outcome: pull.OutcomeFailed, Reason: reason, Err: err}
	}
	return out
}

func (p *prefetcher) close() {
	if p.client != nil {
		p.client.Close()
	}
	p.pins.close()
	p.progress.close()
}
