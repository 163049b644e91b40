package bundle

import (
	"fmt"
	"path"
	"slices"
	"strconv"

	"github.com/distribution/reference"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/kustomize/kyaml/yaml"
	k8syaml "sigs.k8s.io/yaml"
)

// Instance is an instance overlay derived from one of the shipped ones, as a user writes it: a
// copy of overlays/<Flavor> with its marked values changed, components added and a patch of the
// agent's DaemonSet. Zero values keep what the overlay has.
type Instance struct {
	Flavor     string
	Namespace  string   // the instance namespace
	Name       string   // the instance name
	Images     []byte   // images.txt; nil keeps the overlay's sample list
	Components []string // names under components/, in this order
	AgentImage string   // the agent image reference
	// PinnedImageSet adds OpenShift's PinnedImageSet of the list (flavor ocp only; every
	// reference a digest), see pinnedimageset.go.
	PinnedImageSet bool

	// PullSecrets are kubernetes.io/dockerconfigjson Secrets the user makes in the instance
	// namespace; each is mounted at PullSecretDir/<name> and passed with --docker-config, in
	// this order.
	PullSecrets []string
	// Args are appended to the agent's arguments after the components' ones, so a flag given
	// here again wins (the agent's flags keep the last value).
	Args      []string
	Placement Placement
	// Resources replaces the agent container's resources.
	Resources *corev1.ResourceRequirements
}

// Placement is where the agent pods run; set fields replace the bundle's (and its components'),
// except Tolerations, which are added to the DaemonSet's.
type Placement struct {
	NodeSelector      map[string]string   `json:"nodeSelector,omitempty"`
	Tolerations       []corev1.Toleration `json:"tolerations,omitempty"`
	Affinity          *corev1.Affinity    `json:"affinity,omitempty"`
	PriorityClassName string              `json:"priorityClassName,omitempty"`
}

// PullSecretDir is where Instance.PullSecrets are mounted in the agent container.
const PullSecretDir = "/var/run/secrets/image-prefetcher/pull-secrets"

// The names in base/ an overlay's edits refer to, before the overlay's replacements rename them.
const (
	instanceLabel = "app.kubernetes.io/instance"
	agentImage    = "image-prefetcher"
	daemonSet     = "image-prefetcher"
	agent         = "/spec/template/spec/containers/0" // the agent container, as components/ patch it
	podSpec       = "/spec/template/spec"
)

// write turns overlays/<Flavor> under dir of fsys (a copy of the bundle) into in and returns
// its directory.
func (in Instance) write(fsys filesys.FileSystem, dir string) (string, error) {
	if !slices.Contains(Flavors, in.Flavor) {
		return "", fmt.Errorf("instance: unknown flavor %q (want one of %v)", in.Flavor, Flavors)
	}
	overlay := path.Join(dir, "overlays", in.Flavor)
	kfile := path.Join(overlay, "kustomization.yaml")
	raw, err := fsys.ReadFile(kfile)
	if err != nil {
		return "", fmt.Errorf("instance %s: %w", in.Flavor, err)
	}
	k, err := yaml.Parse(string(raw))
	if err != nil {
		return "", fmt.Errorf("instance %s: %s: %w", in.Flavor, kfile, err)
	}
	if err := in.edit(k, fsys, dir); err != nil {
		return "", fmt.Errorf("instance %s: %s: %w", in.Flavor, kfile, err)
	}
	if in.PinnedImageSet {
		if in.Flavor != FlavorOCP {
			return "", fmt.Errorf("instance %s: a PinnedImageSet is OpenShift's (flavor %s); on containerd nodes use components/pin-images", in.Flavor, FlavorOCP)
		}
		list := in.Images
		if list == nil {
			if list, err = fsys.ReadFile(path.Join(overlay, "images.txt")); err != nil {
				return "", fmt.Errorf("instance %s: %w", in.Flavor, err)
			}
		}
		if err := addPinnedImageSet(k, fsys, overlay, list); err != nil {
			return "", fmt.Errorf("instance %s: %w", in.Flavor, err)
		}
	}
	out, err := k.String()
	if err != nil {
		return "", fmt.Errorf("instance %s: %w", in.Flavor, err)
	}
	if err := fsys.WriteFile(kfile, []byte(out)); err != nil {
		return "", fmt.Errorf("instance %s: %w", in.Flavor, err)
	}
	if in.Images != nil {
		if err := fsys.WriteFile(path.Join(overlay, "images.txt"), in.Images); err != nil {
			return "", fmt.Errorf("instance %s: %w", in.Flavor, err)
		}
	}
	return overlay, nil
}

