package bundle

import "testing"

// decodeAll is OfKind for tests.
func decodeAll[T any](t *testing.T, objs []Object, kind string) []*T {
	t.Helper()
	all, err := OfKind[T](objs, kind)
	if err != nil {
		t.Fatal(err)
	}
	return all
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
