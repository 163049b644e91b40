// Package conformance holds the CRI image service behaviour the agent relies
// on, as one suite that runs against the fake (critest, in the unit tests)
// and against each real runtime of the e2e harness (containerd 2.x,
// containerd 1.6, CRI-O). Where the real runtimes answer differently, each
// case says what every runtime answers; the fake must give one of those real
// answers, never one of its own, so a fake that drifts from the runtimes
// fails here and not in production.
//
//	conformance.Run(t, conformance.Target{Runtime: conformance.Fake, ...})
package conformance

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/pin"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// The runtimes a Target can be: the e2e harness's names for the real ones
// (IMAGE_PREFETCHER_E2E_RUNTIME), and the fake.
const (
	Containerd   = "containerd"     // containerd 2.x
	Containerd16 = "containerd-1.6" // Debian's 1.6.20
	CRIO         = "cri-o"
	Fake         = "critest"
)

// Real are the real runtimes every answer is measured on.
var Real = []string{Containerd, Containerd16, CRIO}

// Image is a pullable image: its tagged reference and its repository with
// the manifest digest.
type Image struct {
	Ref, DigestRef string
}

// Target is the runtime under test and the references that make it fail in
// each way the agent tells apart. On a real runtime the references point at
// the harness's registries; on the fake they are scripted.
type Target struct {
	Runtime string // one of Real or Fake
	Images  runtimeapi.ImageServiceClient
	Version runtimeapi.RuntimeServiceClient
	// Image is pulled, looked up and removed again by the suite. Nothing
	// else may use it while the suite runs.
	Image Image
	// MissingTag and MissingRepository are on a registry that has neither.
	MissingTag, MissingRepository string
	// Private needs Auth; Auth holds the right credentials.
	Private string
	Auth    *runtimeapi.AuthConfig
	// Refused is on a registry address nothing listens on.
	Refused string
}

// Answer is how a runtime fails a call: the gRPC code and a phrase its
// message holds.
type Answer struct {
	Runtimes []string
	Code     codes.Code
	Phrase   string
}

// ErrorCase is a failed PullImage: what each runtime answers and the one
// reason the agent must classify every answer as.
type ErrorCase struct {
	Name    string
	Ref     func(Target) string
	Auth    func(Target) *runtimeapi.AuthConfig
	Reason  pull.Reason
	Answers []Answer
}

// InvalidReference is what the suite pulls as a malformed reference (upper
// case in the repository).
const InvalidReference = "127.0.0.1:5000/e2e/Invalid:1"

// ErrorCases are the failures the agent classifies, as each runtime words
// them (measured on the harness: e2e/README.md's table).
var ErrorCases = []ErrorCase{
	{
		Name: "missing tag", Ref: func(t Target) string { return t.MissingTag }, Reason: pull.ReasonNotFound,
		Answers: []Answer{
			{Runtimes: []string{Containerd, Containerd16, Fake}, Code: codes.NotFound, Phrase: ": not found"},
			{Runtimes: []string{CRIO}, Code: codes.Unknown, Phrase: "manifest unknown"},
		},
	},
	{
		Name: "missing repository", Ref: func(t Target) string { return t.MissingRepository }, Reason: pull.ReasonNotFound,
		Answers: []Answer{
			{Runtimes: []string{Containerd, Containerd16, Fake}, Code: codes.NotFound, Phrase: ": not found"},
			{Runtimes: []string{CRIO}, Code: codes.Unknown, Phrase: "manifest unknown"},
		},
	},
	{
		Name: "anonymous pull of a private image", Ref: func(t Target) string { return t.Private }, Reason: pull.ReasonUnauthorized,
		Answers: []Answer{
			{Runtimes: []string{Containerd}, Code: codes.Unknown, Phrase: "no basic auth credentials"},
			{Runtimes: []string{Containerd16, Fake}, Code: codes.Unknown, Phrase: "401 Unauthorized"},
			{Runtimes: []string{CRIO}, Code: codes.Unknown, Phrase: "authentication required"},
		},
	},
	{
		Name: "wrong password", Ref: func(t Target) string { return t.Private }, Reason: pull.ReasonUnauthorized,
		Auth: func(t Target) *runtimeapi.AuthConfig {
			return &runtimeapi.AuthConfig{Username: t.Auth.GetUsername(), Password: t.Auth.GetPassword() + "-wrong"}
		},
		Answers: []Answer{
			{Runtimes: []string{Containerd, Containerd16, Fake}, Code: codes.Unknown, Phrase: "401 Unauthorized"},
			{Runtimes: []string{CRIO}, Code: codes.Unknown, Phrase: "authentication required"},
		},
	},
	{
		Name: "refused connection", Ref: func(t Target) string { return t.Refused }, Reason: pull.ReasonUnavailable,
		Answers: []Answer{
			{Runtimes: []string{Containerd, Containerd16, Fake}, Code: codes.Unknown, Phrase: "connect: connection refused"},
			{Runtimes: []string{CRIO}, Code: codes.Unknown, Phrase: "connection refused"},
		},
	},
	{
		Name: "invalid reference", Ref: func(Target) string { return InvalidReference }, Reason: pull.ReasonInvalidReference,
		Answers: []Answer{
			{Runtimes: []string{Containerd, Containerd16, Fake}, Code: codes.Unknown, Phrase: "failed to parse image reference"},
			{Runtimes: []string{CRIO}, Code: codes.Unknown, Phrase: "cannot parse input"},
		},
	},
}

