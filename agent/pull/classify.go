package pull

import (
	"context"
	"errors"
	"regexp"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ReasonDiskFull: the runtime could not write the image because the node's
// image file system is full (ENOSPC). Not the image's fault, and not worth
// another attempt within the pass: space comes back only when something is
// deleted (the kubelet's image GC, which more pulls would only urge on to
// collect images of the list).
const ReasonDiskFull Reason = "DiskFull"

// ReasonDiskBudget is not an error of a call either: the node's image
// filesystem was at or over the agent's disk budget (Engine.Admit) when the
// image's pull was to start, so it did not start. Like DiskFull it is not the
// image's fault and not retried within the pass.
const ReasonDiskBudget Reason = "DiskBudget"

// ReasonArtifactUnsupported: the runtime cannot keep an OCI artifact (a
// manifest whose layers are not a root filesystem, as models shipped for
// image volumes are): containerd 1.x unpacks every image it pulls and fails
// with "mismatched image rootfs and manifest layers". Permanent: the next
// attempt meets the same runtime.
const ReasonArtifactUnsupported Reason = "ArtifactUnsupported"

// ArtifactUnsupportedHint says which runtime feature is missing; the engine
// adds it to the runtime's own text.
const ArtifactUnsupportedHint = "this runtime cannot pull OCI artifacts (it unpacks every image as a root filesystem): " +
	"image volumes of artifacts need containerd 2.1 or later, or CRI-O"

// ReasonRemoved is not an error of a call, so Classify never gives it: the
// image was on the node after its pull and gone again at the pass's presence
// check of the whole list, after one more pull within the pass. Something on
// the node removes it as fast as it comes (the kubelet's image GC on a node
// short of disk).
const ReasonRemoved Reason = "Removed"

// Permanent reports whether retrying within the pass cannot help: the
// registry has answered and the answer will not change by itself, or the
// node has no room for the image (DiskFull; the next pass tries again).
func (r Reason) Permanent() bool {
	switch r {
	case ReasonNotFound, ReasonUnauthorized, ReasonInvalidReference, ReasonDiskFull, ReasonDiskBudget, ReasonArtifactUnsupported:
		return true
	}
	return false
}

// Classify returns the reason for a failed CRI call: by gRPC code first, and
// for code Unknown (containerd reports registry errors that way) or errors
// without a code, by the message text. A full disk (ENOSPC's text) is
// DiskFull also under ResourceExhausted and Internal, which say no more.
func Classify(err error) Reason {
	if err == nil {
		return ReasonNone
	}
	if errors.Is(err, ErrStalled) || errors.Is(err, ErrRuntimeCanceled) {
		return ReasonTimeout
	}
	if st, ok := status.FromError(err); ok {
		switch st.Code() {
		case codes.NotFound:
			return ReasonNotFound
		case codes.InvalidArgument:
			return ReasonInvalidReference
		case codes.Unauthenticated, codes.PermissionDenied:
			return ReasonUnauthorized
		case codes.Unavailable, codes.Aborted:
			return ReasonUnavailable
		case codes.ResourceExhausted:
			// gRPC's code for "out of space" too; otherwise a rate limit.
			if diskFull(st.Message()) {
				return ReasonDiskFull
			}
			return ReasonUnavailable
		case codes.DeadlineExceeded:
			return ReasonTimeout
		case codes.Canceled:
			return ReasonCanceled
		case codes.Unknown:
			return classifyText(st.Message())
		case codes.Internal:
			// Internal says nothing more, but a full disk is the node's
			// state whatever code wraps it.
			if diskFull(st.Message()) {
				return ReasonDiskFull
			}
		}
		return ReasonUnknown
	}
	switch {
	case errors.Is(err, context.Canceled):
		return ReasonCanceled
	case errors.Is(err, context.DeadlineExceeded):
		return ReasonTimeout
	}
	return classifyText(err.Error())
}

// HTTP status codes as containerd and CRI-O quote them, e.g.
// "unexpected status from HEAD request to https://h:5000/v2/...: 503",
// "failed with status code [manifests]: 401 Unauthorized" or
// "invalid status code from registry 403 (Forbidden)". The number must stand
// alone so ports and addresses in the URL do not count.
var httpStatus = regexp.MustCompile(`(?:unexpected status|status code|http status)\D.*?[: \[]([1-5]\d\d)(?:[^0-9.:]|$)`)

// textRules are tried in order; the first match wins. Authorization comes
// before "not found" because registries word denials as "repository does
// not exist or may require authorization".
var textRules = []struct {
	reason  Reason
	phrases []string
}{
	// containerd 1.x on an OCI artifact: its own words, whatever the reference holds.
	{ReasonArtifactUnsupported, []string{"mismatched image rootfs and manifest layers"}},
	{ReasonInvalidReference, []string{"invalid reference format", "invalid reference", "repository name must be", "invalid checksum digest format"}},
	{ReasonUnauthorized, []string{"401 unauthorized", "403 forbidden", "unauthorized", "forbidden", "authentication required",
		"access denied", "pull access denied", "denied: ", "insufficient_scope", "no basic auth credentials", "authorization failed"}},
	{ReasonServerError, []string{"500 internal server error", "502 bad gateway", "503 service unavailable", "504 gateway timeout",
		"internal server error", "bad gateway", "gateway timeout", "toomanyrequests", "429 too many requests"}},
	{ReasonNotFound, []string{"not found", "manifest unknown", "name unknown", "no such image", "does not exist"}},
	{ReasonTimeout, []string{"i/o timeout", "deadline exceeded", "tls handshake timeout", "timeout awaiting response headers",
		"timed out", "timeout"}},
	{ReasonUnavailable, []string{"connection refused", "connection reset", "no such host", "network is unreachable",
		"no route to host", "broken pipe", "unexpected eof", "server misbehaving", "transport is closing", "error reading from server"}},
	{ReasonCanceled, []string{"context canceled"}},
}

// diskFull reports whether a runtime's message carries ENOSPC: containerd
// and CRI-O both end the error of a write that found the disk full with the
// errno's text, e.g. "write /var/lib/containerd/...: no space left on device".
func diskFull(msg string) bool {
	return strings.Contains(strings.ToLower(msg), "no space left on device")
}

func classifyText(msg string) Reason {
	// First: the errno is the cause, whatever the message says it was doing
	// (a path or a layer digest may hold any of the phrases below).
	if diskFull(msg) {
		return ReasonDiskFull
	}
	m := strings.ToLower(msg)
	if sm := httpStatus.FindStringSubmatch(m); sm != nil {
		switch code := sm[1]; {
		case code == "401" || code == "403":
			return ReasonUnauthorized
		case code == "404":
			return ReasonNotFound
		case code == "429" || code[0] == '5':
			return ReasonServerError
		}
	}
	for _, rule := range textRules {
		for _, p := range rule.phrases {
			if strings.Contains(m, p) {
				return rule.reason
			}
		}
	}
	return ReasonUnknown
}
