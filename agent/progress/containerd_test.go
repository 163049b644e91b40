package progress_test

import (
	"regexp"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/agent/progress"
)

func TestManifestTotal(t *testing.T) {
	manifest := `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",` +
		`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:c","size":1000},` +
		`"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:l1","size":20000000},` +
		`{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:l2","size":300}]}`
	index := `{"schemaVersion":2,"manifests":[{"digest":"sha256:m","size":500,"platform":{"architecture":"amd64","os":"linux"}}]}`
	tests := []struct {
		name string
		data string
		want int64
	}{
		{"manifest: itself, config and layers", manifest, int64(len(manifest)) + 1000 + 20000000 + 300},
		{"index: itself (its manifest is another blob)", index, int64(len(index))},
		{"image config", `{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`, 0},
		{"a layer", "\x1f\x8b\x08\x00binary", 0},
		{"empty", "", 0},
	}
	for _, tt := range tests {
		if got := progress.ManifestTotal([]byte(tt.data)); got != tt.want {
			t.Errorf("%s: ManifestTotal = %d, want %d", tt.name, got, tt.want)
		}
	}
}

// containerd's identifier rule for lease IDs (pkg/identifiers).
var identifier = regexp.MustCompile(`^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$`)

func TestLeaseID(t *testing.T) {
	a := progress.LeaseID("team-a", "registry.example:5000/app/big@sha256:0123")
	for _, id := range []string{a, progress.LeaseID("", "busybox")} {
		if !identifier.MatchString(id) || len(id) > 76 {
			t.Errorf("lease ID %q is not a valid containerd identifier", id)
		}
	}
	if a != progress.LeaseID("team-a", "registry.example:5000/app/big@sha256:0123") {
		t.Error("lease ID is not stable")
	}
	if progress.LeaseID("team-a", "busybox") == progress.LeaseID("team-b", "busybox") ||
		progress.LeaseID("team-a", "busybox:1") == progress.LeaseID("team-a", "busybox:2") {
		t.Error("lease IDs collide across instances or images")
	}
}