// IDForm is how ImageStatus's id (and PullImage's imageRef, the same
// string) names an image.
type IDForm string

const (
	// IDWithAlgorithm: "sha256:<config digest>".
	IDWithAlgorithm IDForm = "sha256:<hex>"
	// IDHex: the config digest's hex alone.
	IDHex IDForm = "<hex>"
)

// IDForms says, per runtime, how ids look.
var IDForms = map[string]IDForm{
	Containerd: IDWithAlgorithm, Containerd16: IDWithAlgorithm, Fake: IDWithAlgorithm, CRIO: IDHex,
}

// RemoveTagKeepsDigest says, per runtime, whether an image pulled both by
// tag and by digest stays, under its digest, when RemoveImage names the tag.
// containerd removes the image with every record of it; CRI-O removes only
// that name (the digest one came with the pull by digest).
var RemoveTagKeepsDigest = map[string]bool{
	Containerd: false, Containerd16: false, Fake: false, CRIO: true,
}

// RuntimeNames is what Version reports per runtime: the agent uses pins and
// pull progress only where it says containerd (cri.Client.IsContainerd) and
// sends no hedged pulls where it says cri-o (cri.JoinsConcurrentPulls).
var RuntimeNames = map[string]string{
	Containerd: cri.RuntimeContainerd, Containerd16: cri.RuntimeContainerd, CRIO: cri.RuntimeCRIO, Fake: "critest",
}

// CheckTables fails when an answer of the fake is not also a real runtime's,
// or a runtime has no answer or more than one for a case.
func CheckTables() error {
	for _, c := range ErrorCases {
		for _, rt := range append([]string{Fake}, Real...) {
			n := 0
			for _, a := range c.Answers {
				if slices.Contains(a.Runtimes, rt) {
					n++
				}
			}
			if n != 1 {
				return fmt.Errorf("case %q: %d answers for %s, want 1", c.Name, n, rt)
			}
		}
		for _, a := range c.Answers {
			if slices.Contains(a.Runtimes, Fake) && len(a.Runtimes) == 1 {
				return fmt.Errorf("case %q: the fake answers %s %q, which no real runtime does", c.Name, a.Code, a.Phrase)
			}
		}
	}
	for name, fake := range map[string]func(rt string) bool{
		"id form":              func(rt string) bool { return IDForms[rt] == IDForms[Fake] },
		"RemoveImage of a tag": func(rt string) bool { return RemoveTagKeepsDigest[rt] == RemoveTagKeepsDigest[Fake] },
	} {
		if !slices.ContainsFunc(Real, fake) {
			return fmt.Errorf("the fake's %s is no real runtime's", name)
		}
	}
	return nil
}

// answerFor returns the runtime's answer to c.
func answerFor(c ErrorCase, runtime string) (Answer, bool) {
	for _, a := range c.Answers {
		if slices.Contains(a.Runtimes, runtime) {
			return a, true
		}
	}
	return Answer{}, false
}

