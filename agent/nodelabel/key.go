// Package nodelabel writes the node label users schedule on,
// image-prefetcher.stackrox.io/<instance> = succeeded | failed, together with an
// annotation that records which image list the label describes, and records
// Kubernetes Events on the Node for failed images.
package nodelabel

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Domain is the label domain. It is kept from the reference tool because users
// already schedule on it.
const Domain = "image-prefetcher.stackrox.io"

// annotationDomain prefixes the annotation that records the list digest. It is
// a subdomain of Domain so an admission policy can match both by suffix.
const annotationDomain = "list." + Domain

// State is the value of the node label.
type State string

const (
	// Succeeded means every image of the current list is present on the node.
	Succeeded State = "succeeded"
	// Failed means at least one image of the current list failed.
	Failed State = "failed"
)

// Valid reports whether s is one of the label values of the contract.
func (s State) Valid() bool { return s == Succeeded || s == Failed }

// Key is the label key of an instance.
func Key(instance string) string { return Domain + "/" + instance }

// AnnotationKey is the key of the node annotation that holds the digest of the
// list the instance's label describes.
func AnnotationKey(instance string) string { return annotationDomain + "/" + instance }

// ValidateInstance checks that instance can be used as the name part of the
// label key and annotation key, and as a DNS-1123 label, because the instance
// also names Kubernetes resources (DaemonSet, ServiceAccount, ...).
func ValidateInstance(instance string) error {
	var problems []string
	if msgs := validation.IsDNS1123Label(instance); len(msgs) > 0 {
		problems = append(problems, "as a DNS-1123 label: "+strings.Join(msgs, "; "))
	}
	// The DNS-1123 rule is the stricter one today; checking the full keys as
	// well keeps this correct should either prefix change.
	for _, key := range []string{Key(instance), AnnotationKey(instance)} {
		if msgs := validation.IsQualifiedName(key); len(msgs) > 0 {
			problems = append(problems, fmt.Sprintf("in key %q: %s", key, strings.Join(msgs, "; ")))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("invalid instance name %q: it must be at most 63 lowercase letters, digits or '-', "+
			"starting and ending with a letter or digit (%s)", instance, strings.Join(problems, "; "))
	}
	return nil
}

// UnreadableList is the list annotation's value while the instance's list
// file cannot be read: the label then says `failed` for "the configured list,
// unreadable" (never an outcome of an earlier list), and the first readable
// list replaces both.
const UnreadableList = "unreadable"
