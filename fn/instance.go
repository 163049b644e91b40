package fn

import (
	"fmt"
	"strconv"
	"strings"

	"sigs.k8s.io/kustomize/api/hasher"
	"sigs.k8s.io/kustomize/kyaml/yaml"
	k8syaml "sigs.k8s.io/yaml"

	"github.com/nodeprefetch/image-prefetcher/fn/bundled"
)

// ManagedBy is the app.kubernetes.io/managed-by value on every object the function generates;
// together with app.kubernetes.io/instance it tells a later run which input objects it owns.
const ManagedBy = "image-prefetcher-fn"

// Paths and names the generated DaemonSet uses; the credential provider ones are those of
// components/{gke,ecr}-credential-provider, so the function and the components agree.
const (
	pullSecretDir = "/var/run/secrets/image-prefetcher/pull-secrets"
	imagesKey     = "images.txt"
	collectorArg  = "--collector-address=$(INSTANCE)-results-collector.$(POD_NAMESPACE).svc:9478"
)

type hostMount struct {
	volume, hostPath, hostType string
}

var credentialProviders = map[string]struct {
	mounts []hostMount
	config string // --image-credential-provider-config, as seen in the container
	binDir string // --image-credential-provider-bin-dir
}{
	CredentialProviderGKE: {
		mounts: []hostMount{
			{"credential-provider-config", "/etc/srv/kubernetes/cri_auth_config.yaml", "File"},
			{"credential-provider-bin", "/home/kubernetes/bin", "Directory"},
		},
		config: "/host/etc/srv/kubernetes/cri_auth_config.yaml",
		binDir: "/host/home/kubernetes/bin",
	},
	CredentialProviderECR: {
		mounts: []hostMount{
			{"credential-provider", "/etc/eks/image-credential-provider", "Directory"},
		},
		config: "/host/etc/eks/image-credential-provider/config.json",
		binDir: "/host/etc/eks/image-credential-provider",
	},
}

// Objects returns the instance's objects, in the bundle's order. c must be valid.
func (c *ImagePrefetcher) Objects() ([]*yaml.RNode, error) {
	s := c.Spec
	nodes, err := bundled.Flavor(s.Flavor)
	if err != nil {
		return nil, err
	}
	var comps []string
	if s.Prometheus {
		comps = append(comps, "prometheus")
	}
	if s.MetricsCollector {
		comps = append(comps, "metrics-collector")
	}
	if s.MaxConcurrentNodes != nil {
		// The agents coordinate through Leases in their namespace: the component's Role.
		comps = append(comps, "max-concurrent-nodes")
	}
	for _, name := range comps {
		objs, err := bundled.Component(name)
		if err != nil {
			return nil, err
		}
		nodes = append(nodes, objs...)
	}
	rename := renames(s.Namespace, c.Metadata.Name)
	for _, n := range nodes {
		renameScalars(n.YNode(), rename)
		if err := n.PipeE(yaml.LookupCreate(yaml.MappingNode, "metadata", "labels"), yaml.SetField("app.kubernetes.io/managed-by", yaml.NewScalarRNode(ManagedBy))); err != nil {
			return nil, fmt.Errorf("label %s: %w", n.GetName(), err)
		}
	}
	cmName, err := c.setImageList(nodes)
	if err != nil {
		return nil, err
	}
	for _, n := range nodes {
		if n.GetKind() == "DaemonSet" {
			if err := c.setDaemonSet(n, cmName); err != nil {
				return nil, fmt.Errorf("DaemonSet %s: %w", n.GetName(), err)
			}
		}
	}
	return nodes, nil
}

// renamer maps every name the embedded bundle derived from its default namespace and
// instance to the name this instance gets, following the overlays' instance-names.yaml:
// namespaced objects <instance>[-<what>], cluster-scoped image-prefetcher.<ns>.<instance>[.<what>].
type renamer struct {
	exact    map[string]string
	prefixes [][2]string // old prefix, new prefix
}

func renames(ns, name string) renamer {
	oldCluster := "image-prefetcher." + bundled.Namespace + "." + bundled.Instance
	newCluster := "image-prefetcher." + ns + "." + name
	return renamer{
		exact: map[string]string{
			bundled.Namespace: ns,
			bundled.Instance:  name,
			oldCluster:        newCluster,
		},
		prefixes: [][2]string{
			{bundled.Instance + "-", name + "-"},
			{oldCluster + ".", newCluster + "."},
		},
	}
}

// renameScalars replaces scalar values (never keys) that are derived names. The embedded
// bundle is built so that these strings occur only as names, namespaces and label values;
// fn's equality tests with the kustomize-built instances hold that up.
func renameScalars(n *yaml.Node, r renamer) {
	switch n.Kind {
	case yaml.DocumentNode, yaml.SequenceNode:
		for _, c := range n.Content {
			renameScalars(c, r)
		}
	case yaml.MappingNode:
		for i := 1; i < len(n.Content); i += 2 {
			renameScalars(n.Content[i], r)
		}
	case yaml.ScalarNode:
		if v, ok := r.exact[n.Value]; ok {
			n.Value = v
			return
		}
		for _, p := range r.prefixes {
			if strings.HasPrefix(n.Value, p[0]) {
				n.Value = p[1] + strings.TrimPrefix(n.Value, p[0])
				return
			}
		}
	}
}

