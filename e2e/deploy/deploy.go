// Package deploy builds image prefetcher instances for the e2e cluster: the repository's own
// overlay (or any rendered manifests, e.g. the KRM function's) wrapped in an e2e-only
// kustomization that adapts the agent's DaemonSet to the harness's single-node cluster.
//
// What the e2e layer changes, and why (see ../README.md):
//   - the agent image: the one `e2e/cluster.sh push-agent-image` pushed, by digest;
//   - hostNetwork with ClusterFirstWithHostNet and KUBERNETES_SERVICE_HOST/PORT=127.0.0.1:6443 (or the
//     fleet gateway's address, which every node's network namespace reaches): the cluster has no
//     kube-proxy, so the Service VIP of the API server does not route;
//   - the metrics port: with hostNetwork it is a host port, so each instance gets its own to let
//     several instances (and other people's) share the node;
//   - the CRI socket directory: the harness's runtime listens below a host root of its own (the same
//     layout as a node's /run/containerd or /run/crio), not on the host's own path; likewise the
//     image filesystem, and, when given, the CRI-O directories the vanilla overlay mounts beside
//     containerd's;
//   - optional agent flags (a short --recheck-interval) and the pull secret's content.
//
// Everything else (RBAC, names, probes, security context, components) is the product's.
package deploy

import (
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/internal/recipe"
)

// Options describe one e2e instance.
type Options struct {
	// Namespace and Instance name the instance (both required).
	Namespace, Instance string
	// OverlayNamespace, when set, is the namespace written into the instance overlay; a layer
	// around it then moves the instance into Namespace, as Flux's targetNamespace or a wrapping
	// kustomization with `namespace:` would.
	OverlayNamespace string
	// Flavor is the overlay the instance is made from (default vanilla; ocp for a CRI-O node).
	Flavor string
	// Images is the image list, one reference per entry (images.txt of the overlay).
	Images []string
	// Components are names under components/ added to the instance overlay.
	Components []string
	// AgentImage is the agent container's image reference (required).
	AgentImage string
	// CRISocketDir is the host directory that holds containerd.sock (required).
	CRISocketDir string
	// ImageFs is the image filesystem's directory on the host as ImageFsInfo names it
	// (required): mounted where the agent looks for it (below /host), for the disk budget.
	ImageFs string
	// CRIOSocketDir and CRIOImageFs, when set, are the host directories of the crio-socket and
	// crio-image-fs volumes (the latter mounted below /host as ImageFs is), which the vanilla
	// overlay has for CRI-O nodes beside containerd's. Unset, those volumes stay as the overlay
	// has them, or absent (ocp): a volume patched by name is added when the overlay lacks it.
	CRIOSocketDir, CRIOImageFs string
	// ListenPort is the host port of the agent's /healthz, /readyz and /metrics (required).
	ListenPort int
	// RecheckInterval, when set, is passed as --recheck-interval.
	RecheckInterval string
	// PullSecret, when set, replaces the pull-secret component's placeholder dockerconfigjson.
	PullSecret []byte
	// ExtraArgs are appended to the agent's arguments.
	ExtraArgs []string
	// CollectorGRPCPort and CollectorHTTPPort, when set, put the results collector of
	// components/metrics-collector on the host network at these ports and point the agent at it
	// over loopback (the harness has no kube-proxy and no cluster DNS for the Service name).
	CollectorGRPCPort, CollectorHTTPPort int
	// APIServerHost is where the agents reach the API server (default 127.0.0.1, the first node's own
	// loopback; a cluster with fleet nodes needs the fleet gateway's address).
	APIServerHost string
	// NodeSelector, when set, is added to the agent pods' nodeSelector (the overlay's stays).
	NodeSelector map[string]string
}

// UseHarness sets the host paths and the API server address of the harness's nodes: for the ocp
// flavor (CRI-O nodes only) the first node's runtime directories; otherwise containerd's and CRI-O's
// both, as every node of the harness has them in its own mount namespace.
func (o *Options) UseHarness(env *clusterenv.Env) {
	if o.Flavor == bundle.FlavorOCP {
		o.CRISocketDir, o.ImageFs = filepath.Dir(env.CRISocket), env.ImageFs
	} else {
		c, r := env.NodePathsOf(clusterenv.RuntimeContainerd), env.NodePathsOf(clusterenv.RuntimeCRIO)
		o.CRISocketDir, o.ImageFs, o.CRIOSocketDir, o.CRIOImageFs = c.SocketDir, c.ImageFs, r.SocketDir, r.ImageFs
	}
	// fleet nodes have their own loopback: they reach the API server at the fleet gateway, as the first
	// node does too
	if g := env.FleetGateway(); g != "" {
		o.APIServerHost = g
	}
}

