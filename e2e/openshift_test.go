package e2e_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// openshiftAPI is the module that holds OpenShift's CRDs as OpenShift installs them (schemas and
// CEL rules included); the tests read them from the Go module cache, so the cluster validates our
// OpenShift objects with OpenShift's own schemas, not a hand-made approximation.
const openshiftAPI = "github.com/openshift/api@v0.0.0-20260213204242-d34f11c515b3"

// OpenShift CRDs, by path in openshiftAPI.
const (
	sccCRDFile            = "payload-manifests/crds/0000_03_config-operator_01_securitycontextconstraints.crd.yaml"
	pinnedImageSetCRDFile = "payload-manifests/crds/0000_80_machine-config_01_pinnedimagesets.crd.yaml"
)

// installOpenShiftCRDs applies the CRDs at files of openshiftAPI (replacing a minimal stand-in of the same
// name) and deletes them when the test ends.
func installOpenShiftCRDs(t *testing.T, env *clusterenv.Env, files ...string) {
	t.Helper()
	out, err := exec.Command("go", "mod", "download", "-json", openshiftAPI).Output()
	if err != nil {
		t.Fatalf("go mod download %s: %v", openshiftAPI, err)
	}
	var mod struct{ Dir, Error string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		t.Fatalf("go mod download %s: %v %s", openshiftAPI, err, mod.Error)
	}
	for _, f := range files {
		crd, err := os.ReadFile(filepath.Join(mod.Dir, f))
		if err != nil {
			t.Fatalf("%s: %v", openshiftAPI, err)
		}
		name := strings.TrimSuffix(filepath.Base(f), ".crd.yaml")
		// A stand-in deleted by an earlier test may still be terminating: apply again until it takes.
		var applied string
		err = wait.PollUntilContextTimeout(t.Context(), time.Second, time.Minute, true, func(ctx context.Context) (bool, error) {
			out, err := kubectl(t, env, crd, "apply", "--server-side", "--force-conflicts", "-o", "name", "-f", "-")
			applied = strings.TrimSpace(out)
			return err == nil, nil
		})
		if err != nil {
			t.Fatalf("apply CRD %s: %v\n%s", name, err, applied)
		}
		t.Cleanup(func() { _, _ = kubectl(t, env, nil, "delete", applied, "--wait=false") })
		if out, err := kubectl(t, env, nil, "wait", "--for=condition=Established", applied, "--timeout=60s"); err != nil {
			t.Fatalf("CRD %s not established: %v\n%s", applied, err, out)
		}
	}
}

// Scenario: OpenShift's PinnedImageSet of the list, checked by the real API server against OpenShift's own CRD
// (a server-side dry run of the whole ocp instance, SCC included, with the real SCC schema); the CRD's own
// rules refuse a tag, as the bundle does before rendering.
func TestScenarioPinnedImageSetDryRun(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	installOpenShiftCRDs(t, env, sccCRDFile, pinnedImageSetCRDFile)
	var list []string
	for _, name := range []string{"e2e/family:a", "e2e/random:4mib"} {
		list = append(list, env.Image(t, name).DigestRef)
	}
	ns := "e2e-pinned-" + suffix(t)
	out, err := bundle.Instance{
		Flavor:         bundle.FlavorOCP,
		Namespace:      ns,
		Name:           "pinned-dry-run",
		Images:         []byte(strings.Join(list, "\n") + "\n"),
		PinnedImageSet: true,
	}.Render()
	if err != nil {
		t.Fatal(err)
	}
	// The dry run of the namespaced objects needs their namespace.
	if out, err := kubectl(t, env, nil, "create", "namespace", ns, "--save-config"); err != nil {
		t.Fatalf("create namespace: %v\n%s", err, out)
	}
	t.Cleanup(func() { _, _ = kubectl(t, env, nil, "delete", "namespace", ns, "--wait=false") })
	res, err := kubectl(t, env, out, "apply", "--dry-run=server", "-f", "-")
	if err != nil {
		t.Fatalf("server dry run of the ocp instance with its PinnedImageSet: %v\n%s", err, res)
	}
	if !strings.Contains(res, "pinnedimageset.machineconfiguration.openshift.io/image-prefetcher."+ns+".pinned-dry-run") {
		t.Errorf("the dry run did not create the PinnedImageSet:\n%s", res)
	}
	if strings.Contains(strings.ToLower(res), "warning") {
		t.Errorf("the API server warned:\n%s", res)
	}
	t.Logf("accepted by OpenShift's CRDs:\n%s", res)

	tagged := "apiVersion: machineconfiguration.openshift.io/v1\nkind: PinnedImageSet\nmetadata: {name: e2e-tagged}\n" +
		"spec: {pinnedImages: [{name: " + env.Image(t, "e2e/family:a").Ref + "}]}\n"
	res, err = kubectl(t, env, []byte(tagged), "apply", "--dry-run=server", "-f", "-")
	if err == nil || !strings.Contains(res, "sha256") {
		t.Errorf("OpenShift's CRD accepted a tag (or refused it for another reason): %v\n%s", err, res)
	}
}
