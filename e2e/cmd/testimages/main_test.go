package main

import (
	"testing"

	"github.com/nodeprefetch/image-prefetcher/e2e/testimage"
)

// TestModelSpecs: the catalogue's model image and artifact keep their digests, so a test that
// names them by digest and a second push (which then pushes nothing) stay valid. The image's
// digest depends on the architecture in its config, so only the artifact's is pinned; the
// image's is compared between two builds.
func TestModelSpecs(t *testing.T) {
	digests := func() map[string]string {
		specs, err := modelSpecs()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, s := range specs {
			if s.private || s.runnable {
				t.Errorf("%s:%s is private or runnable", s.repo, s.tag)
			}
			if want := s.tag == "artifact"; (s.artifactType == testimage.ModelArtifactType) != want {
				t.Errorf("%s:%s artifactType %q", s.repo, s.tag, s.artifactType)
			}
			d, err := s.image.Digest()
			if err != nil {
				t.Fatal(err)
			}
			out[s.repo+":"+s.tag] = d.String()
		}
		return out
	}
	first, second := digests(), digests()
	if len(first) != 2 || first["e2e/model:image"] == "" || first["e2e/model:image"] != second["e2e/model:image"] {
		t.Errorf("model specs %v, then %v", first, second)
	}
	if got, want := first["e2e/model:artifact"], "sha256:85aa97b0d446ae321d2639969351c782b7d340c33beb79e9ffd6c63e91baaf31"; got != want {
		t.Errorf("e2e/model:artifact digest %s, want %s", got, want)
	}
}
