// Package fn is the image prefetcher's KRM function: from a short ImagePrefetcher
// configuration it generates one instance of the prefetcher (namespace, ServiceAccount, RBAC,
// image-list ConfigMap, DaemonSet, and for OpenShift the instance's SCC), derived from the
// Kustomize bundle embedded in package bundled. It runs under kpt, as a kustomize exec
// transformer, or standalone.
package fn

import (
	corev1 "k8s.io/api/core/v1"

	"github.com/nodeprefetch/image-prefetcher/fn/bundled"
)

// The function configuration's type.
const (
	APIVersion = "fn.image-prefetcher.stackrox.io/v1alpha1"
	Kind       = "ImagePrefetcher"
)

// Values of spec.flavor and spec.credentialProvider.
const (
	FlavorVanilla = "vanilla"
	FlavorOCP     = "ocp"

	CredentialProviderNone = "none"
	CredentialProviderGKE  = "gke"
	CredentialProviderECR  = "ecr"
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
	Flavor             string                       `json:"flavor,omitempty"`
	PullSecrets        []string                     `json:"pullSecrets,omitempty"`
	CredentialProvider string                       `json:"credentialProvider,omitempty"`
	MetricsCollector   bool                         `json:"metricsCollector,omitempty"`
	Prometheus         bool                         `json:"prometheus,omitempty"`
	Placement          Placement                    `json:"placement,omitempty"`
	MaxParallelPulls   *int                         `json:"maxParallelPulls,omitempty"`
	MaxConcurrentNodes *int                         `json:"maxConcurrentNodes,omitempty"`
	AgentImage         string                       `json:"agentImage,omitempty"`
	Resources          *corev1.ResourceRequirements `json:"resources,omitempty"`
}

// Placement is where the agent pods run.
type Placement struct {
	NodeSelector      map[string]string   `json:"nodeSelector,omitempty"`
	Tolerations       []corev1.Toleration `json:"tolerations,omitempty"`
	Affinity          *corev1.Affinity    `json:"affinity,omitempty"`
	PriorityClassName string              `json:"priorityClassName,omitempty"`
}

// Default fills every unset field but the name with the bundle's value.
func (c *ImagePrefetcher) Default() error {
	s := &c.Spec
	if s.Namespace == "" {
		s.Namespace = bundled.Namespace
	}
	if s.Flavor == "" {
		s.Flavor = FlavorVanilla
	}
	if s.CredentialProvider == "" {
		s.CredentialProvider = CredentialProviderNone
	}
	if s.Placement.NodeSelector == nil {
		s.Placement.NodeSelector = map[string]string{"kubernetes.io/os": "linux"}
	}
	if s.AgentImage == "" {
		s.AgentImage = bundled.AgentImage
	}
	return nil
}
