// Package pintest is an in-process fake of containerd's images service for
// tests: a real gRPC server on a unix socket that keeps image records per
// namespace and answers Get, List and Update the way containerd does where the
// pin package relies on it (the namespace comes from the request's metadata;
// List understands the label-presence filter; Update with a field mask sets or
// removes single labels and leaves the others alone). It is stricter than
// containerd where containerd would misbehave: an Update without a target is
// refused, because containerd 2.x reads the target whatever the mask says.
//
//	srv := pintest.Start(t)
//	srv.Add("docker.io/library/busybox:latest", nil)
//	c := pin.NewClient(conn, 0) // conn: a gRPC connection to srv.Path()
//
// Served beside a fake CRI on one socket, as containerd serves both:
//
//	imgs := pintest.New()
//	cri := critest.Start(t, imgs.Register)
package pintest

import (
	"context"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	"github.com/containerd/containerd/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nodeprefetch/image-prefetcher/agent/pin"
)

// Server is the fake images service. Records added with Add live in
// pin.Namespace.
type Server struct {
	imagesapi.UnimplementedImagesServer

	path string

	mu      sync.Mutex
	records map[string]map[string]*imagesapi.Image // namespace -> name -> record
	fail    map[string]codes.Code                  // record name -> code every Update of it fails with
	updates int
	lists   int
}

var _ imagesapi.ImagesServer = (*Server)(nil)

// New returns a fake that serves nothing yet: Register it on a gRPC server
// (beside a fake CRI, as containerd serves both on one socket), or use Start.
func New() *Server {
	return &Server{records: map[string]map[string]*imagesapi.Image{}, fail: map[string]codes.Code{}}
}

// Register serves the fake's images API on g.
func (s *Server) Register(g *grpc.Server) { imagesapi.RegisterImagesServer(g, s) }

// Start serves a new fake on a socket of its own in a temporary directory; it
// stops when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	dir := t.TempDir()
	if len(dir) > 90 { // unix socket paths are limited to 108 bytes
		var err error
		if dir, err = os.MkdirTemp("", "pintest"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	s := New()
	s.path = filepath.Join(dir, "containerd.sock")
	l, err := net.Listen("unix", s.path)
	if err != nil {
		t.Fatalf("pintest: listen: %v", err)
	}
	g := grpc.NewServer()
	s.Register(g)
	go g.Serve(l) //nolint:errcheck // ends with Stop
	t.Cleanup(g.Stop)
	return s
}

// Path is the socket path of a fake made by Start.
func (s *Server) Path() string { return s.path }

// Add creates (or replaces) the record name in pin.Namespace with labels.
func (s *Server) Add(name string, labels map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ns := s.records[pin.Namespace]
	if ns == nil {
		ns = map[string]*imagesapi.Image{}
		s.records[pin.Namespace] = ns
	}
	ns[name] = &imagesapi.Image{
		Name:   name,
		Labels: maps.Clone(labels),
		Target: &types.Descriptor{MediaType: "application/vnd.oci.image.index.v1+json", Digest: "sha256:" + strings.Repeat("0", 64), Size: 1},
	}
}

// Remove deletes the record name, like an image GC or `crictl rmi` would.
func (s *Server) Remove(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.records[pin.Namespace], name)
}

// Labels returns a copy of the record's labels; ok is false without a record.
func (s *Server) Labels(name string) (labels map[string]string, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	img, ok := s.records[pin.Namespace][name]
	if !ok {
		return nil, false
	}
	return maps.Clone(img.Labels), true
}

// SetLabel sets (value not empty) or removes a label of an existing record,
// as someone else than the agent would.
func (s *Server) SetLabel(name, key, value string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	img := s.records[pin.Namespace][name]
	if img == nil {
		panic("pintest: SetLabel on a missing record " + name)
	}
	if img.Labels == nil {
		img.Labels = map[string]string{}
	}
	if value == "" {
		delete(img.Labels, key)
	} else {
		img.Labels[key] = value
	}
}

// FailUpdates makes every Update of the record name fail with code
// (codes.OK to stop).
func (s *Server) FailUpdates(name string, code codes.Code) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if code == codes.OK {
		delete(s.fail, name)
	} else {
		s.fail[name] = code
	}
}

