package bundle

import (
	"fmt"
	"strings"
	"testing"
)

const (
	digestA = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	digestB = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"
)

type pinnedImageSetObject struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		PinnedImages []struct {
			Name string `json:"name"`
		} `json:"pinnedImages"`
	} `json:"spec"`
}

// The instance's list becomes a cluster-scoped PinnedImageSet named like the instance's other
// cluster-scoped objects, with every reference fully qualified and by digest only.
func TestPinnedImageSetOfTheList(t *testing.T) {
	t.Parallel()
	in := Instance{
		Flavor:    FlavorOCP,
		Namespace: "team-p",
		Name:      "pinned",
		Images: []byte("# apps\nbusybox@" + digestA + "\n" +
			"registry.example.com/team/app:2.0@" + digestB + "  # the tag is dropped\n" +
			"docker.io/library/busybox@" + digestA + "\n"),
		PinnedImageSet: true,
	}
	out, err := in.Render()
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Objects(out)
	if err != nil {
		t.Fatal(err)
	}
	set := decodeOne[pinnedImageSetObject](t, objs, "PinnedImageSet")
	if set.APIVersion != "machineconfiguration.openshift.io/v1" {
		t.Errorf("apiVersion %s", set.APIVersion)
	}
	if set.Metadata.Name != "image-prefetcher.team-p.pinned" || set.Metadata.Namespace != "" {
		t.Errorf("PinnedImageSet %q in namespace %q, want image-prefetcher.team-p.pinned, cluster-scoped", set.Metadata.Name, set.Metadata.Namespace)
	}
	if set.Metadata.Labels["app.kubernetes.io/instance"] != "pinned" {
		t.Errorf("labels %v: the instance label is missing", set.Metadata.Labels)
	}
	var names []string
	for _, p := range set.Spec.PinnedImages {
		names = append(names, p.Name)
	}
	want := []string{"docker.io/library/busybox@" + digestA, "registry.example.com/team/app@" + digestB}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Errorf("pinnedImages %v, want %v (normalised, deduplicated, tags dropped)", names, want)
	}

	// Without the option there is none.
	in.PinnedImageSet = false
	out, err = in.Render()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "PinnedImageSet") {
		t.Error("a PinnedImageSet without the option")
	}
}

func TestPinnedImageSetRefusals(t *testing.T) {
	t.Parallel()
	var many strings.Builder
	for i := range MaxPinnedImages + 1 {
		fmt.Fprintf(&many, "registry.example.com/app%d@%s\n", i, digestA)
	}
	for name, tc := range map[string]struct {
		flavor, list string
		want         []string
	}{
		"a tag":           {FlavorOCP, "busybox@" + digestA + "\nalpine:3.20\n", []string{"overlays/ocp/images.txt:2", "alpine:3.20", "by digest only"}},
		"a bad line":      {FlavorOCP, "busybox@" + digestA + "\nNot A Reference\n", []string{"images.txt:2", "Not A Reference"}},
		"an empty list":   {FlavorOCP, "# nothing\n", []string{"no image"}},
		"too many images": {FlavorOCP, many.String(), []string{"501 images", "at most 500"}},
		"vanilla":         {FlavorVanilla, "busybox@" + digestA + "\n", []string{"OpenShift", "pin-images"}},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Instance{Flavor: tc.flavor, Images: []byte(tc.list), PinnedImageSet: true}.Render()
			if err == nil {
				t.Fatal("rendered, want an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}
