package fn_test

import (
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/kio"
	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/fn"
)

// kptConfig is a configuration as kpt passes it: with the file it was read from.
func kptConfig(name, namespace, path string) string {
	return "apiVersion: " + fn.APIVersion + "\nkind: " + fn.Kind + "\nmetadata:\n  name: " + name + "\n  annotations:\n" +
		"    config.kubernetes.io/local-config: \"true\"\n    config.kubernetes.io/path: '" + path + "'\n    config.kubernetes.io/index: '0'\n" +
		"spec:\n  namespace: " + namespace + "\n  images: [busybox:1.36.1]\n"
}

// kptfile is a Kptfile at path whose pipeline renders the configurations at configPaths.
func kptfile(path string, configPaths ...string) string {
	s := "apiVersion: kpt.dev/v1\nkind: Kptfile\nmetadata:\n  name: p\n  annotations:\n    config.kubernetes.io/local-config: \"true\"\n" +
		"    config.kubernetes.io/path: '" + path + "'\npipeline:\n  mutators:\n"
	for _, p := range configPaths {
		s += "  - exec: image-prefetcher-fn\n    configPath: " + p + "\n"
	}
	return s
}

// TestOtherConfigs: under kpt another configuration among the items is fine when a pipeline
// step of its package renders it (several instances in one package), an error naming both
// files when none does or when it has the same instance name; under kustomize or standalone
// (no Kptfile) it is always an error, but for the function configuration itself.
func TestOtherConfigs(t *testing.T) {
	t.Parallel()
	self := kptConfig("web-images", "prefetch-web", "prefetcher.yaml")
	for _, tc := range []struct {
		name   string
		config string
		items  []string
		want   string // in the one error, on the other configuration's metadata.name; empty for none
	}{
		{"kpt, a step each", self, []string{kptfile("Kptfile", "prefetcher.yaml", "other.yaml"), self, kptConfig("batch-images", "prefetch-batch", "other.yaml")}, ""},
		{"kpt, a step in its subpackage", self, []string{kptfile("Kptfile", "prefetcher.yaml"), self, kptfile("sub/Kptfile", "prefetcher.yaml"), kptConfig("batch-images", "prefetch-batch", "sub/prefetcher.yaml")}, ""},
		{"kpt, no step", self, []string{kptfile("Kptfile", "prefetcher.yaml"), self, kptConfig("batch-images", "prefetch-batch", "other.yaml")},
			"ImagePrefetcher/batch-images (other.yaml), is among the package's resources, but only ImagePrefetcher/web-images (prefetcher.yaml) is rendered"},
		{"kpt, the same name elsewhere", self, []string{kptfile("Kptfile", "prefetcher.yaml", "other.yaml"), self, kptConfig("web-images", "prefetch-other", "other.yaml")},
			"ImagePrefetcher/web-images (other.yaml) has the instance name of ImagePrefetcher/web-images (prefetcher.yaml), which this run renders: two instances named web-images (even in namespaces prefetch-web and prefetch-other): the node label key image-prefetcher.stackrox.io/web-images is cluster-wide"},
		{"no Kptfile", sizeConfig("", []string{"busybox"}), []string{kptConfig("batch-images", "prefetch-batch", "other.yaml")},
			"ImagePrefetcher/batch-images (other.yaml), would pass through unrendered: this run renders ImagePrefetcher/big (the function configuration) only"},
		{"no Kptfile, itself", sizeConfig("", []string{"busybox"}), []string{sizeConfig("", []string{"busybox"})}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			items, err := kio.FromBytes([]byte(strings.Join(tc.items, "---\n")))
			if err != nil {
				t.Fatal(err)
			}
			rl := &framework.ResourceList{FunctionConfig: yaml.MustParse(tc.config), Items: items}
			err = fn.Processor{}.Process(rl)
			got := errorsOn(rl.Results, "metadata.name")
			switch {
			case tc.want == "" && (err != nil || len(got) > 0):
				t.Errorf("error %v, results %v", err, rl.Results)
			case tc.want != "" && (err == nil || len(got) != 1 || !strings.Contains(got[0], tc.want)):
				t.Errorf("error %v, errors on metadata.name %q; want one with %q", err, got, tc.want)
			}
		})
	}
}
