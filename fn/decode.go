package fn

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	openapierrors "k8s.io/kube-openapi/pkg/validation/errors"
	"k8s.io/kube-openapi/pkg/validation/spec"
	"k8s.io/kube-openapi/pkg/validation/strfmt"
	"k8s.io/kube-openapi/pkg/validation/validate"
	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/yaml"
	k8syaml "sigs.k8s.io/yaml"
)

// SchemaYAML is the OpenAPI schema of the configuration (schema.yaml).
//
//go:embed schema.yaml
var SchemaYAML []byte

// Schema returns the configuration's OpenAPI schema.
func Schema() (*spec.Schema, error) {
	j, err := k8syaml.YAMLToJSON(SchemaYAML)
	if err != nil {
		return nil, fmt.Errorf("schema.yaml: %w", err)
	}
	s := &spec.Schema{}
	if err := json.Unmarshal(j, s); err != nil {
		return nil, fmt.Errorf("schema.yaml: %w", err)
	}
	return s, nil
}

// Decode reads, defaults and validates a function configuration. dir resolves a relative
// spec.imagesFile. It never panics on any input: whatever is wrong is in the results, and the
// configuration is usable only when the results hold no error.
func Decode(node *yaml.RNode, dir string) (*ImagePrefetcher, framework.Results) {
	r := &reporter{ref: &yaml.ResourceIdentifier{TypeMeta: yaml.TypeMeta{APIVersion: APIVersion, Kind: Kind}}}
	if node == nil || node.IsNilOrEmpty() {
		r.errorf("", "", "no function configuration: give an %s %s", APIVersion, Kind)
		return nil, r.results
	}
	if node.YNode().Kind != yaml.MappingNode {
		r.errorf("", "", "the function configuration must be a YAML mapping")
		return nil, r.results
	}
	raw, err := node.MarshalJSON()
	if err != nil {
		r.errorf("", "", "the function configuration is not valid JSON-compatible YAML: %v", err)
		return nil, r.results
	}
	schema, err := Schema()
	if err != nil {
		r.errorf("", "", "%v", err)
		return nil, r.results
	}
	var data any
	if err := json.Unmarshal(raw, &data); err != nil {
		r.errorf("", "", "decode the function configuration: %v", err)
		return nil, r.results
	}
	// Not node.GetName(): kyaml panics when metadata is not a mapping.
	if m, ok := data.(map[string]any); ok {
		if md, ok := m["metadata"].(map[string]any); ok {
			if n, ok := md["name"].(string); ok {
				r.ref.Name = n
			}
		}
	}
	// Like kyaml's LoadFunctionConfig: the schema first (unknown fields, types, enums), then
	// the semantic checks, so one run reports every problem it can find.
	if err := validate.AgainstSchema(schema, data, strfmt.Default); err != nil {
		schemaResults(r, err)
	}
	c := &ImagePrefetcher{dir: dir}
	decode := k8syaml.UnmarshalStrict
	if len(r.results) > 0 {
		decode = k8syaml.Unmarshal
	}
	if err := decode(raw, c); err != nil {
		if len(r.results) == 0 {
			r.errorf("", "", "decode the function configuration: %v", err)
		}
		return nil, r.results
	}
	if err := c.Default(); err != nil {
		r.errorf("", "", "default the function configuration: %v", err)
		return nil, r.results
	}
	err = c.Validate()
	if err == nil {
		return c, r.results
	}
	rs, ok := err.(framework.Results)
	if !ok {
		r.errorf("", "", "%v", err)
		return c, r.results
	}
	// A field the schema already rejected is not reported twice.
	reported := map[string]bool{}
	for _, res := range r.results {
		if res.Field != nil {
			reported[res.Field.Path] = true
		}
	}
	for _, res := range rs {
		if res.Field == nil || !reported[res.Field.Path] {
			r.results = append(r.results, res)
		}
	}
	return c, r.results
}

// schemaResults turns the schema validator's errors into results with field paths.
func schemaResults(r *reporter, err error) {
	var errs []error
	if ce, ok := err.(*openapierrors.CompositeError); ok {
		errs = flatten(ce)
	} else {
		errs = []error{err}
	}
	sort.SliceStable(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
	for _, e := range errs {
		field := ""
		if v, ok := e.(*openapierrors.Validation); ok {
			field = v.Name
			if v.Code() == openapierrors.UnallowedPropertyCode {
				// Name is the parent; the unknown field is the value.
				field += "." + fmt.Sprint(v.Value)
			}
			field = strings.TrimPrefix(field, ".")
		}
		r.errorf(field, "", "%s", e.Error())
	}
}

func flatten(ce *openapierrors.CompositeError) []error {
	var out []error
	for _, e := range ce.Errors {
		if inner, ok := e.(*openapierrors.CompositeError); ok {
			out = append(out, flatten(inner)...)
			continue
		}
		out = append(out, e)
	}
	return out
}
