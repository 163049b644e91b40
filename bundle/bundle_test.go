package bundle

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/nodeprefetch/image-prefetcher/agent/cri"
)

var update = flag.Bool("update", os.Getenv("GOLDEN_UPDATE") == "1", "rewrite testdata/golden from the current builds")

func goldenPath(name string) string {
	return filepath.Join("testdata", "golden", name+".yaml")
}

// allBuilds holds BuildAll's output for the whole test binary: the builds are
// plain bytes the tests only read, and building every overlay with every
// component once instead of once per test is most of this package's time.
var allBuilds struct {
	once   sync.Once
	root   string
	builds []Build
	err    error
}

func buildAll(t *testing.T) (string, []Build) {
	t.Helper()
	allBuilds.once.Do(func() {
		allBuilds.root, allBuilds.err = Root()
		if allBuilds.err != nil {
			return
		}
		var tmp string
		if tmp, allBuilds.err = os.MkdirTemp("", "bundle-builds-"); allBuilds.err != nil {
			return
		}
		defer os.RemoveAll(tmp)
		allBuilds.builds, allBuilds.err = BuildAll(allBuilds.root, tmp)
	})
	if allBuilds.err != nil {
		t.Fatal(allBuilds.err)
	}
	return allBuilds.root, allBuilds.builds
}

func TestGolden(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	want := map[string]bool{}
	for _, b := range builds {
		want[b.Name+".yaml"] = true
		path := goldenPath(b.Name)
		if *update {
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, b.YAML, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		golden, err := os.ReadFile(path)
		if err != nil {
			t.Errorf("%s: %v (run `make golden`)", b.Name, err)
			continue
		}
		if !bytes.Equal(golden, b.YAML) {
			t.Errorf("%s: build differs from %s (run `make golden` if intended):\n%s", b.Name, path, firstDiff(golden, b.YAML))
		}
	}
	entries, err := os.ReadDir(filepath.Join("testdata", "golden"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !want[e.Name()] {
			if *update {
				_ = os.Remove(filepath.Join("testdata", "golden", e.Name()))
				continue
			}
			t.Errorf("stale golden file %s: no build produces it (run `make golden`)", e.Name())
		}
	}
}

// kubectl's embedded kustomize (what Argo CD and `kubectl apply -k` users run) must produce the
// same objects as the Flux-style krusty build, with its default root-only load restrictions.
func TestKubectlKustomizeMatchesGolden(t *testing.T) {
	t.Parallel()
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Fatalf("kubectl is needed for this test: %v", err)
	}
	root, builds := buildAll(t)
	tmp := t.TempDir()
	dirs := map[string]string{}
	for _, flavor := range Flavors {
		dirs[flavor] = filepath.Join(root, "overlays", flavor)
		comps, err := FlavorComponents(flavor)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range comps {
			d, err := os.MkdirTemp(tmp, "kubectl-")
			if err != nil {
				t.Fatal(err)
			}
			overlay, err := Instance{Flavor: flavor, Components: []string{c}}.Write(root, d)
			if err != nil {
				t.Fatal(err)
			}
			dirs[flavor+"+"+c] = overlay
		}
	}
	for _, b := range builds {
		dir, ok := dirs[b.Name]
		if !ok {
			t.Errorf("%s: no kustomization directory for it", b.Name)
			continue
		}
		cmd := exec.Command(kubectl, "kustomize", dir)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Errorf("%s: kubectl kustomize %s: %v\n%s", b.Name, dir, err, stderr.String())
			continue
		}
		if bytes.Equal(out, b.YAML) {
			continue
		}
		if diff := objectDiff(t, b.YAML, out); diff != "" {
			t.Errorf("%s: kubectl kustomize differs from the krusty build:\n%s", b.Name, diff)
		}
	}
}

