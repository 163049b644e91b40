// Package credentials finds the registry credentials to try for an image:
// docker config files (pull secrets) matched the way the kubelet matches them,
// and kubelet credential provider plugins.
package credentials

import (
	"context"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Credential is one set of registry credentials that may be tried for an image.
type Credential struct {
	// Source says where the credential came from (file and matched key, or plugin
	// name and matched key). It is safe to log: it never holds a secret.
	Source string
	// Auth is passed to CRI PullImage as is.
	Auth *runtimeapi.AuthConfig
}

// Provider returns the credentials to try for image (a normalized, fully
// qualified reference), in the order to try them. An empty slice means anonymous.
type Provider interface {
	Lookup(ctx context.Context, image string) ([]Credential, error)
}
