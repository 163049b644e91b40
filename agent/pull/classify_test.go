package pull

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestClassify(t *testing.T) {
	t.Parallel()
	unknown := func(msg string) error { return status.Error(codes.Unknown, msg) }
	tests := []struct {
		err  error
		want Reason
	}{
		{nil, ReasonNone},
		{status.Error(codes.NotFound, `failed to pull and unpack image "docker.io/library/busybox:nope": not found`), ReasonNotFound},
		{status.Error(codes.InvalidArgument, "bad"), ReasonInvalidReference},
		{status.Error(codes.Unauthenticated, "x"), ReasonUnauthorized},
		{status.Error(codes.PermissionDenied, "x"), ReasonUnauthorized},
		{status.Error(codes.Unavailable, "connection error"), ReasonUnavailable},
		{status.Error(codes.ResourceExhausted, "x"), ReasonUnavailable},
		{status.Error(codes.DeadlineExceeded, "context deadline exceeded"), ReasonTimeout},
		{status.Error(codes.Canceled, "context canceled"), ReasonCanceled},
		{status.Error(codes.Internal, "not found"), ReasonUnknown}, // code first: Internal says nothing more
		// containerd's texts under code Unknown
		{unknown(`failed to pull and unpack image "127.0.0.1:5001/private/app:1": failed to resolve reference "127.0.0.1:5001/private/app:1": pulling from host 127.0.0.1:5001 failed with status code [manifests 1]: 401 Unauthorized`), ReasonUnauthorized},
		{unknown(`failed to resolve reference "r/x:1": unexpected status from HEAD request to https://r:5000/v2/x/manifests/1: 403 Forbidden`), ReasonUnauthorized},
		{unknown(`failed to resolve reference "docker.io/library/nope:1": pull access denied, repository does not exist or may require authorization: server message: insufficient_scope: authorization failed`), ReasonUnauthorized},
		{unknown(`failed to resolve reference "r:5000/x:1": r:5000/x:1: not found`), ReasonNotFound},
		{unknown(`failed to pull and unpack image "Foo": invalid reference format: repository name must be lowercase`), ReasonInvalidReference},
		// containerd 1.6.20 on an OCI artifact (e2e TestRuntimeModelImageAndArtifact), even with a
		// name that holds another rule's words
		{unknown(`failed to pull and unpack image "127.0.0.1:5000/e2e/model:artifact": failed to unpack image on snapshotter overlayfs: mismatched image rootfs and manifest layers`), ReasonArtifactUnsupported},
		{unknown(`failed to pull and unpack image "r/unauthorized-models:timeout": failed to unpack image on snapshotter overlayfs: mismatched image rootfs and manifest layers`), ReasonArtifactUnsupported},
		{unknown(`failed to resolve reference "r/x:1": unexpected status from HEAD request to https://127.0.0.1:5000/v2/x/manifests/1: 503`), ReasonServerError},
		{unknown(`unexpected status from GET request to https://r/v2/x/blobs/sha256:1: 502 Bad Gateway`), ReasonServerError},
		{unknown(`unexpected status: 500 Internal Server Error`), ReasonServerError},
		{unknown(`toomanyrequests: You have reached your pull rate limit`), ReasonServerError},
		{unknown(`failed to copy: httpReadSeeker: failed open: failed to do request: Get "https://r/v2/x": dial tcp 10.0.0.1:443: i/o timeout`), ReasonTimeout},
		{unknown(`failed to do request: Head "https://r/v2/": net/http: TLS handshake timeout`), ReasonTimeout},
		{unknown(`failed to do request: Head "https://127.0.0.1:5000/v2/x/manifests/1": dial tcp 127.0.0.1:5000: connect: connection refused`), ReasonUnavailable},
		{unknown(`dial tcp: lookup nope.invalid: no such host`), ReasonUnavailable},
		{unknown(`something else entirely`), ReasonUnknown},
		// CRI-O's texts
		{unknown(`initializing source docker://r/x:1: reading manifest 1 in r/x: manifest unknown`), ReasonNotFound},
		{unknown(`initializing source docker://r/x:1: Requesting bearer token: invalid status code from registry 403 (Forbidden)`), ReasonUnauthorized},
		{unknown(`reading manifest 1 in r/x: received unexpected HTTP status: 503 Service Unavailable`), ReasonServerError},
		// a full disk: ENOSPC's text, whatever the message says the runtime was doing
		{unknown(`failed to pull and unpack image "r/x:1": failed to extract layer sha256:1: write /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/9/fs/a: no space left on device`), ReasonDiskFull},
		{unknown(`failed to pull and unpack image "r/x:1": failed to copy: write /var/lib/containerd/io.containerd.content.v1.content/ingest/1/data: no space left on device: unknown`), ReasonDiskFull},
		{unknown(`writing blob: storing blob to file "/var/tmp/storage1/1": write /var/tmp/storage1/1: no space left on device`), ReasonDiskFull}, // CRI-O
		{status.Error(codes.ResourceExhausted, "write /var/lib/x: no space left on device"), ReasonDiskFull},
		{status.Error(codes.Internal, "mkdir /var/lib/containerd/tmpmounts/1: no space left on device"), ReasonDiskFull},
		{status.Error(codes.NotFound, "no space left on device"), ReasonNotFound}, // code first
		{errors.New("write /var/lib/x: no space left on device"), ReasonDiskFull},
		// errors without a gRPC status
		{context.Canceled, ReasonCanceled},
		{fmt.Errorf("pull: %w", context.DeadlineExceeded), ReasonTimeout},
		{errors.New("401 Unauthorized"), ReasonUnauthorized},
	}
	for _, tt := range tests {
		if got := Classify(tt.err); got != tt.want {
			t.Errorf("Classify(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

func TestPermanent(t *testing.T) {
	t.Parallel()
	// DiskFull: not the image's fault, but no attempt within the pass can
	// help, and each would only fill the disk further.
	permanent := map[Reason]bool{ReasonNotFound: true, ReasonUnauthorized: true, ReasonInvalidReference: true, ReasonDiskFull: true,
		ReasonDiskBudget: true, ReasonArtifactUnsupported: true}
	for _, r := range []Reason{ReasonNone, ReasonNotFound, ReasonUnauthorized, ReasonInvalidReference, ReasonTimeout,
		ReasonUnavailable, ReasonServerError, ReasonCanceled, ReasonUnknown, ReasonDiskFull, ReasonDiskBudget, ReasonArtifactUnsupported} {
		if r.Permanent() != permanent[r] {
			t.Errorf("%q.Permanent() = %v", r, r.Permanent())
		}
	}
}