// objectDiff compares two builds as sets of objects, ignoring their order.
func objectDiff(t *testing.T, want, got []byte) string {
	t.Helper()
	index := func(data []byte) map[string]string {
		objs, err := Objects(data)
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]string{}
		for _, o := range objs {
			m[o.Key()] = o.YAML
		}
		return m
	}
	w, g := index(want), index(got)
	var msgs []string
	for k, wy := range w {
		gy, ok := g[k]
		switch {
		case !ok:
			msgs = append(msgs, "missing "+k)
		case gy != wy:
			msgs = append(msgs, k+":\n"+firstDiff([]byte(wy), []byte(gy)))
		}
	}
	for k := range g {
		if _, ok := w[k]; !ok {
			msgs = append(msgs, "unexpected "+k)
		}
	}
	sort.Strings(msgs)
	return strings.Join(msgs, "\n")
}

func firstDiff(want, got []byte) string {
	wl, gl := strings.Split(string(want), "\n"), strings.Split(string(got), "\n")
	for i := 0; i < len(wl) || i < len(gl); i++ {
		var w, g string
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			return fmt.Sprintf("  line %d:\n  want: %q\n  got:  %q", i+1, w, g)
		}
	}
	return "  (no line differs)"
}

// The checks below fail when the bundle is wrong, whatever the goldens say.

func TestStructure(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	for _, b := range builds {
		t.Run(b.Name, func(t *testing.T) {
			objs, err := Objects(b.YAML)
			if err != nil {
				t.Fatal(err)
			}
			checkInstance(t, b.Name, objs, DefaultNamespace, DefaultInstance)
		})
	}
}

