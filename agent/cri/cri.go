// Package cri connects to the node's container runtime through the CRI v1 API
// over its unix socket: it finds the socket when none is configured and checks
// that a runtime really answers before any pull starts, so a missing or dead
// socket fails a pass within seconds with an error naming the path.
package cri

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// knownSockets are the usual CRI socket paths, in the order Detect tries them.
var knownSockets = []string{
	"/run/containerd/containerd.sock",     // containerd
	"/run/crio/crio.sock",                 // CRI-O
	"/var/run/crio/crio.sock",             // CRI-O, older layouts where /var/run is not a link
	"/run/k3s/containerd/containerd.sock", // k3s and rke2 (embedded containerd)
	"/run/cri-dockerd.sock",               // cri-dockerd
	"/var/run/cri-dockerd.sock",
}

// DefaultTimeout bounds Dial's liveness check when no timeout is given.
const DefaultTimeout = 5 * time.Second

// maxMsgSize allows large ListImages answers (nodes with thousands of images);
// the kubelet uses the same bound.
const maxMsgSize = 16 * 1024 * 1024

// Candidates returns the socket paths Detect tries, under hostRoot (the host's
// root file system as mounted in the pod; "" or "/" for none).
func Candidates(hostRoot string) []string {
	out := make([]string, len(knownSockets))
	for i, p := range knownSockets {
		out[i] = underRoot(hostRoot, p)
	}
	return out
}

func underRoot(root, p string) string {
	if root == "" || root == "/" {
		return p
	}
	return filepath.Join(root, p)
}

// Detect returns the first candidate path that is a unix socket. The error
// lists every path tried and what was found there.
func Detect(hostRoot string) (string, error) {
	var tried []string
	for _, p := range Candidates(hostRoot) {
		fi, err := os.Stat(p)
		switch {
		case err == nil && fi.Mode().Type() == fs.ModeSocket:
			return p, nil
		case err == nil:
			tried = append(tried, p+" (not a socket)")
		case errors.Is(err, fs.ErrNotExist):
			tried = append(tried, p+" (missing)")
		default:
			tried = append(tried, fmt.Sprintf("%s (%v)", p, err))
		}
	}
	return "", fmt.Errorf("no CRI socket found; tried %s", strings.Join(tried, ", "))
}

// SocketPath returns the file system path of an endpoint given as a path or a
// unix:// URL.
func SocketPath(endpoint string) (string, error) {
	p := endpoint
	if rest, ok := strings.CutPrefix(endpoint, "unix://"); ok {
		p = rest
	} else if strings.Contains(endpoint, "://") {
		return "", fmt.Errorf("CRI endpoint %q: only unix sockets are supported", endpoint)
	}
	if p == "" {
		return "", fmt.Errorf("CRI endpoint %q: empty socket path", endpoint)
	}
	return filepath.Abs(p)
}

// Client is a connection to a CRI runtime that answered Version.
type Client struct {
	Path           string // socket path
	Images         runtimeapi.ImageServiceClient
	Runtime        runtimeapi.RuntimeServiceClient
	RuntimeName    string // e.g. "containerd", "cri-o"
	RuntimeVersion string
	conn           *grpc.ClientConn
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Conn is the runtime's one connection. containerd serves its own APIs
// (images, leases, content) on the CRI socket, so pinning and progress use
// their clients on this connection instead of dialling the socket again.
func (c *Client) Conn() grpc.ClientConnInterface { return c.conn }

// IsContainerd reports whether the runtime is a containerd (k3s and rke2
// embed one and report the same name): the one runtime whose own images,
// leases and content APIs the agent uses, for pins and pull progress.
func (c *Client) IsContainerd() bool { return c.RuntimeName == RuntimeContainerd }

// Dial connects to the runtime at endpoint (a path or a unix:// URL) and calls
// RuntimeService.Version within timeout (DefaultTimeout when zero), so a
// missing socket, a socket nobody listens on or a runtime that does not answer
// is an error naming the path.
func Dial(ctx context.Context, endpoint string, timeout time.Duration) (*Client, error) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	path, err := SocketPath(endpoint)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("CRI socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return nil, fmt.Errorf("CRI socket %s: not a unix socket (mode %s)", path, fi.Mode())
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// A plain connect first tells "nobody listens" (a stale socket file left by
	// a stopped runtime) apart from a runtime that accepts but does not answer.
	var d net.Dialer
	probe, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("CRI socket %s exists but nobody listens on it (is the runtime running?): %w", path, err)
		}
		return nil, fmt.Errorf("CRI socket %s: connect: %w", path, err)
	}
	probe.Close()

	// The dialer remembers its last failure: when Version fails, the
	// connection's own fate (refused, reset) says more than the RPC's status.
	var dialMu sync.Mutex
	var dialErr error
	conn, err := grpc.NewClient("passthrough:///"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, "unix", addr)
			if err != nil {
				dialMu.Lock()
				dialErr = err
				dialMu.Unlock()
			}
			return c, err
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsgSize)),
	)
	if err != nil {
		return nil, fmt.Errorf("CRI socket %s: %w", path, err)
	}
	c := &Client{
		Path:    path,
		Images:  runtimeapi.NewImageServiceClient(conn),
		Runtime: runtimeapi.NewRuntimeServiceClient(conn),
		conn:    conn,
	}
	v, err := c.Runtime.Version(ctx, &runtimeapi.VersionRequest{})
	if err != nil {
		conn.Close()
		dialMu.Lock()
		defer dialMu.Unlock()
		return nil, versionError(path, timeout, err, dialErr)
	}
	c.RuntimeName, c.RuntimeVersion = v.GetRuntimeName(), v.GetRuntimeVersion()
	return c, nil
}

// versionError says why the runtime at path did not answer Version: only a
// runtime that really kept silent until the deadline "did not answer within";
// one that refused or dropped the connection at once is reported as refused.
func versionError(path string, timeout time.Duration, err, dialErr error) error {
	switch {
	case errors.Is(dialErr, syscall.ECONNREFUSED):
		return fmt.Errorf("CRI socket %s: connection refused: nobody listens on it (is the runtime running?): %w", path, dialErr)
	case dialErr != nil:
		return fmt.Errorf("CRI socket %s: connect: %w", path, dialErr)
	}
	switch status.Code(err) {
	case codes.DeadlineExceeded:
		return fmt.Errorf("CRI socket %s: runtime did not answer Version within %s: %w", path, timeout, err)
	case codes.Unavailable:
		return fmt.Errorf("CRI socket %s: connection refused at once: the server closed the connection without answering "+
			"Version (is this a CRI runtime's socket, and is the runtime ready?): %w", path, err)
	case codes.Unimplemented:
		return fmt.Errorf("CRI socket %s: the server does not serve the CRI v1 RuntimeService (is this a CRI runtime's socket?): %w", path, err)
	default:
		return fmt.Errorf("CRI socket %s: Version: %w", path, err)
	}
}

// RuntimeName values reported in CRI Version.
const (
	RuntimeCRIO = "cri-o"
	// RuntimeContainerd: containerd, and the containerd embedded in k3s and
	// rke2.
	RuntimeContainerd = "containerd"
)

// JoinsConcurrentPulls reports whether the runtime makes a second PullImage of
// an image wait for the one already in flight instead of fetching it on a
// connection of its own. Measured on the e2e harness: CRI-O (1.34, 1.35) joins
// them, containerd (1.6, 2.x) does not. On a joining runtime a hedged attempt
// only queues behind the stalled pull, so the agent sends none there.
func JoinsConcurrentPulls(runtimeName string) bool { return runtimeName == RuntimeCRIO }
