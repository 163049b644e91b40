// Package critest is an in-process fake CRI runtime for tests: a real gRPC
// server on a unix socket that serves the CRI v1 ImageService and
// RuntimeService.Version, with scriptable per-image behaviour (delays, stalls,
// gRPC errors with the texts containerd sends, credentials it accepts) and
// counters to assert on (calls per image, the highest number of concurrent
// pulls). It is safe for concurrent use.
//
//	srv := critest.Start(t)
//	srv.AddImage("docker.io/library/busybox:latest", critest.Image{Size: 1 << 20})
//	srv.OnPull("docker.io/library/app:1", critest.Stall(), critest.Succeed())
//	client, _ := cri.Dial(ctx, srv.Path(), 0)
package critest

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/distribution/reference"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// RuntimeName and RuntimeVersion are what Version reports.
const (
	RuntimeName    = "critest"
	RuntimeVersion = "0.0.0"
)

// DefaultPullSize is the size of an image created by a successful pull when
// none was set with SetPulledImage.
const DefaultPullSize = 1 << 20

// Image is an image the fake runtime holds.
type Image struct {
	ID          string // "sha256:..." derived from the reference when empty
	RepoTags    []string
	RepoDigests []string
	Size        uint64
}

// Step is how the fake answers one call.
type Step struct {
	Delay   time.Duration // wait this long first (cut short by the call's context)
	Stall   bool          // wait until the call's context is done, then fail with its error
	Code    codes.Code    // codes.OK answers normally
	Message string        // the status message when Code is not OK
	// Do runs when the call arrives, before the delay, without the server's
	// lock: a test makes something happen on the node during a call (an
	// image removed while another one is pulled, as the kubelet's GC does).
	Do func()
	// Then runs once the call has had its effect (a pull's image is
	// created), before it answers, without the server's lock: an image the
	// kubelet's GC removes as soon as it is pulled.
	Then func()
}

// Succeed answers normally.
func Succeed() Step { return Step{} }

// Stall hangs until the caller gives up, like a stalled registry connection.
func Stall() Step { return Step{Stall: true} }

// Fail returns a gRPC error.
func Fail(code codes.Code, msg string) Step { return Step{Code: code, Message: msg} }

// After returns s delayed by d.
func (s Step) After(d time.Duration) Step { s.Delay = d; return s }

// Doing returns s with fn run when the call arrives (see Step.Do).
func (s Step) Doing(fn func()) Step { s.Do = fn; return s }

// AndThen returns s with fn run once the call has had its effect (see
// Step.Then).
func (s Step) AndThen(fn func()) Step { s.Then = fn; return s }

// NotFound is containerd's answer for a missing tag.
func NotFound(ref string) Step {
	return Fail(codes.NotFound, fmt.Sprintf("failed to pull and unpack image %q: failed to resolve reference %q: %s: not found", ref, ref, ref))
}

// Unauthorized is containerd 1.6's answer for missing or bad credentials
// (code Unknown, the reason only in the text), word for word.
func Unauthorized(ref string) Step {
	host, _, object := manifestOf(ref)
	return Fail(codes.Unknown, fmt.Sprintf("failed to pull and unpack image %q: failed to resolve reference %q: "+
		"pulling from host %s failed with status code [manifests %s]: 401 Unauthorized", ref, ref, host, object))
}

// Forbidden is a registry's 403 as containerd reports it.
func Forbidden(ref string) Step {
	return Fail(codes.Unknown, fmt.Sprintf("failed to pull and unpack image %q: failed to resolve reference %q: unexpected status from HEAD request: 403 Forbidden", ref, ref))
}

// ServerError is a registry's 5xx as containerd reports it.
func ServerError(ref string, httpStatus int) Step {
	return Fail(codes.Unknown, fmt.Sprintf("failed to pull and unpack image %q: failed to resolve reference %q: unexpected status from HEAD request: %d", ref, ref, httpStatus))
}

// DiskFull is containerd's answer when the node's image file system is full:
// code Unknown, the errno's text at the end (CRI-O words it the same way).
func DiskFull(ref string) Step {
	return Fail(codes.Unknown, fmt.Sprintf("failed to pull and unpack image %q: failed to extract layer sha256:%s: "+
		"write /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/42/fs/blob: no space left on device",
		ref, strings.Repeat("ab", 32)))
}

