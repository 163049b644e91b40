package nodelabel

import (
	"strings"
	"testing"
)

func TestKeys(t *testing.T) {
	t.Parallel()
	if got, want := Key("my-images"), "image-prefetcher.stackrox.io/my-images"; got != want {
		t.Errorf("Key = %q, want %q", got, want)
	}
	if got, want := AnnotationKey("my-images"), "list.image-prefetcher.stackrox.io/my-images"; got != want {
		t.Errorf("AnnotationKey = %q, want %q", got, want)
	}
}

func TestValidateInstance(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		instance string
		ok       bool
	}{
		{"my-images", true},
		{"a", true},
		{"a1", true},
		{"0abc", true},
		{strings.Repeat("a", 63), true},
		{strings.Repeat("a", 64), false},
		{"", false},
		{"My-Images", false}, // a valid label name, but not a DNS-1123 label
		{"my_images", false},
		{"my.images", false},
		{"-images", false},
		{"images-", false},
		{"my images", false},
		{"my/images", false},
	} {
		err := ValidateInstance(tc.instance)
		if tc.ok && err != nil {
			t.Errorf("ValidateInstance(%q) = %v, want nil", tc.instance, err)
		}
		if !tc.ok {
			if err == nil {
				t.Errorf("ValidateInstance(%q) = nil, want an error", tc.instance)
				continue
			}
			// The message names the value and the rule.
			if msg := err.Error(); !strings.Contains(msg, `"`+tc.instance+`"`) || !strings.Contains(msg, "63") {
				t.Errorf("ValidateInstance(%q) error %q does not name the value and the rule", tc.instance, msg)
			}
		}
	}
}

func TestStateValid(t *testing.T) {
	t.Parallel()
	if !Succeeded.Valid() || !Failed.Valid() || State("").Valid() || State("Succeeded").Valid() {
		t.Error("State.Valid accepts only succeeded and failed")
	}
}