func checkInstance(t *testing.T, build string, objs []Object, namespace, instance string) {
	t.Helper()
	flavor := strings.SplitN(build, "+", 2)[0]
	clusterPrefix := "image-prefetcher." + namespace + "." + instance
	for _, o := range objs {
		if ClusterScoped(o.Kind) {
			if o.Namespace != "" {
				t.Errorf("cluster-scoped %s has namespace %q", o.Key(), o.Namespace)
			}
			if o.Kind != "Namespace" && o.Name != clusterPrefix && !strings.HasPrefix(o.Name, clusterPrefix+".") {
				t.Errorf("cluster-scoped %s is not named per namespace and instance (%s...)", o.Key(), clusterPrefix)
			}
		} else if o.Namespace != namespace {
			t.Errorf("%s: namespace %q, want %q", o.Key(), o.Namespace, namespace)
		}
		if strings.Contains(o.YAML, "'NAMESPACE'") || strings.Contains(o.YAML, "'INSTANCE'") {
			t.Errorf("%s: a name placeholder was not replaced", o.Key())
		}
		if strings.Contains(o.YAML, "local-config") {
			t.Errorf("%s: a build-time helper reached the output", o.Key())
		}
		if !strings.Contains(o.YAML, "app.kubernetes.io/instance: "+instance) {
			t.Errorf("%s: no app.kubernetes.io/instance label", o.Key())
		}
		if flavor == "vanilla" && regexp.MustCompile(`privileged:\s*true`).MatchString(o.YAML) {
			t.Errorf("%s: privileged: true in the vanilla flavor", o.Key())
		}
	}
	ds := decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet")
	cm := decodeOne[corev1.ConfigMap](t, objs, "ConfigMap")
	secrets := map[string]*corev1.Secret{}
	for _, s := range decodeAll[corev1.Secret](t, objs, "Secret") {
		secrets[s.Name] = s
	}
	// A Role decodes as a ClusterRole: the rules are the same type.
	roles := append(decodeAll[rbacv1.ClusterRole](t, objs, "ClusterRole"), decodeAll[rbacv1.ClusterRole](t, objs, "Role")...)
	for _, r := range roles {
		for _, rule := range r.Rules {
			for _, res := range rule.Resources {
				if res == "secrets" || res == "*" {
					t.Errorf("%s grants %v on %s", r.Name, rule.Verbs, res)
				}
			}
			for _, v := range rule.Verbs {
				if v == "*" || v == "escalate" || v == "bind" || v == "impersonate" {
					t.Errorf("%s grants verb %s", r.Name, v)
				}
			}
			if len(rule.APIGroups) == 1 && rule.APIGroups[0] == "security.openshift.io" && len(rule.ResourceNames) != 1 {
				t.Errorf("%s: SCC use must name exactly the instance's SCC, got %v", r.Name, rule.ResourceNames)
			}
		}
	}
	if ds.Name != instance {
		t.Errorf("DaemonSet %q, want the instance name %q (kubectl rollout status daemonset/<instance>)", ds.Name, instance)
	}
	wantSelector := map[string]string{"app.kubernetes.io/name": "image-prefetcher", "app.kubernetes.io/instance": instance}
	if ds.Spec.Selector == nil || fmt.Sprint(ds.Spec.Selector.MatchLabels) != fmt.Sprint(wantSelector) {
		t.Errorf("DaemonSet selector %v, want exactly %v", ds.Spec.Selector, wantSelector)
	}
	// No other pod of the instance (the results collector) may match the agents' selector:
	// kubectl, the PodMonitor and `kubectl logs daemonset/...` would take it for an agent.
	for _, d := range decodeAll[appsv1.Deployment](t, objs, "Deployment") {
		if sel, _ := metav1.LabelSelectorAsSelector(ds.Spec.Selector); sel != nil && sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("Deployment %s's pods %v match the agents' DaemonSet selector %v", d.Name, d.Spec.Template.Labels, ds.Spec.Selector)
		}
	}
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ds.Spec.UpdateStrategy.RollingUpdate == nil ||
		ds.Spec.UpdateStrategy.RollingUpdate.MaxUnavailable == nil || !strings.HasSuffix(ds.Spec.UpdateStrategy.RollingUpdate.MaxUnavailable.String(), "%") {
		t.Errorf("DaemonSet update strategy %+v: want RollingUpdate with a percentage maxUnavailable", ds.Spec.UpdateStrategy)
	}
	if !regexp.MustCompile("^" + regexp.QuoteMeta(instance) + `-images-[a-z0-9]{10}$`).MatchString(cm.Name) {
		t.Errorf("image-list ConfigMap %q: want %s-images-<hash>", cm.Name, instance)
	}
	if _, ok := cm.Data["images.txt"]; !ok {
		t.Errorf("ConfigMap %s has no images.txt", cm.Name)
	}
	pod := ds.Spec.Template.Spec
	if pod.ServiceAccountName != instance {
		t.Errorf("serviceAccountName %q, want %q", pod.ServiceAccountName, instance)
	}
	if psc := pod.SecurityContext; psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod seccomp profile is not RuntimeDefault")
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want the agent alone", len(pod.Containers))
	}
	c := pod.Containers[0]
	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Errorf("agent has no securityContext")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Errorf("agent may escalate privileges")
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Errorf("agent root filesystem is writable")
	case sc.Privileged != nil && *sc.Privileged:
		t.Errorf("agent is privileged")
	case sc.Capabilities == nil || fmt.Sprint(sc.Capabilities.Drop) != "[ALL]" || len(sc.Capabilities.Add) != 0:
		t.Errorf("agent capabilities %+v: want drop ALL, add none", sc.Capabilities)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("agent resources %+v: want cpu and memory requests and a memory limit", c.Resources)
	}
	if len(c.Args) == 0 || c.Args[0] != "run" {
		t.Errorf("agent args %v: want the run command first", c.Args)
	}
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	if e := env["INSTANCE"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "metadata.labels['app.kubernetes.io/instance']" {
		t.Errorf("INSTANCE must come from the pod's instance label, got %+v", e)
	}
	if ds.Spec.Template.Labels["app.kubernetes.io/instance"] != instance {
		t.Errorf("pod template instance label %q, want %q", ds.Spec.Template.Labels["app.kubernetes.io/instance"], instance)
	}
	if e := env["NODE_NAME"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("NODE_NAME must come from spec.nodeName, got %+v", e)
	}
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	for name, probe := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		want := map[string]string{"readiness": "/readyz", "liveness": "/healthz"}[name]
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != want {
			t.Errorf("%s probe: want HTTP GET %s", name, want)
			continue
		}
		if _, ok := ports[probe.HTTPGet.Port.String()]; !ok {
			t.Errorf("%s probe port %s is not a named container port", name, probe.HTTPGet.Port.String())
		}
	}

	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
		v, ok := volumes[m.Name]
		if !ok {
			t.Errorf("mount %s names no volume %s", m.MountPath, m.Name)
			continue
		}
		if v.HostPath != nil && !m.ReadOnly {
			t.Errorf("host path %s is mounted writable at %s", v.HostPath.Path, m.MountPath)
		}
		if v.HostPath != nil && m.MountPath != "/host"+v.HostPath.Path {
			t.Errorf("host path %s mounted at %s: want it under /host at the same path", v.HostPath.Path, m.MountPath)
		}
	}
	if v := volumes["image-list"]; v.ConfigMap == nil || v.ConfigMap.Name != cm.Name {
		t.Errorf("image-list volume %+v does not name the hashed ConfigMap %s", v.VolumeSource, cm.Name)
	}
	if m, ok := mounts["/etc/image-prefetcher"]; !ok || m.Name != "image-list" {
		t.Errorf("the image list is not mounted at /etc/image-prefetcher")
	}
	// Each socket volume holds a socket the agent's detection tries (cri.Candidates): the
	// flavor's runtime, or the one of a runtime-* component; the vanilla flavor's CRI-O one too.
	for _, name := range []string{"cri-socket", "crio-socket"} {
		socket, ok := volumes[name]
		if !ok && name == "crio-socket" {
			continue
		}
		if socket.HostPath == nil || !slices.ContainsFunc(cri.Candidates(""), func(p string) bool {
			return p == socket.HostPath.Path || strings.HasPrefix(p, socket.HostPath.Path+"/")
		}) {
			t.Errorf("%s volume %+v holds none of the sockets the agent detects (%v)", name, socket.VolumeSource, cri.Candidates(""))
		}
	}
	socket := volumes["cri-socket"]
	wantSocket := map[string]string{"vanilla": "/run/containerd", "ocp": "/run/crio",
		"vanilla+runtime-k3s": "/run/k3s/containerd", "vanilla+runtime-crio": "/run/crio",
		"vanilla+runtime-cri-dockerd": "/run/cri-dockerd.sock"}[build]
	if wantSocket != "" && (socket.HostPath == nil || socket.HostPath.Path != wantSocket) {
		t.Errorf("cri-socket volume %+v: want host path %s", socket.VolumeSource, wantSocket)
	}
	if flavor == "ocp" {
		if psc := pod.SecurityContext; psc == nil || psc.SELinuxOptions == nil || psc.SELinuxOptions.Type != "spc_t" {
			t.Errorf("ocp pod does not ask for SELinux type spc_t")
		}
		if got := ds.Spec.Template.Annotations["openshift.io/required-scc"]; got != clusterPrefix {
			t.Errorf("ocp pod requires SCC %q, want %q", got, clusterPrefix)
		}
	}

	// Every file-path flag points into a mounted volume; --docker-config into a mounted
	// dockerconfigjson Secret of this build.
	for _, arg := range c.Args {
		name, value, ok := strings.Cut(arg, "=")
		if !ok || !strings.HasPrefix(value, "/") {
			continue
		}
		var mount *corev1.VolumeMount
		for p, m := range mounts {
			if value == p || strings.HasPrefix(value, p+"/") {
				mount = &m
			}
		}
		if mount == nil {
			t.Errorf("%s points to %s, which no volume mount holds", name, value)
			continue
		}
		if name == "--docker-config" {
			v := volumes[mount.Name]
			if v.Secret == nil {
				t.Errorf("--docker-config volume %s is not a Secret", mount.Name)
				continue
			}
			s, ok := secrets[v.Secret.SecretName]
			if !ok || s.Type != corev1.SecretTypeDockerConfigJson {
				t.Errorf("--docker-config Secret %s is not a dockerconfigjson Secret of this build", v.Secret.SecretName)
			}
			if filepath.Base(value) != corev1.DockerConfigJsonKey {
				t.Errorf("--docker-config %s: want the %s key", value, corev1.DockerConfigJsonKey)
			}
		}
	}
	if strings.HasSuffix(build, "+pull-secret") && !hasArgPrefix(c.Args, "--docker-config=") {
		t.Errorf("pull-secret component without --docker-config")
	}
	if strings.HasSuffix(build, "-credential-provider") &&
		(!hasArgPrefix(c.Args, "--image-credential-provider-config=") || !hasArgPrefix(c.Args, "--image-credential-provider-bin-dir=")) {
		t.Errorf("credential provider component without both credential provider flags: %v", c.Args)
	}
}