// Refused is containerd 1.6's answer when nothing listens at the
// registry's address: code Unknown, the dial error's text at the end.
func Refused(ref string) Step {
	host, path, object := manifestOf(ref)
	url := "http://" + host + "/v2/" + path + "/manifests/" + object
	return Fail(codes.Unknown, fmt.Sprintf("failed to pull and unpack image %q: failed to resolve reference %q: "+
		"failed to do request: Head %q: dial tcp %s: connect: connection refused", ref, ref, url, host))
}

// manifestOf returns the registry host, repository path and tag or digest
// that a pull of ref asks for, as containerd quotes them in its errors.
func manifestOf(ref string) (host, path, object string) {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return "registry.invalid", ref, "latest"
	}
	object = "latest"
	switch r := named.(type) {
	case reference.Canonical:
		object = r.Digest().String()
	case reference.Tagged:
		object = r.Tag()
	}
	return reference.Domain(named), reference.Path(named), object
}

// Unavailable is the runtime (or its connection) being unavailable.
func Unavailable() Step { return Fail(codes.Unavailable, "connection error: runtime is restarting") }

// Credential is a username and password the fake accepts.
type Credential struct{ Username, Password string }

// Call records one PullImage or ImageStatus call.
type Call struct {
	Method   string // "PullImage" or "ImageStatus"
	Image    string
	Username string        // from the AuthConfig; "" when anonymous
	Start    time.Time     //
	Timeout  time.Duration // time left before the call's deadline when it arrived; 0 without one
	Code     codes.Code    // what the fake answered
}

type script struct {
	steps []Step
	next  int
}

// take returns the next step; the last one repeats.
func (sc *script) take() Step {
	st := sc.steps[sc.next]
	if sc.next < len(sc.steps)-1 {
		sc.next++
	}
	return st
}

// Server is the fake runtime. Create it with Start (tests) or New and Listen.
type Server struct {
	runtimeapi.UnimplementedImageServiceServer
	runtimeapi.UnimplementedRuntimeServiceServer

	grpc *grpc.Server
	path string

	mu           sync.Mutex
	images       map[string]*Image // by the reference it was added or pulled as
	pulled       map[string]Image  // what a successful pull of a reference creates
	pullScript   map[string]*script
	statusScript map[string]*script
	listScript   *script
	lists        int
	defaultPull  Step
	auth         map[string][]Credential // ref ("" = all) -> accepted credentials
	pulls        map[string]int
	statuses     map[string]int
	inflight     int
	maxInflight  int
	calls        []Call
	runtimeName  string
	accepted     int
}

// counting counts the connections its listener accepts.
type counting struct {
	net.Listener
	s *Server
}

func (l counting) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.s.mu.Lock()
		l.s.accepted++
		l.s.mu.Unlock()
	}
	return c, err
}

// Accepted counts the connections made to the socket Listen serves (a
// client's probe connect included).
func (s *Server) Accepted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted
}

var (
	_ runtimeapi.ImageServiceServer   = (*Server)(nil)
	_ runtimeapi.RuntimeServiceServer = (*Server)(nil)
)

// New returns a server that is not listening yet.
func New() *Server {
	s := &Server{
		images:       map[string]*Image{},
		pulled:       map[string]Image{},
		pullScript:   map[string]*script{},
		statusScript: map[string]*script{},
		auth:         map[string][]Credential{},
		pulls:        map[string]int{},
		statuses:     map[string]int{},
		grpc:         grpc.NewServer(),
	}
	runtimeapi.RegisterImageServiceServer(s.grpc, s)
	runtimeapi.RegisterRuntimeServiceServer(s.grpc, s)
	return s
}