// Run runs every case against target as subtests. Each logs what the runtime
// answered, so a run with -v documents the runtime.
func Run(t *testing.T, target Target) {
	t.Helper()
	if !slices.Contains(Real, target.Runtime) && target.Runtime != Fake {
		t.Fatalf("unknown runtime %q: want one of %v or %s", target.Runtime, Real, Fake)
	}
	if err := CheckTables(); err != nil {
		t.Fatal(err)
	}
	t.Run("Version", func(t *testing.T) { testVersion(t, target) })
	t.Run("Errors", func(t *testing.T) {
		for _, c := range ErrorCases {
			t.Run(strings.ReplaceAll(c.Name, " ", "-"), func(t *testing.T) { testError(t, target, c) })
		}
	})
	t.Run("ImageStatusOfAnAbsentImage", func(t *testing.T) { testAbsent(t, target) })
	t.Run("TagsAndDigests", func(t *testing.T) { testTagsAndDigests(t, target) })
	t.Run("PullByDigest", func(t *testing.T) { testPullByDigest(t, target) })
	t.Run("ImageFsInfo", func(t *testing.T) { testImageFsInfo(t, target) })
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func testVersion(t *testing.T, target Target) {
	v, err := target.Version.Version(ctxFor(t), &runtimeapi.VersionRequest{})
	if err != nil {
		t.Fatalf("Version: %v", err)
	}
	t.Logf("%s: runtime name %q, version %q, API %q", target.Runtime, v.GetRuntimeName(), v.GetRuntimeVersion(), v.GetRuntimeApiVersion())
	if want := RuntimeNames[target.Runtime]; v.GetRuntimeName() != want {
		t.Errorf("runtime name %q, want %q", v.GetRuntimeName(), want)
	}
	if v.GetRuntimeApiVersion() != "v1" {
		t.Errorf("runtime API version %q, want v1 (the agent speaks CRI v1 only)", v.GetRuntimeApiVersion())
	}
}

func testError(t *testing.T, target Target, c ErrorCase) {
	ctx := ctxFor(t)
	ref := c.Ref(target)
	var auth *runtimeapi.AuthConfig
	if c.Auth != nil {
		auth = c.Auth(target)
	}
	want, _ := answerFor(c, target.Runtime)
	// Another test may have pulled the image with the right credentials (the private one): the
	// check below is of what the failed pull leaves, so it starts from nothing. Best effort: an
	// unparsable reference cannot be removed either, and is never present.
	if _, err := target.Images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
		t.Logf("remove %s before the case: %v", ref, err)
	}
	_, err := target.Images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}, Auth: auth})
	if err == nil {
		t.Fatalf("pull %s succeeded; want %s %q", ref, want.Code, want.Phrase)
	}
	st := status.Convert(err)
	t.Logf("%s: code %s, text %q", target.Runtime, st.Code(), truncate(st.Message(), 300))
	if st.Code() != want.Code || !strings.Contains(st.Message(), want.Phrase) {
		t.Errorf("pull %s: code %s, text %q; want code %s with %q", ref, st.Code(), st.Message(), want.Code, want.Phrase)
	}
	if got := pull.Classify(err); got != c.Reason {
		t.Errorf("classified %s, want %s; error: %v", got, c.Reason, err)
	}
	if st, err := status1(ctx, target, ref); err == nil && st != nil {
		t.Errorf("%s is present after its failed pull: %v", ref, st)
	}
}

func status1(ctx context.Context, target Target, ref string) (*runtimeapi.Image, error) {
	resp, err := target.Images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return nil, fmt.Errorf("image status %s: %w", ref, err)
	}
	return resp.GetImage(), nil
}

func remove(ctx context.Context, t *testing.T, target Target, ref string) {
	t.Helper()
	_, err := target.Images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil && status.Code(err) != codes.NotFound {
		t.Fatalf("remove %s: %v", ref, err)
	}
}

