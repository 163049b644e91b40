package fn_test

import (
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/fn"
)

const pinDigest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func pinConfig(flavor string, images ...string) string {
	return "apiVersion: " + fn.APIVersion + "\nkind: " + fn.Kind + "\nmetadata: {name: pinned}\nspec:\n" +
		"  namespace: team-p\n  flavor: " + flavor + "\n  pinnedImageSet: true\n  images: [" + strings.Join(images, ", ") + "]\n"
}

// spec.pinnedImageSet emits the PinnedImageSet of the list, by digest, named like the instance's
// other cluster-scoped objects.
func TestPinnedImageSetField(t *testing.T) {
	t.Parallel()
	c, results := fn.Decode(yaml.MustParse(pinConfig("ocp", "busybox@"+pinDigest, "registry.example.com/app:1@"+pinDigest)), "")
	if results.ExitCode() != 0 {
		t.Fatal(results)
	}
	objs, err := c.Filter(nil)
	if err != nil {
		t.Fatal(err)
	}
	var set *yaml.RNode
	for _, o := range objs {
		if o.GetKind() == "PinnedImageSet" {
			set = o
		}
	}
	if set == nil {
		t.Fatal("no PinnedImageSet in the output")
	}
	if set.GetName() != "image-prefetcher.team-p.pinned" || set.GetNamespace() != "" {
		t.Errorf("PinnedImageSet %s/%s", set.GetNamespace(), set.GetName())
	}
	s := set.MustString()
	for _, want := range []string{"name: docker.io/library/busybox@" + pinDigest, "name: registry.example.com/app@" + pinDigest} {
		if !strings.Contains(s, want) {
			t.Errorf("PinnedImageSet lacks %q:\n%s", want, s)
		}
	}
}

func TestPinnedImageSetFieldRefusals(t *testing.T) {
	t.Parallel()
	for name, tc := range map[string]struct {
		cfg, field, says string
	}{
		"a tag":   {pinConfig("ocp", "busybox@"+pinDigest, "alpine:3.20"), "spec.images[1]", "by digest only"},
		"vanilla": {pinConfig("vanilla", "busybox@"+pinDigest), "spec.pinnedImageSet", "OpenShift"},
	} {
		t.Run(name, func(t *testing.T) {
			_, results := fn.Decode(yaml.MustParse(tc.cfg), "")
			if results.ExitCode() == 0 {
				t.Fatal("accepted, want an error")
			}
			var found bool
			for _, r := range results {
				if r.Field != nil && r.Field.Path == tc.field && strings.Contains(r.Message, tc.says) {
					found = true
				}
			}
			if !found {
				t.Errorf("no error at %s saying %q: %v", tc.field, tc.says, results)
			}
		})
	}
}