// Start starts a server on a socket in a temporary directory and stops it when
// the test ends. Each of services registers another API on the same gRPC
// server before it serves (containerd's images API from pintest, say), so that
// the socket serves what a containerd's serves.
func Start(t testing.TB, services ...func(*grpc.Server)) *Server {
	t.Helper()
	dir := t.TempDir()
	if len(dir) > 90 { // unix socket paths are limited to 108 bytes
		var err error
		if dir, err = os.MkdirTemp("", "critest"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	s := New()
	for _, register := range services {
		register(s.grpc)
	}
	if err := s.Listen(filepath.Join(dir, "cri.sock")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Listen creates the socket at path and serves on it in the background.
func (s *Server) Listen(path string) error {
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("critest: listen: %w", err)
	}
	s.mu.Lock()
	s.path = path
	s.mu.Unlock()
	go s.grpc.Serve(counting{l, s}) //nolint:errcheck // Serve returns when Stop closes the listener
	return nil
}

// Serve serves on l until Stop; for callers that manage the listener.
func (s *Server) Serve(l net.Listener) error { return s.grpc.Serve(l) }

// Stop closes the socket and every connection; calls in progress (stalls
// included) end with an error.
func (s *Server) Stop() {
	s.grpc.Stop()
	if p := s.Path(); p != "" {
		os.Remove(p)
	}
}

// Path is the socket path.
func (s *Server) Path() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.path
}

// Endpoint is the socket as a unix:// URL.
func (s *Server) Endpoint() string { return "unix://" + s.Path() }

// AddImage makes ref present. Missing fields are filled as a pull would.
func (s *Server) AddImage(ref string, img Image) {
	s.mu.Lock()
	defer s.mu.Unlock()
	im := complete(ref, img)
	s.images[ref] = &im
}

// DeleteImage removes ref, as the RemoveImage RPC does.
func (s *Server) DeleteImage(ref string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k, ok := s.findLocked(ref); ok {
		delete(s.images, k)
	}
}

// HasImage reports whether ref is present.
func (s *Server) HasImage(ref string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.findLocked(ref)
	return ok
}

// Images returns the references of the present images, sorted.
func (s *Server) Images() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.images))
	for k := range s.images {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// SetPulledImage sets the image a successful pull of ref creates.
func (s *Server) SetPulledImage(ref string, img Image) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pulled[ref] = img
}

// OnPull scripts the PullImage calls for ref: the n-th call gets the n-th
// step and the last step repeats. Without a script a pull succeeds (see
// SetDefaultPull). Credentials (RequireAuth) are checked before the script.
func (s *Server) OnPull(ref string, steps ...Step) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(steps) == 0 {
		delete(s.pullScript, ref)
		return
	}
	s.pullScript[ref] = &script{steps: steps}
}

// OnStatus scripts the ImageStatus calls for ref like OnPull. A successful
// step answers with the image if present, or an empty response.
func (s *Server) OnStatus(ref string, steps ...Step) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(steps) == 0 {
		delete(s.statusScript, ref)
		return
	}
	s.statusScript[ref] = &script{steps: steps}
}

// OnList scripts the ListImages calls like OnPull; a successful step answers
// with every present image.
func (s *Server) OnList(steps ...Step) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(steps) == 0 {
		s.listScript = nil
		return
	}
	s.listScript = &script{steps: steps}
}

// ListCalls is the number of ListImages calls.
func (s *Server) ListCalls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lists
}

// SetDefaultPull sets the answer for pulls of references without a script.
func (s *Server) SetDefaultPull(st Step) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.defaultPull = st
}

// RequireAuth makes pulls of ref ("" for every reference) fail with
// Unauthorized unless they carry one of the accepted credentials. Calls add up.
func (s *Server) RequireAuth(ref string, accepted ...Credential) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.auth[ref] = append(s.auth[ref], accepted...)
}

// PullCalls is the number of PullImage calls for ref.
func (s *Server) PullCalls(ref string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pulls[ref]
}

// StatusCalls is the number of ImageStatus calls for ref.
func (s *Server) StatusCalls(ref string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.statuses[ref]
}

// TotalPullCalls is the number of PullImage calls for all references.
func (s *Server) TotalPullCalls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.pulls {
		n += c
	}
	return n
}

// MaxConcurrentPulls is the highest number of PullImage calls seen in
// progress at once.
func (s *Server) MaxConcurrentPulls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxInflight
}

// Calls returns every PullImage and ImageStatus call so far, in arrival order.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls)
}

// PullCallsFor returns the PullImage calls for ref, in arrival order.
func (s *Server) PullCallsFor(ref string) []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Call
	for _, c := range s.calls {
		if c.Method == "PullImage" && c.Image == ref {
			out = append(out, c)
		}
	}
	return out
}

// ResetCounters clears the call counters and records, keeping images and scripts.
func (s *Server) ResetCounters() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pulls, s.statuses, s.calls, s.maxInflight = map[string]int{}, map[string]int{}, nil, s.inflight
	s.lists = 0
}

// SetRuntimeName makes Version report name instead of RuntimeName, for
// behaviour the agent chooses by runtime.
func (s *Server) SetRuntimeName(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.runtimeName = name
}

