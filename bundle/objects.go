package bundle

import (
	"bytes"
	"fmt"

	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/yaml"
)

// Object is one rendered resource.
type Object struct {
	APIVersion, Kind, Namespace, Name string
	// YAML is the object alone, as rendered.
	YAML string
}

// Key identifies an object within one build.
func (o Object) Key() string {
	return o.APIVersion + "/" + o.Kind + " " + o.Namespace + "/" + o.Name
}

// Decode unmarshals the object into a typed value (e.g. *appsv1.DaemonSet).
func (o Object) Decode(into any) error {
	if err := yaml.UnmarshalStrict([]byte(o.YAML), into); err != nil {
		return fmt.Errorf("decode %s: %w", o.Key(), err)
	}
	return nil
}

// OfKind decodes every object of kind into a new T (e.g. appsv1.DaemonSet), in order.
func OfKind[T any](objs []Object, kind string) ([]*T, error) {
	var out []*T
	for _, o := range objs {
		if o.Kind != kind {
			continue
		}
		v := new(T)
		if err := o.Decode(v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// Objects splits a multi-document build output into objects, in order.
func Objects(data []byte) ([]Object, error) {
	nodes, err := (&kio.ByteReader{Reader: bytes.NewReader(data), OmitReaderAnnotations: true}).Read()
	if err != nil {
		return nil, fmt.Errorf("split build output: %w", err)
	}
	objs := make([]Object, 0, len(nodes))
	for _, n := range nodes {
		s, err := n.String()
		if err != nil {
			return nil, fmt.Errorf("render object: %w", err)
		}
		objs = append(objs, Object{
			APIVersion: n.GetApiVersion(),
			Kind:       n.GetKind(),
			Namespace:  n.GetNamespace(),
			Name:       n.GetName(),
			YAML:       s,
		})
	}
	return objs, nil
}

// ClusterScoped reports whether kind is a cluster-scoped kind this bundle produces.
func ClusterScoped(kind string) bool {
	switch kind {
	case "Namespace", "ClusterRole", "ClusterRoleBinding", "SecurityContextConstraints",
		"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "PriorityClass":
		return true
	}
	return false
}