// testAbsent: an absent image is a response without an image, not an error;
// the agent's IfNotPresent check and presence checks rely on it.
func testAbsent(t *testing.T, target Target) {
	ctx := ctxFor(t)
	remove(ctx, t, target, target.Image.Ref)
	for _, ref := range []string{target.Image.Ref, target.Image.DigestRef, target.MissingTag} {
		img, err := status1(ctx, target, ref)
		if err != nil {
			t.Errorf("%v; want an empty answer", err)
		} else if img != nil {
			t.Errorf("image status %s: %v after its removal", ref, img)
		}
	}
}

// tagAndDigest is Ref's repository with its tag and DigestRef's digest:
// name:tag@sha256:..., a form image lists use.
func tagAndDigest(t *testing.T, img Image) string {
	t.Helper()
	tagged, err := reference.ParseNormalizedNamed(img.Ref)
	if err != nil {
		t.Fatalf("reference %s: %v", img.Ref, err)
	}
	tag, ok := tagged.(reference.Tagged)
	if !ok {
		t.Fatalf("reference %s has no tag", img.Ref)
	}
	_, dig, ok := strings.Cut(img.DigestRef, "@")
	if !ok {
		t.Fatalf("reference %s has no digest", img.DigestRef)
	}
	return tagged.Name() + ":" + tag.Tag() + "@" + dig
}

// testTagsAndDigests: after a pull by tag, the image is found by its tag, its
// digest reference, name:tag@digest, its id and the imageRef PullImage
// reported, always as the same image; it carries the tag and the digest
// reference; ListImages names it by what pin.RecordName makes of each form
// (the agent's presence check of the whole list).
func testTagsAndDigests(t *testing.T, target Target) {
	ctx := ctxFor(t)
	img := target.Image
	remove(ctx, t, target, img.Ref)
	pulled, err := target.Images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: img.Ref}})
	if err != nil {
		t.Fatalf("pull %s: %v", img.Ref, err)
	}
	byTag, err := status1(ctx, target, img.Ref)
	if err != nil || byTag == nil {
		t.Fatalf("image status %s after its pull: %v, %v", img.Ref, byTag, err)
	}
	id := byTag.GetId()
	t.Logf("%s: imageRef %q; id %q, repoTags %v, repoDigests %v, size %d", target.Runtime, pulled.GetImageRef(), id,
		byTag.GetRepoTags(), byTag.GetRepoDigests(), byTag.GetSize())
	switch form := IDForms[target.Runtime]; form {
	case IDWithAlgorithm:
		if !strings.HasPrefix(id, "sha256:") {
			t.Errorf("id %q, want the form %s", id, form)
		}
	case IDHex:
		if strings.Contains(id, ":") {
			t.Errorf("id %q, want the form %s", id, form)
		}
	}
	if pulled.GetImageRef() != id {
		t.Errorf("imageRef %q, want the image id %q", pulled.GetImageRef(), id)
	}
	if byTag.GetSize() == 0 {
		t.Error("size 0")
	}
	tagName, err := pin.RecordName(img.Ref)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(byTag.GetRepoTags(), tagName) {
		t.Errorf("repo tags %v do not hold %s", byTag.GetRepoTags(), tagName)
	}
	if !slices.Contains(byTag.GetRepoDigests(), img.DigestRef) {
		t.Errorf("repo digests %v do not hold %s", byTag.GetRepoDigests(), img.DigestRef)
	}
	both := tagAndDigest(t, img)
	for _, ref := range []string{img.DigestRef, both, id, pulled.GetImageRef()} {
		got, err := status1(ctx, target, ref)
		switch {
		case err != nil:
			t.Errorf("%v", err)
		case got == nil:
			t.Errorf("image status %s: not found although %s was pulled", ref, img.Ref)
		case got.GetId() != id:
			t.Errorf("image status %s: id %q, by tag %q", ref, got.GetId(), id)
		}
	}
	// A pull of a form naming the present image is the same image.
	for _, ref := range []string{img.DigestRef, both} {
		again, err := target.Images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
		if err != nil {
			t.Errorf("pull %s: %v", ref, err)
		} else if again.GetImageRef() != pulled.GetImageRef() {
			t.Errorf("pull %s: imageRef %q, the pull by tag %q", ref, again.GetImageRef(), pulled.GetImageRef())
		}
	}
	listed := listed(ctx, t, target, id)
	if listed == nil {
		t.Fatalf("ListImages does not hold id %s", id)
	}
	for _, ref := range []string{img.Ref, img.DigestRef, both} {
		name, err := pin.RecordName(ref)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(listed.GetRepoTags(), name) && !slices.Contains(listed.GetRepoDigests(), name) {
			t.Errorf("ListImages entry %v %v does not name %s (for %s)", listed.GetRepoTags(), listed.GetRepoDigests(), name, ref)
		}
	}
	for _, tag := range listed.GetRepoTags() {
		if strings.Contains(tag, "@") {
			t.Errorf("repo tag %q holds a digest", tag)
		}
	}
	remove(ctx, t, target, img.Ref)
	got, err := status1(ctx, target, img.DigestRef)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: after RemoveImage of the tag: by digest %v", target.Runtime, got)
	if keeps := RemoveTagKeepsDigest[target.Runtime]; (got != nil) != keeps {
		t.Errorf("image status %s after removing %s: %v; want present: %v", img.DigestRef, img.Ref, got, keeps)
	}
	remove(ctx, t, target, img.DigestRef)
	if got, err := status1(ctx, target, img.DigestRef); err != nil || got != nil {
		t.Errorf("image status %s after removing it: %v, %v; want absent", img.DigestRef, got, err)
	}
}