// Version implements RuntimeService.
func (s *Server) Version(context.Context, *runtimeapi.VersionRequest) (*runtimeapi.VersionResponse, error) {
	s.mu.Lock()
	name := s.runtimeName
	s.mu.Unlock()
	if name == "" {
		name = RuntimeName
	}
	return &runtimeapi.VersionResponse{
		Version:           "0.1.0",
		RuntimeName:       name,
		RuntimeVersion:    RuntimeVersion,
		RuntimeApiVersion: "v1",
	}, nil
}

// ImageStatus implements ImageService.
func (s *Server) ImageStatus(ctx context.Context, req *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	ref := req.GetImage().GetImage()
	s.mu.Lock()
	s.statuses[ref]++
	st := Succeed()
	if sc := s.statusScript[ref]; sc != nil {
		st = sc.take()
	}
	i := s.record(ctx, "ImageStatus", ref, "")
	s.mu.Unlock()

	if err := s.play(ctx, st, i); err != nil {
		return nil, err
	}
	s.mu.Lock()
	resp := &runtimeapi.ImageStatusResponse{}
	if k, ok := s.findLocked(ref); ok {
		resp.Image = toAPI(s.images[k])
	}
	s.mu.Unlock()
	if st.Then != nil {
		st.Then()
	}
	return resp, nil
}

// PullImage implements ImageService.
func (s *Server) PullImage(ctx context.Context, req *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	ref := req.GetImage().GetImage()
	user, pass := userPass(req.GetAuth())
	s.mu.Lock()
	s.pulls[ref]++
	s.inflight++
	s.maxInflight = max(s.maxInflight, s.inflight)
	i := s.record(ctx, "PullImage", ref, user)
	var st Step
	switch {
	case !s.authorizedLocked(ref, user, pass):
		st = Unauthorized(ref)
	case s.pullScript[ref] != nil:
		st = s.pullScript[ref].take()
	default:
		st = s.defaultPull
	}
	if _, err := reference.ParseNormalizedNamed(ref); err != nil && st.Code == codes.OK && !st.Stall {
		// containerd's words (1.6 and 2.x) for a reference it cannot parse.
		st = Fail(codes.Unknown, fmt.Sprintf("failed to parse image reference %q: %v", ref, err))
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inflight--
		s.mu.Unlock()
	}()

	if err := s.play(ctx, st, i); err != nil {
		return nil, err
	}
	s.mu.Lock()
	k, ok := s.findLocked(ref)
	if !ok {
		im := complete(ref, s.pulled[ref])
		s.images[ref] = &im
		k = ref
	}
	id := s.images[k].ID
	s.mu.Unlock()
	if st.Then != nil {
		st.Then()
	}
	return &runtimeapi.PullImageResponse{ImageRef: id}, nil
}

// RemoveImage implements ImageService.
func (s *Server) RemoveImage(_ context.Context, req *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	s.DeleteImage(req.GetImage().GetImage())
	return &runtimeapi.RemoveImageResponse{}, nil
}

// ListImages implements ImageService.
func (s *Server) ListImages(ctx context.Context, _ *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	s.mu.Lock()
	s.lists++
	st := Succeed()
	if s.listScript != nil {
		st = s.listScript.take()
	}
	s.mu.Unlock()
	if err := wait(ctx, st); err != nil {
		return nil, err
	}
	s.mu.Lock()
	resp := &runtimeapi.ListImagesResponse{}
	for _, k := range sortedKeys(s.images) {
		resp.Images = append(resp.Images, toAPI(s.images[k]))
	}
	s.mu.Unlock()
	if st.Then != nil {
		st.Then()
	}
	return resp, nil
}

// ImageFsInfo implements ImageService: the used bytes are the sum of the sizes.
func (s *Server) ImageFsInfo(context.Context, *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var used uint64
	for _, im := range s.images {
		used += im.Size
	}
	return &runtimeapi.ImageFsInfoResponse{ImageFilesystems: []*runtimeapi.FilesystemUsage{{
		Timestamp:  time.Now().UnixNano(),
		FsId:       &runtimeapi.FilesystemIdentifier{Mountpoint: "/var/lib/critest"},
		UsedBytes:  &runtimeapi.UInt64Value{Value: used},
		InodesUsed: &runtimeapi.UInt64Value{Value: uint64(len(s.images))},
	}}}, nil
}

// record appends a call and returns its index; s.mu must be held.
func (s *Server) record(ctx context.Context, method, ref, user string) int {
	c := Call{Method: method, Image: ref, Username: user, Start: time.Now()}
	if d, ok := ctx.Deadline(); ok {
		c.Timeout = time.Until(d)
	}
	s.calls = append(s.calls, c)
	return len(s.calls) - 1
}