func (o Options) check() error {
	switch {
	case o.Namespace == "" || o.Instance == "":
		return fmt.Errorf("deploy: namespace and instance are required")
	case o.AgentImage == "":
		return fmt.Errorf("deploy %s: no agent image (run e2e/cluster.sh push-agent-image)", o.Instance)
	case o.CRISocketDir == "":
		return fmt.Errorf("deploy %s: no CRI socket directory", o.Instance)
	case o.ImageFs == "":
		return fmt.Errorf("deploy %s: no image filesystem directory", o.Instance)
	case o.ListenPort <= 0:
		return fmt.Errorf("deploy %s: no listen port", o.Instance)
	}
	return nil
}

// ImagesFile renders a list as images.txt content.
func ImagesFile(images []string) string {
	return "# e2e list\n" + strings.Join(images, "\n") + "\n"
}

// Overlay writes a copy of the bundle with the instance overlay of overlays/vanilla for o under
// dir, and the e2e kustomization on top of it in dir/e2e; it returns dir/e2e.
func Overlay(root, dir string, o Options) (string, error) {
	if err := o.check(); err != nil {
		return "", err
	}
	flavor := o.Flavor
	if flavor == "" {
		flavor = bundle.FlavorVanilla
	}
	in := bundle.Instance{
		Flavor:     flavor,
		Namespace:  o.overlayNamespace(),
		Name:       o.Instance,
		Images:     []byte(ImagesFile(o.Images)),
		Components: o.Components,
	}
	overlay, err := in.Write(root, dir)
	if err != nil {
		return "", fmt.Errorf("deploy %s: %w", o.Instance, err)
	}
	if o.PullSecret != nil {
		if err := addPullSecret(root, overlay, o.PullSecret); err != nil {
			return "", fmt.Errorf("deploy %s: pull secret: %w", o.Instance, err)
		}
	}
	e2e := filepath.Join(dir, "e2e")
	if err := Wrap(e2e, "../overlays/"+flavor, o); err != nil {
		return "", err
	}
	if o.overlayNamespace() == o.Namespace {
		return e2e, nil
	}
	moved := filepath.Join(dir, "moved")
	if err := os.MkdirAll(moved, 0o755); err != nil {
		return "", fmt.Errorf("deploy %s: %w", o.Instance, err)
	}
	// The Namespace object the overlay brings is renamed with the rest (it is cluster-scoped, so
	// `namespace:` alone would leave it, and the moved objects' namespace would not exist).
	k := fmt.Sprintf(`# e2e only: the instance moved to another namespace after its overlay (see e2e/deploy).
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: %[1]s
resources:
- ../e2e
patches:
- target: {kind: Namespace, name: %[2]s}
  patch: |-
    - {op: replace, path: /metadata/name, value: %[1]s}
`, o.Namespace, o.overlayNamespace())
	if err := os.WriteFile(filepath.Join(moved, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		return "", fmt.Errorf("deploy %s: %w", o.Instance, err)
	}
	return moved, nil
}

func (o Options) overlayNamespace() string {
	if o.OverlayNamespace != "" {
		return o.OverlayNamespace
	}
	return o.Namespace
}

// Build renders Overlay's result with the bundle's (Flux-like) kustomize options.
func Build(root, dir string, o Options) ([]byte, error) {
	e2e, err := Overlay(root, dir, o)
	if err != nil {
		return nil, err
	}
	return bundle.Kustomize(e2e)
}

// Wrap writes into dir a kustomization whose only resource is resource (a kustomization
// directory or a manifest file, relative to dir) and which applies the e2e changes to the
// instance's DaemonSet (named o.Instance).
func Wrap(dir, resource string, o Options) error {
	if err := o.check(); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("deploy %s: %w", o.Instance, err)
	}
	// With both runtimes' directories (the vanilla overlay), a node has only its own runtime's: the
	// others are created, as the overlay's DirectoryOrCreate does on a real node.
	hostPathType := "Directory"
	if o.CRIOSocketDir != "" {
		hostPathType = "DirectoryOrCreate"
	}
	apiHost := o.APIServerHost
	if apiHost == "" {
		apiHost = "127.0.0.1"
	}
	volumes := []any{map[string]any{
		"name":     "cri-socket",
		"hostPath": map[string]any{"path": o.CRISocketDir, "type": hostPathType},
	}, map[string]any{
		// The harness's image filesystem, not the node path the overlay mounts.
		"name":     "image-fs",
		"hostPath": map[string]any{"path": o.ImageFs, "type": hostPathType},
	}}
	// Where the agent looks for it: --host-root and the path the runtime names.
	mounts := []any{map[string]any{
		"name": "image-fs", "mountPath": path.Join("/host", o.ImageFs), "readOnly": true,
	}}
	// DirectoryOrCreate, as the overlay has them: a containerd node of the harness has no CRI-O
	// directories.
	if o.CRIOSocketDir != "" {
		volumes = append(volumes, map[string]any{
			"name":     "crio-socket",
			"hostPath": map[string]any{"path": o.CRIOSocketDir, "type": "DirectoryOrCreate"},
		})
	}
	if o.CRIOImageFs != "" {
		volumes = append(volumes, map[string]any{
			"name":     "crio-image-fs",
			"hostPath": map[string]any{"path": o.CRIOImageFs, "type": "DirectoryOrCreate"},
		})
		mounts = append(mounts, map[string]any{
			"name": "crio-image-fs", "mountPath": path.Join("/host", o.CRIOImageFs), "readOnly": true,
		})
	}
	// Strategic merge: volumes, containers and env merge by name, so this works whatever order
	// the components (or the KRM function) put them in.
	smp := map[string]any{
		"apiVersion": "apps/v1",
		"kind":       "DaemonSet",
		"metadata":   map[string]any{"name": o.Instance, "namespace": o.overlayNamespace()},
		"spec": map[string]any{"template": map[string]any{"spec": map[string]any{
			"hostNetwork": true,
			"dnsPolicy":   "ClusterFirstWithHostNet",
			"volumes":     volumes,
			"containers": []any{map[string]any{
				"name":         "agent",
				"image":        o.AgentImage,
				"volumeMounts": mounts,
				"env": []any{
					map[string]any{"name": "KUBERNETES_SERVICE_HOST", "value": apiHost},
					map[string]any{"name": "KUBERNETES_SERVICE_PORT", "value": "6443"},
				},
			}},
		}}},
	}
	if len(o.NodeSelector) > 0 {
		sel := map[string]any{}
		for k, v := range o.NodeSelector {
			sel[k] = v
		}
		smp["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)["nodeSelector"] = sel
	}
	// JSON patch: container ports merge by containerPort, which is what changes here.
	ops := []map[string]any{{
		"op":   "replace",
		"path": "/spec/template/spec/containers/0/ports",
		"value": []any{map[string]any{
			"name": "metrics", "containerPort": o.ListenPort, "hostPort": o.ListenPort, "protocol": "TCP",
		}},
	}}
	// The harness's image filesystem is the state dir's, this machine's root filesystem, which
	// is about 80 % used as the kubelet counts it (the default budget) before any test pulls:
	// 99 keeps the budget in force (the hardening test checks that the agent reads it) without
	// stopping the tests' pulls. ExtraArgs come later and win.
	args := []string{fmt.Sprintf("--listen-address=:%d", o.ListenPort), "--disk-budget-percent=99"}
	if o.RecheckInterval != "" {
		args = append(args, "--recheck-interval="+o.RecheckInterval)
	}
	if o.CollectorGRPCPort != 0 {
		args = append(args, fmt.Sprintf("--collector-address=127.0.0.1:%d", o.CollectorGRPCPort))
	}
	args = append(args, o.ExtraArgs...)
	for _, a := range args {
		ops = append(ops, map[string]any{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": a})
	}
	files := map[string]any{"daemonset-patch.json": smp, "daemonset-ops.json": ops}
	collectorPatch := ""
	if o.CollectorGRPCPort != 0 {
		// The product's arguments stay (who may write, the bounds); the addresses given last win.
		// Like the agent, the collector reaches the API server (its TokenReviews) on loopback.
		files["collector-ops.json"] = []map[string]any{
			{"op": "add", "path": "/spec/template/spec/hostNetwork", "value": true},
			{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": o.AgentImage},
			{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": fmt.Sprintf("--grpc-address=:%d", o.CollectorGRPCPort)},
			{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": fmt.Sprintf("--http-address=:%d", o.CollectorHTTPPort)},
			{"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": map[string]any{"name": "KUBERNETES_SERVICE_HOST", "value": apiHost}},
			{"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": map[string]any{"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}},
			{"op": "replace", "path": "/spec/template/spec/containers/0/ports", "value": []any{
				map[string]any{"name": "grpc", "containerPort": o.CollectorGRPCPort, "hostPort": o.CollectorGRPCPort, "protocol": "TCP"},
				map[string]any{"name": "http", "containerPort": o.CollectorHTTPPort, "hostPort": o.CollectorHTTPPort, "protocol": "TCP"},
			}},
		}
		collectorPatch = fmt.Sprintf(`- path: collector-ops.json
  target:
    group: apps
    kind: Deployment
    name: %s-results-collector
`, o.Instance)
	}
	for name, v := range files {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return fmt.Errorf("deploy %s: %s: %w", o.Instance, name, err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return fmt.Errorf("deploy %s: %w", o.Instance, err)
		}
	}
	k := fmt.Sprintf(`# e2e only: adapts the instance to the harness's cluster (see e2e/deploy).
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- %s
patches:
- path: daemonset-patch.json
- path: daemonset-ops.json
  target:
    group: apps
    kind: DaemonSet
    name: %s
%s`, resource, o.Instance, collectorPatch)
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		return fmt.Errorf("deploy %s: %w", o.Instance, err)
	}
	return nil
}

// addPullSecret gives the overlay its credentials the way docs/bundle.md's pull-secret recipe
// does: the recipe's own component file (from the doc's text) beside the overlay, the content in
// the file it names, and the component listed after components/pull-secret.
func addPullSecret(root, overlay string, content []byte) error {
	recipes, err := recipe.ParseFile(filepath.Join(root, "docs", "bundle.md"))
	if err != nil {
		return err
	}
	r, err := recipe.Find(recipes, "pull-secret")
	if err != nil {
		return err
	}
	const component = "pull-secret" // the directory the recipe's file step writes into
	var kustomization string
	for _, s := range r.Steps {
		if filepath.Base(filepath.Dir(s.File)) == component && filepath.Base(s.File) == "kustomization.yaml" {
			kustomization = s.Content
		}
	}
	if kustomization == "" {
		return fmt.Errorf("%s: the pull-secret recipe writes no %s/kustomization.yaml", r.Doc, component)
	}
	k, err := yaml.Parse(kustomization)
	if err != nil {
		return fmt.Errorf("%s: pull-secret recipe: %w", r.Doc, err)
	}
	file, err := k.Pipe(yaml.Lookup("secretGenerator", "0", "files", "0"))
	if err != nil || file == nil {
		return fmt.Errorf("%s: the pull-secret recipe's component has no secretGenerator file", r.Doc)
	}
	_, name, _ := strings.Cut(yaml.GetValue(file), "=")
	dir := filepath.Join(overlay, component)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(kustomization), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, name), content, 0o600); err != nil {
		return err
	}
	kfile := filepath.Join(overlay, "kustomization.yaml")
	raw, err := os.ReadFile(kfile)
	if err != nil {
		return err
	}
	ok, err := yaml.Parse(string(raw))
	if err != nil {
		return fmt.Errorf("%s: %w", kfile, err)
	}
	list, err := ok.Pipe(yaml.LookupCreate(yaml.SequenceNode, "components"))
	if err != nil {
		return fmt.Errorf("%s: components: %w", kfile, err)
	}
	if err := list.PipeE(yaml.Append(yaml.NewStringRNode(component).YNode())); err != nil {
		return fmt.Errorf("%s: components: %w", kfile, err)
	}
	out, err := ok.String()
	if err != nil {
		return err
	}
	return os.WriteFile(kfile, []byte(out), 0o644)
}