// Updates counts the Update calls that changed a record.
func (s *Server) Updates() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.updates
}

// Lists counts the List calls.
func (s *Server) Lists() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lists
}

// namespace is the request's containerd namespace; containerd refuses a
// request without one.
func namespace(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(pin.NamespaceHeader); len(v) == 1 && v[0] != "" {
		return v[0], nil
	}
	return "", status.Error(codes.FailedPrecondition, "namespace is required")
}

// Get implements ImagesServer.
func (s *Server) Get(ctx context.Context, req *imagesapi.GetImageRequest) (*imagesapi.GetImageResponse, error) {
	ns, err := namespace(ctx)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	img, ok := s.records[ns][req.GetName()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "image %q: not found", req.GetName())
	}
	return &imagesapi.GetImageResponse{Image: proto.Clone(img).(*imagesapi.Image)}, nil
}

// List implements ImagesServer. Filters may only test a label's presence,
// labels."<key>", the form the pin package sends; others are refused so that a
// change of the filter cannot pass unnoticed (the real test checks containerd
// understands it).
func (s *Server) List(ctx context.Context, req *imagesapi.ListImagesRequest) (*imagesapi.ListImagesResponse, error) {
	ns, err := namespace(ctx)
	if err != nil {
		return nil, err
	}
	var keys []string
	for _, f := range req.GetFilters() {
		k, prefixed := strings.CutPrefix(f, `labels."`)
		k, quoted := strings.CutSuffix(k, `"`)
		if !prefixed || !quoted || strings.ContainsAny(k, `"=!~,`) {
			return nil, status.Errorf(codes.InvalidArgument, "pintest: unsupported filter %q", f)
		}
		keys = append(keys, k)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lists++
	resp := &imagesapi.ListImagesResponse{}
	for _, img := range s.records[ns] {
		match := len(keys) == 0
		for _, k := range keys { // filters are alternatives
			if _, ok := img.Labels[k]; ok {
				match = true
			}
		}
		if match {
			resp.Images = append(resp.Images, proto.Clone(img).(*imagesapi.Image))
		}
	}
	return resp, nil
}

// Update implements ImagesServer with containerd's field mask semantics.
func (s *Server) Update(ctx context.Context, req *imagesapi.UpdateImageRequest) (*imagesapi.UpdateImageResponse, error) {
	ns, err := namespace(ctx)
	if err != nil {
		return nil, err
	}
	in := req.GetImage()
	if in.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "Image.Name required")
	}
	if in.GetTarget() == nil {
		return nil, status.Error(codes.InvalidArgument, "pintest: no target: containerd 2.x reads Image.Target whatever the mask")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if code, ok := s.fail[in.GetName()]; ok {
		return nil, status.Errorf(code, "pintest: update of %s fails", in.GetName())
	}
	img, ok := s.records[ns][in.GetName()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "image %q: not found", in.GetName())
	}
	paths := req.GetUpdateMask().GetPaths()
	if len(paths) == 0 {
		return nil, status.Error(codes.InvalidArgument, "pintest: an Update without a mask replaces the whole record; the agent must never send one")
	}
	for _, p := range paths {
		k, ok := strings.CutPrefix(p, "labels.")
		if !ok {
			return nil, status.Errorf(codes.InvalidArgument, "pintest: the agent may only update single labels, not %q", p)
		}
		if img.Labels == nil {
			img.Labels = map[string]string{}
		}
		// Like containerd: the value from the request, and an empty or
		// missing one removes the label.
		if v := in.GetLabels()[k]; v != "" {
			img.Labels[k] = v
		} else {
			delete(img.Labels, k)
		}
	}
	s.updates++
	return &imagesapi.UpdateImageResponse{Image: proto.Clone(img).(*imagesapi.Image)}, nil
}

// String lists the records and their labels, for test failure messages.
func (s *Server) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	for name, img := range s.records[pin.Namespace] {
		fmt.Fprintf(&b, "%s %v\n", name, img.Labels)
	}
	return b.String()
}

// Dial connects to a socket as the agent's one runtime connection
// (cri.Client.Conn) would; the connection closes with the test.
func Dial(t testing.TB, path string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}