// play carries out a step and records its code on call i.
func (s *Server) play(ctx context.Context, st Step, i int) error {
	err := wait(ctx, st)
	s.mu.Lock()
	if i < len(s.calls) { // ResetCounters may have dropped the record
		s.calls[i].Code = status.Code(err)
	}
	s.mu.Unlock()
	return err
}

func wait(ctx context.Context, st Step) error {
	if st.Do != nil {
		st.Do()
	}
	if st.Delay > 0 {
		t := time.NewTimer(st.Delay)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-t.C:
		}
	}
	if st.Stall {
		<-ctx.Done()
		return status.FromContextError(ctx.Err()).Err()
	}
	if st.Code != codes.OK {
		return status.Error(st.Code, st.Message)
	}
	return nil
}

func (s *Server) authorizedLocked(ref, user, pass string) bool {
	for _, key := range []string{ref, ""} {
		accepted, ok := s.auth[key]
		if !ok {
			continue
		}
		if !slices.Contains(accepted, Credential{user, pass}) {
			return false
		}
	}
	return true
}

// findLocked finds a present image by the reference it was stored as, its
// ID, or a tag or digest reference, compared normalized as containerd's CRI
// compares them: "busybox" is docker.io/library/busybox:latest, and
// name:tag@digest is name@digest (the digest decides, the tag is dropped).
func (s *Server) findLocked(ref string) (string, bool) {
	if _, ok := s.images[ref]; ok {
		return ref, true
	}
	want := normalized(ref)
	for _, k := range sortedKeys(s.images) {
		im := s.images[k]
		if im.ID == ref {
			return k, true
		}
		for _, n := range slices.Concat(im.RepoTags, im.RepoDigests) {
			if n == ref || (want != "" && normalized(n) == want) {
				return k, true
			}
		}
	}
	return "", false
}

// normalized is ref as containerd's CRI names its image record ("" when ref
// does not parse).
func normalized(ref string) string {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return ""
	}
	return named.String()
}

func userPass(a *runtimeapi.AuthConfig) (string, string) {
	if a == nil {
		return "", ""
	}
	if a.GetUsername() != "" || a.GetAuth() == "" {
		return a.GetUsername(), a.GetPassword()
	}
	raw, err := base64.StdEncoding.DecodeString(a.GetAuth())
	if err != nil {
		return "", ""
	}
	u, p, _ := strings.Cut(string(raw), ":")
	return u, p
}

// complete fills what a runtime would report for an image pulled as ref, as
// containerd does: a tag reference is kept normalized (docker.io/library/
// busybox:latest for busybox), name:tag@digest keeps only name@digest (the
// tag is dropped), and the digest reference is the repository with the
// manifest digest (made up from ref when ref has none). Tags and digests set
// by the caller are kept as they are.
func complete(ref string, im Image) Image {
	sum := sha256.Sum256([]byte(ref))
	hexSum := hex.EncodeToString(sum[:])
	if im.ID == "" {
		im.ID = "sha256:" + hexSum
	}
	if im.Size == 0 {
		im.Size = DefaultPullSize
	}
	named, err := reference.ParseDockerRef(ref)
	switch {
	case err != nil:
		if im.RepoTags == nil && im.RepoDigests == nil {
			im.RepoTags = []string{ref}
		}
	default:
		c, canonical := named.(reference.Canonical)
		if t, ok := named.(reference.Tagged); ok && !canonical && im.RepoTags == nil {
			im.RepoTags = []string{reference.TrimNamed(named).Name() + ":" + t.Tag()}
		}
		if im.RepoDigests == nil {
			if canonical {
				im.RepoDigests = []string{named.Name() + "@" + c.Digest().String()}
			} else {
				im.RepoDigests = []string{named.Name() + "@sha256:" + hexSum}
			}
		}
	}
	im.RepoTags = slices.Clone(im.RepoTags)
	im.RepoDigests = slices.Clone(im.RepoDigests)
	return im
}

func toAPI(im *Image) *runtimeapi.Image {
	return &runtimeapi.Image{
		Id:          im.ID,
		RepoTags:    slices.Clone(im.RepoTags),
		RepoDigests: slices.Clone(im.RepoDigests),
		Size:        im.Size,
		Spec:        &runtimeapi.ImageSpec{Image: im.ID},
	}
}

func sortedKeys(m map[string]*Image) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