// edit changes the overlay's kustomization k for in.
func (in Instance) edit(k *yaml.RNode, fsys filesys.FileSystem, dir string) error {
	if in.Namespace != "" {
		if err := k.PipeE(yaml.SetField("namespace", yaml.NewStringRNode(in.Namespace))); err != nil {
			return fmt.Errorf("namespace: %w", err)
		}
	}
	if in.Name != "" {
		if err := setInstanceName(k, in.Name); err != nil {
			return err
		}
	}
	if len(in.Components) > 0 {
		paths := make([]string, 0, len(in.Components))
		for _, c := range in.Components {
			if path.Base(c) != c || !fsys.Exists(path.Join(dir, "components", c, "kustomization.yaml")) {
				return fmt.Errorf("no component %q under components/", c)
			}
			if Included(in.Flavor, c) {
				return fmt.Errorf("component %s: overlays/%s already does what it does", c, in.Flavor)
			}
			paths = append(paths, "../../components/"+c)
		}
		if err := k.PipeE(yaml.SetField("components", yaml.NewListRNode(paths...))); err != nil {
			return fmt.Errorf("components: %w", err)
		}
	}
	if in.AgentImage != "" {
		if err := setAgentImage(k, in.AgentImage); err != nil {
			return err
		}
	}
	ops := in.patch()
	if len(ops) == 0 {
		return nil
	}
	patch, err := k8syaml.Marshal(ops)
	if err != nil {
		return fmt.Errorf("agent patch: %w", err)
	}
	raw, err := k8syaml.Marshal(map[string]any{
		"target": map[string]string{"kind": "DaemonSet", "name": daemonSet},
		"patch":  string(patch),
	})
	if err != nil {
		return fmt.Errorf("agent patch: %w", err)
	}
	entry, err := yaml.Parse(string(raw))
	if err != nil {
		return fmt.Errorf("agent patch: %w", err)
	}
	if err := k.PipeE(yaml.LookupCreate(yaml.SequenceNode, "patches"), yaml.Append(entry.YNode())); err != nil {
		return fmt.Errorf("agent patch: %w", err)
	}
	return nil
}

// setInstanceName sets the instance label of the overlay's labels, the one place the name is
// written.
func setInstanceName(k *yaml.RNode, name string) error {
	labels, err := k.Pipe(yaml.Lookup("labels"))
	if err != nil || labels == nil {
		return fmt.Errorf("no labels: %v", err)
	}
	entries, err := labels.Elements()
	if err != nil {
		return fmt.Errorf("labels: %w", err)
	}
	found := 0
	for _, l := range entries {
		pairs := l.Field("pairs")
		if pairs == nil || pairs.Value.Field(instanceLabel) == nil {
			continue
		}
		if err := pairs.Value.PipeE(yaml.SetField(instanceLabel, yaml.NewStringRNode(name))); err != nil {
			return fmt.Errorf("instance label: %w", err)
		}
		found++
	}
	if found != 1 {
		return fmt.Errorf("want the %s label in exactly one labels entry, found %d", instanceLabel, found)
	}
	return nil
}

// setAgentImage points the overlay's images entry for the agent at ref.
func setAgentImage(k *yaml.RNode, ref string) error {
	r, err := reference.Parse(ref)
	if err != nil {
		return fmt.Errorf("agent image %q: %w", ref, err)
	}
	named, ok := r.(reference.Named)
	if !ok {
		return fmt.Errorf("agent image %q has no name", ref)
	}
	img, err := k.Pipe(yaml.Lookup("images", "[name="+agentImage+"]"))
	if err != nil || img == nil {
		return fmt.Errorf("no images entry for %s: %v", agentImage, err)
	}
	fields := map[string]string{"newName": named.Name()}
	if t, ok := r.(reference.Tagged); ok {
		fields["newTag"] = t.Tag()
	}
	if d, ok := r.(reference.Digested); ok {
		fields["digest"] = d.Digest().String()
	}
	for _, f := range []string{"newName", "newTag", "digest"} {
		var fn yaml.Filter = yaml.Clear(f)
		if v, ok := fields[f]; ok {
			fn = yaml.SetField(f, yaml.NewStringRNode(v))
		}
		if _, err := img.Pipe(fn); err != nil {
			return fmt.Errorf("agent image %s: %w", f, err)
		}
	}
	return nil
}

// op is one JSON patch (RFC 6902) operation. "add" of an existing member replaces it.
type op struct {
	Op    string `json:"op"`
	Path  string `json:"path"`
	Value any    `json:"value"`
}

// patch is the JSON patch of the agent's DaemonSet for in's values beyond the overlay's.
func (in Instance) patch() []op {
	var ops []op
	var args []string
	for i, s := range in.PullSecrets {
		volume := "pull-secret-" + strconv.Itoa(i)
		dir := PullSecretDir + "/" + s
		// 0440 as components/pull-secret: root:root files that the agent, a non-root uid in group
		// 0, reads through its group.
		ops = append(ops,
			op{"add", podSpec + "/volumes/-", corev1.Volume{Name: volume, VolumeSource: corev1.VolumeSource{
				Secret: &corev1.SecretVolumeSource{SecretName: s, DefaultMode: ptr.To[int32](0o440)},
			}}},
			op{"add", agent + "/volumeMounts/-", corev1.VolumeMount{Name: volume, MountPath: dir, ReadOnly: true}},
		)
		args = append(args, "--docker-config="+dir+"/.dockerconfigjson")
	}
	for _, a := range append(args, in.Args...) {
		ops = append(ops, op{"add", agent + "/args/-", a})
	}
	p := in.Placement
	if p.NodeSelector != nil {
		ops = append(ops, op{"add", podSpec + "/nodeSelector", p.NodeSelector})
	}
	// Appended, unlike the other placement values: the agent must keep tolerating its own
	// startup taint (base/daemonset.yaml).
	for _, t := range p.Tolerations {
		ops = append(ops, op{"add", podSpec + "/tolerations/-", t})
	}
	if p.Affinity != nil {
		ops = append(ops, op{"add", podSpec + "/affinity", p.Affinity})
	}
	if p.PriorityClassName != "" {
		ops = append(ops, op{"add", podSpec + "/priorityClassName", p.PriorityClassName})
	}
	if in.Resources != nil {
		ops = append(ops, op{"add", agent + "/resources", in.Resources})
	}
	return ops
}