// setImageList writes the list into the image-list ConfigMap and names it the way kustomize's
// configMapGenerator would (<instance>-images-<hash of the content>), so a list change is a
// new ConfigMap and rolls the DaemonSet.
func (c *ImagePrefetcher) setImageList(nodes []*yaml.RNode) (string, error) {
	list, err := c.imageList()
	if err != nil {
		return "", err
	}
	for _, n := range nodes {
		if n.GetKind() != "ConfigMap" {
			continue
		}
		base := c.Metadata.Name + "-images"
		n.SetDataMap(map[string]string{imagesKey: list})
		if err := n.SetName(base); err != nil {
			return "", err
		}
		h, err := (&hasher.Hasher{}).Hash(n)
		if err != nil {
			return "", fmt.Errorf("hash the image list: %w", err)
		}
		name := base + "-" + h
		return name, n.SetName(name)
	}
	return "", fmt.Errorf("the embedded %s bundle has no image-list ConfigMap", c.Spec.Flavor)
}

func (c *ImagePrefetcher) setDaemonSet(ds *yaml.RNode, cmName string) error {
	s := c.Spec
	pod, err := ds.Pipe(yaml.Lookup("spec", "template", "spec"))
	if err != nil || pod == nil {
		return fmt.Errorf("no pod template: %v", err)
	}
	agent, err := pod.Pipe(yaml.Lookup("containers", "[name=agent]"))
	if err != nil || agent == nil {
		return fmt.Errorf("no agent container: %v", err)
	}
	vol, err := pod.Pipe(yaml.Lookup("volumes", "[name=image-list]", "configMap"))
	if err != nil || vol == nil {
		return fmt.Errorf("no image-list volume: %v", err)
	}
	if err := vol.PipeE(yaml.SetField("name", yaml.NewStringRNode(cmName))); err != nil {
		return err
	}
	if err := agent.PipeE(yaml.SetField("image", yaml.NewStringRNode(s.AgentImage))); err != nil {
		return err
	}

	var args []string
	for i, sec := range s.PullSecrets {
		vname := "pull-secret-" + strconv.Itoa(i)
		dir := pullSecretDir + "/" + sec
		if err := appendItem(pod, "volumes", map[string]any{
			"name":   vname,
			"secret": map[string]any{"secretName": sec, "defaultMode": 0o400},
		}); err != nil {
			return err
		}
		if err := appendItem(agent, "volumeMounts", map[string]any{
			"name": vname, "mountPath": dir, "readOnly": true,
		}); err != nil {
			return err
		}
		args = append(args, "--docker-config="+dir+"/.dockerconfigjson")
	}
	if cp, ok := credentialProviders[s.CredentialProvider]; ok {
		for _, m := range cp.mounts {
			if err := appendItem(pod, "volumes", map[string]any{
				"name":     m.volume,
				"hostPath": map[string]any{"path": m.hostPath, "type": m.hostType},
			}); err != nil {
				return err
			}
		}
		for _, m := range cp.mounts {
			if err := appendItem(agent, "volumeMounts", map[string]any{
				"name": m.volume, "mountPath": "/host" + m.hostPath, "readOnly": true,
			}); err != nil {
				return err
			}
		}
		args = append(args, "--image-credential-provider-config="+cp.config, "--image-credential-provider-bin-dir="+cp.binDir)
	}
	if p := s.MaxParallelPulls; p != nil {
		args = append(args, "--max-parallel-pulls="+strconv.Itoa(*p))
	}
	if p := s.MaxConcurrentNodes; p != nil {
		args = append(args, "--max-concurrent-nodes="+strconv.Itoa(*p))
	}
	if s.MetricsCollector {
		// As components/metrics-collector: the kubelet expands the agent's own
		// INSTANCE and POD_NAMESPACE, so the address follows the instance's names.
		args = append(args, collectorArg)
	}
	for _, a := range args {
		if err := agent.PipeE(yaml.Lookup("args"), yaml.Append(yaml.NewStringRNode(a).YNode())); err != nil {
			return fmt.Errorf("agent args: %w", err)
		}
	}
	if s.Resources != nil {
		if err := setValue(agent, "resources", s.Resources); err != nil {
			return err
		}
	}
	pl := s.Placement
	if err := setValue(pod, "nodeSelector", pl.NodeSelector); err != nil {
		return err
	}
	if len(pl.Tolerations) > 0 {
		if err := setValue(pod, "tolerations", pl.Tolerations); err != nil {
			return err
		}
	}
	if pl.Affinity != nil {
		if err := setValue(pod, "affinity", pl.Affinity); err != nil {
			return err
		}
	}
	if pl.PriorityClassName != "" {
		if err := pod.PipeE(yaml.SetField("priorityClassName", yaml.NewStringRNode(pl.PriorityClassName))); err != nil {
			return err
		}
	}
	return nil
}

// toNode converts a Go value (API types marshal through their JSON tags) to a YAML node.
func toNode(v any) (*yaml.RNode, error) {
	b, err := k8syaml.Marshal(v)
	if err != nil {
		return nil, err
	}
	return yaml.Parse(string(b))
}

func setValue(parent *yaml.RNode, field string, v any) error {
	n, err := toNode(v)
	if err != nil {
		return fmt.Errorf("%s: %w", field, err)
	}
	if err := parent.PipeE(yaml.SetField(field, n)); err != nil {
		return fmt.Errorf("%s: %w", field, err)
	}
	return nil
}

func appendItem(parent *yaml.RNode, field string, v any) error {
	n, err := toNode(v)
	if err != nil {
		return fmt.Errorf("%s: %w", field, err)
	}
	if err := parent.PipeE(yaml.LookupCreate(yaml.SequenceNode, field), yaml.Append(n.YNode())); err != nil {
		return fmt.Errorf("%s: %w", field, err)
	}
	return nil
}