func hasArgPrefix(args []string, prefix string) bool {
	for _, a := range args {
		if strings.HasPrefix(a, prefix) {
			return true
		}
	}
	return false
}

// Two instances never share an object: cluster-scoped names differ across namespaces and
// instances, namespaced names differ between two instances of one namespace.
func TestInstancesShareNoNames(t *testing.T) {
	t.Parallel()
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	for _, flavor := range Flavors {
		comps, err := FlavorComponents(flavor)
		if err != nil {
			t.Fatal(err)
		}
		t.Run(flavor, func(t *testing.T) {
			a := Instance{Flavor: flavor, Components: comps}
			b := Instance{Flavor: flavor, Namespace: "team-b", Name: "team-b-images", Components: comps}
			c := Instance{Flavor: flavor, Name: "second", Components: comps} // same namespace as a
			keys := func(in Instance) map[string]bool {
				out, err := BuildInstance(root, tmp, in)
				if err != nil {
					t.Fatal(err)
				}
				objs, err := Objects(out)
				if err != nil {
					t.Fatal(err)
				}
				ns, name := in.Namespace, in.Name
				if ns == "" {
					ns = DefaultNamespace
				}
				if name == "" {
					name = DefaultInstance
				}
				checkInstance(t, flavor+"+all", objs, ns, name)
				m := map[string]bool{}
				for _, o := range objs {
					if o.Kind != "Namespace" { // the namespace itself is shared on purpose
						m[o.Kind+" "+o.Namespace+"/"+o.Name] = true
					}
				}
				return m
			}
			ka, kb, kc := keys(a), keys(b), keys(c)
			for k := range ka {
				if kb[k] {
					t.Errorf("instances in two namespaces share %s", k)
				}
				if kc[k] {
					t.Errorf("two instances in one namespace share %s", k)
				}
			}
		})
	}
}

