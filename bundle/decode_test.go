package bundle

import "testing"

// decodeAll decodes every object of kind into a new T (e.g. appsv1.DaemonSet).
func decodeAll[T any](t *testing.T, objs []Object, kind string) []*T {
	t.Helper()
	var out []*T
	for _, o := range objs {
		if o.Kind != kind {
			continue
		}
		v := new(T)
		if err := o.Decode(v); err != nil {
			t.Fatal(err)
		}
		out = append(out, v)
	}
	return out
}

// decodeOne decodes the one object of kind; the test fails unless there is exactly one.
func decodeOne[T any](t *testing.T, objs []Object, kind string) *T {
	t.Helper()
	all := decodeAll[T](t, objs, kind)
	if len(all) != 1 {
		t.Fatalf("%d objects of kind %s, want one", len(all), kind)
	}
	return all[0]
}