// listed returns the ListImages entry of id, nil when there is none.
func listed(ctx context.Context, t *testing.T, target Target, id string) *runtimeapi.Image {
	t.Helper()
	resp, err := target.Images.ListImages(ctx, &runtimeapi.ListImagesRequest{})
	if err != nil {
		t.Fatalf("list images: %v", err)
	}
	for _, im := range resp.GetImages() {
		if im.GetId() == id {
			return im
		}
	}
	return nil
}

// testPullByDigest: an image pulled by digest alone carries its digest
// reference and no tag, so a list entry by tag is not taken for present.
func testPullByDigest(t *testing.T, target Target) {
	ctx := ctxFor(t)
	img := target.Image
	remove(ctx, t, target, img.Ref)
	remove(ctx, t, target, img.DigestRef)
	if _, err := target.Images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: img.DigestRef}}); err != nil {
		t.Fatalf("pull %s: %v", img.DigestRef, err)
	}
	got, err := status1(ctx, target, img.DigestRef)
	if err != nil || got == nil {
		t.Fatalf("image status %s after its pull: %v, %v", img.DigestRef, got, err)
	}
	t.Logf("%s: pulled by digest: id %q, repoTags %v, repoDigests %v", target.Runtime, got.GetId(), got.GetRepoTags(), got.GetRepoDigests())
	if !slices.Contains(got.GetRepoDigests(), img.DigestRef) {
		t.Errorf("repo digests %v do not hold %s", got.GetRepoDigests(), img.DigestRef)
	}
	tagName, err := pin.RecordName(img.Ref)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(got.GetRepoTags(), tagName) {
		t.Errorf("repo tags %v hold %s, which was never pulled", got.GetRepoTags(), tagName)
	}
	if byTag, err := status1(ctx, target, img.Ref); err != nil || byTag != nil {
		t.Errorf("image status %s (never pulled by tag): %v, %v; want absent", img.Ref, byTag, err)
	}
	remove(ctx, t, target, img.DigestRef)
}

// testImageFsInfo: the disk budget reads the image filesystem's used bytes
// and mount point.
func testImageFsInfo(t *testing.T, target Target) {
	resp, err := target.Images.ImageFsInfo(ctxFor(t), &runtimeapi.ImageFsInfoRequest{})
	if err != nil {
		t.Fatalf("ImageFsInfo: %v", err)
	}
	fss := resp.GetImageFilesystems()
	if len(fss) == 0 {
		t.Fatal("ImageFsInfo names no image filesystem")
	}
	for _, fs := range fss {
		t.Logf("%s: image filesystem %q used %d bytes, %d inodes", target.Runtime, fs.GetFsId().GetMountpoint(),
			fs.GetUsedBytes().GetValue(), fs.GetInodesUsed().GetValue())
		if fs.GetFsId().GetMountpoint() == "" || fs.GetUsedBytes() == nil {
			t.Errorf("image filesystem %v: want a mount point and used bytes", fs)
		}
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