// The GitOps update path: a new list in Git is a new ConfigMap name, hence a DaemonSet rollout.
func TestImageListChangeRollsDaemonSet(t *testing.T) {
	t.Parallel()
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	names := map[string]string{}
	for _, list := range []string{"busybox:1.36.1\n", "busybox:1.36.1\nalpine:3.20\n"} {
		out, err := BuildInstance(root, tmp, Instance{Flavor: "vanilla", Images: []byte(list)})
		if err != nil {
			t.Fatal(err)
		}
		objs, err := Objects(out)
		if err != nil {
			t.Fatal(err)
		}
		ds := decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet")
		for _, v := range ds.Spec.Template.Spec.Volumes {
			if v.ConfigMap != nil {
				names[list] = v.ConfigMap.Name
			}
		}
	}
	if len(names) != 2 || names["busybox:1.36.1\n"] == names["busybox:1.36.1\nalpine:3.20\n"] {
		t.Errorf("the pod template does not change with the list: %v", names)
	}
}

func TestRootFromASubdirectoryAndOutsideTheTree(t *testing.T) {
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	t.Chdir(filepath.Join(root, "overlays", "vanilla"))
	if got, err := Root(); err != nil || got != root {
		t.Errorf("Root() from overlays/vanilla = %q, %v; want %q", got, err, root)
	}
	outside := t.TempDir()
	t.Chdir(outside)
	if got, err := Root(); err == nil || !strings.Contains(err.Error(), outside) {
		t.Errorf("Root() outside the tree = %q, %v; want an error naming %s", got, err, outside)
	}
}
