// Package fn is the image prefetcher's KRM function: from a short ImagePrefetcher
// configuration it generates one instance of the prefetcher (namespace, ServiceAccount, RBAC,
// image-list ConfigMap, DaemonSet, the components the configuration asks for, and for OpenShift
// the instance's SCC). It renders the real Kustomize bundle: the configuration becomes a
// bundle.Instance, built with krusty from the embedded base/, overlays/ and components/. It runs
// under kpt, as a kustomize exec transformer, or standalone.
package fn

import (
	corev1 "k8s.io/api/core/v1"

	"github.com/nodeprefetch/image-prefetcher/bundle"
)

// The function configuration's type.
const (
	APIVersion = "fn.image-prefetcher.stackrox.io/v1alpha1"
	Kind       = "ImagePrefetcher"
	// RenderCheckKind (same API version) is a marker a kustomization that runs the function
	// lists among its resources: the function removes it, so a build holds it only when the
	// function did not run (kustomize without --enable-alpha-plugins --enable-exec, or kubectl
	// kustomize, skip exec functions silently). No cluster serves the kind, so applying such a
	// build fails, and kubectl apply --prune prunes nothing: the instance is not deleted.
	RenderCheckKind = "ImagePrefetcherRenderCheck"
)

// CredentialProviderNone is spec.credentialProvider's default; any other value <p> adds the
// bundle's component <p>-credential-provider.
const (
	CredentialProviderNone   = "none"
	credentialProviderSuffix = "-credential-provider"
)

// ImagePrefetcher is the function configuration: one instance of the prefetcher.
type ImagePrefetcher struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Metadata   Metadata `json:"metadata"`
	Spec       Spec     `json:"spec,omitempty"`

	// dir resolves a relative Spec.ImagesFile; empty means the working directory.
	dir string
}

// Metadata is the part of ObjectMeta a function configuration carries.
type Metadata struct {
	// Name is the instance name.
	Name        string            `json:"name"`
	Namespace   string            `json:"namespace,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Spec describes the instance; every field has a default.
type Spec struct {
	Namespace          string                       `json:"namespace,omitempty"`
	Images             []string                     `json:"images,omitempty"`
	ImagesFile         string                       `json:"imagesFile,omitempty"`
	FromWorkloads      *FromWorkloads               `json:"fromWorkloads,omitempty"`
	Flavor             string                       `json:"flavor,omitempty"`
	PullSecrets        []string                     `json:"pullSecrets,omitempty"`
	CredentialProvider string                       `json:"credentialProvider,omitempty"`
	MetricsCollector   bool                         `json:"metricsCollector,omitempty"`
	Prometheus         bool                         `json:"prometheus,omitempty"`
	StartupTaint       bool                         `json:"startupTaint,omitempty"`
	PinnedImageSet     bool                         `json:"pinnedImageSet,omitempty"`
	Components         []string                     `json:"components,omitempty"`
	Placement          Placement                    `json:"placement,omitempty"`
	MaxParallelPulls   *int                         `json:"maxParallelPulls,omitempty"`
	MaxConcurrentNodes *int                         `json:"maxConcurrentNodes,omitempty"`
	AgentImage         string                       `json:"agentImage,omitempty"`
	Resources          *corev1.ResourceRequirements `json:"resources,omitempty"`
}

// Placement is where the agent pods run; set fields replace the bundle's.
type Placement = bundle.Placement

// Default fills the namespace, flavor and credential provider; other unset fields keep the
// bundle's values.
func (c *ImagePrefetcher) Default() error {
	s := &c.Spec
	if s.Namespace == "" {
		s.Namespace = bundle.DefaultNamespace
	}
	if s.Flavor == "" {
		s.Flavor = bundle.Flavors[0]
	}
	if s.CredentialProvider == "" {
		s.CredentialProvider = CredentialProviderNone
	}
	return nil
}
