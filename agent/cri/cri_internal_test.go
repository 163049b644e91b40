package cri

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"syscall"
)

// The connection can be refused after the first probe succeeded (a runtime
// that is being restarted): the dialer's refusal is reported, with the path,
// and not as a runtime that "did not answer Version within 5s".
func TestVersionErrorPrefersTheDialFailure(t *testing.T) {
	t.Parallel()
	const path = "/run/containerd/containerd.sock"
	refused := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	unavailable := status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial unix `+path+`: connect: connection refused"`)
	for _, tc := range []struct {
		name    string
		err     error
		dialErr error
		want    string
	}{
		{"refused by the dialer", unavailable, refused, "connection refused"},
		{"deadline after a refusal", status.FromContextError(context.DeadlineExceeded).Err(), refused, "connection refused"},
		{"closed at once", status.Error(codes.Unavailable, "error reading server preface: EOF"), nil, "refused at once"},
		{"silent", status.FromContextError(context.DeadlineExceeded).Err(), nil, "did not answer Version within 5s"},
		{"not CRI", status.Error(codes.Unimplemented, "unknown service runtime.v1.RuntimeService"), nil, "does not serve the CRI"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := versionError(path, 5*time.Second, tc.err, tc.dialErr)
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), path) {
				t.Errorf("error %q: want %q and the path", err, tc.want)
			}
			if tc.want != "did not answer Version within 5s" && strings.Contains(err.Error(), "did not answer") {
				t.Errorf("error %q claims a timeout", err)
			}
			if tc.dialErr != nil && !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("error %q does not wrap the refusal", err)
			}
		})
	}
}
