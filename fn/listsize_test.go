package fn_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/fn"
)

// listOfSize returns image references that make a list (each with its newline) of exactly n
// bytes, n >= 1000.
func listOfSize(n int) []string {
	const line = 100 // bytes per reference with its newline
	var imgs []string
	for i := 0; n > 0; i++ {
		l := line
		if n < 2*line {
			l = n // the last takes the rest
		}
		prefix := fmt.Sprintf("registry.example.com/team/app-%06d", i)
		imgs = append(imgs, prefix+strings.Repeat("x", l-1-len(prefix)-len(":1"))+":1")
		n -= l
	}
	return imgs
}

func sizeConfig(extra string, images []string) string {
	return "apiVersion: " + fn.APIVersion + "\nkind: " + fn.Kind + "\nmetadata: {name: big}\nspec:\n" +
		extra + "  images: [" + strings.Join(images, ", ") + "]\n"
}

func listBytes(images []string) int {
	n := 0
	for _, img := range images {
		n += len(img) + 1
	}
	return n
}

// TestListSizeInline: spec.images of exactly MaxListBytes is accepted; one byte more is an error
// on spec.images naming the size, before anything is rendered.
func TestListSizeInline(t *testing.T) {
	t.Parallel()
	at := listOfSize(fn.MaxListBytes)
	if listBytes(at) != fn.MaxListBytes {
		t.Fatalf("listOfSize made %d bytes", listBytes(at))
	}
	if _, results := fn.Decode(yaml.MustParse(sizeConfig("", at)), ""); results.ExitCode() != 0 {
		t.Errorf("a list of exactly %d bytes: %v", fn.MaxListBytes, results)
	}
	over := listOfSize(fn.MaxListBytes + 1)
	_, results := fn.Decode(yaml.MustParse(sizeConfig("", over)), "")
	got := errorsOn(results, "spec.images")
	if len(got) != 1 || !strings.Contains(got[0], fmt.Sprintf("the image list is %d bytes", fn.MaxListBytes+1)) ||
		!strings.Contains(got[0], fmt.Sprint(fn.MaxListBytes)) {
		t.Errorf("errors on spec.images %q; all results: %v", got, results)
	}
}

// TestListSizeFile: the same rule for spec.imagesFile, and for a list over the limit only with
// both fields: the error is on the larger and names each part.
func TestListSizeFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name string, images []string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(strings.Join(images, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("at.txt", listOfSize(fn.MaxListBytes))
	write("over.txt", listOfSize(fn.MaxListBytes+1))
	write("most.txt", listOfSize(600_000))

	if _, results := fn.Decode(yaml.MustParse(sizeConfig("  imagesFile: at.txt\n", nil)), dir); results.ExitCode() != 0 {
		t.Errorf("a file of exactly %d bytes: %v", fn.MaxListBytes, results)
	}
	_, results := fn.Decode(yaml.MustParse(sizeConfig("  imagesFile: over.txt\n", nil)), dir)
	if got := errorsOn(results, "spec.imagesFile"); len(got) != 1 || !strings.Contains(got[0], fmt.Sprintf("is %d bytes", fn.MaxListBytes+1)) {
		t.Errorf("errors on spec.imagesFile %q; all results: %v", got, results)
	}

	_, results = fn.Decode(yaml.MustParse(sizeConfig("  imagesFile: most.txt\n", listOfSize(500_000))), dir)
	got := errorsOn(results, "spec.imagesFile")
	if len(got) != 1 || !strings.Contains(got[0], "1100000 bytes (spec.imagesFile 600000, spec.images 500000)") {
		t.Errorf("errors on spec.imagesFile %q; all results: %v", got, results)
	}
}

// TestListSizeWorkloads: the rule holds for the list with the workloads' images, which only a
// render knows: an error on spec.fromWorkloads, and nothing rendered.
func TestListSizeWorkloads(t *testing.T) {
	t.Parallel()
	var pod strings.Builder
	pod.WriteString("apiVersion: v1\nkind: Pod\nmetadata: {name: many, namespace: shop}\nspec:\n  containers:\n")
	imgs := listOfSize(1_100_000)
	for i, img := range imgs {
		fmt.Fprintf(&pod, "  - {name: c%d, image: %s}\n", i, img)
	}
	config := sizeConfig("  fromWorkloads: {}\n", []string{"busybox:1.36.1"})
	rl, err := process(t, config, pod.String())
	if err == nil {
		t.Fatal("a list over the limit rendered")
	}
	got := errorsOn(rl.Results, "spec.fromWorkloads")
	if len(got) != 1 || !strings.Contains(got[0], "spec.images 15, spec.fromWorkloads ") {
		t.Errorf("errors on spec.fromWorkloads %q; all results: %v", got, rl.Results)
	}
	for _, it := range rl.Items {
		if it.GetKind() == "DaemonSet" {
			t.Errorf("a DaemonSet was rendered")
		}
	}
}

// TestListSizeWarning: above ClientSideApplyListBytes the instance renders with a warning that
// says to apply server-side; at it, without one.
func TestListSizeWarning(t *testing.T) {
	t.Parallel()
	rl, err := process(t, sizeConfig("", listOfSize(fn.ClientSideApplyListBytes)), "")
	if err != nil || len(rl.Results) != 0 {
		t.Errorf("a list of exactly %d bytes: %v, results %v", fn.ClientSideApplyListBytes, err, rl.Results)
	}
	rl, err = process(t, sizeConfig("", listOfSize(fn.ClientSideApplyListBytes+1)), "")
	if err != nil {
		t.Fatalf("a list over %d bytes fails: %v", fn.ClientSideApplyListBytes, err)
	}
	if len(rl.Results) != 1 || rl.Results[0].Severity != framework.Warning || rl.Results[0].Field.Path != "spec.images" ||
		!strings.Contains(rl.Results[0].Message, "kubectl apply --server-side") {
		t.Errorf("results %v, want one warning on spec.images that says kubectl apply --server-side", rl.Results)
	}
	if len(rl.Items) == 0 {
		t.Error("nothing rendered")
	}
}
