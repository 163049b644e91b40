package bundle

import (
	"maps"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// The agent's uid: the image's own non-root user (build/ociimage).
const agentUID = 65532

// The agent runs as a non-root uid with group 0, which is what reaches the runtimes'
// root:root 0660 sockets, in every build; no container overrides it back to root.
func TestPodRunsNonRootWithGroupZero(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	for _, b := range builds {
		t.Run(b.Name, func(t *testing.T) {
			pod := agentPod(t, b)
			psc := deref(pod.SecurityContext)
			if psc.RunAsUser == nil || *psc.RunAsUser != agentUID || psc.RunAsGroup == nil || *psc.RunAsGroup != 0 || !deref(psc.RunAsNonRoot) {
				t.Errorf("pod runs as user %v group %v, runAsNonRoot %v: want %d, 0, true",
					deref(psc.RunAsUser), deref(psc.RunAsGroup), deref(psc.RunAsNonRoot), agentUID)
			}
			for _, c := range append(pod.InitContainers, pod.Containers...) {
				if sc := c.SecurityContext; sc != nil && (sc.RunAsUser != nil || sc.RunAsGroup != nil || sc.RunAsNonRoot != nil) {
					t.Errorf("container %s overrides the pod's user or group: %+v", c.Name, sc)
				}
			}
		})
	}
}

// The agent, uid 65532 in group 0, can read every Secret and ConfigMap volume it mounts: the
// kubelet writes their files as root:root with the volume's mode (0644 when unset).
func TestVolumesReadableByTheAgentsGroup(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	for _, b := range builds {
		t.Run(b.Name, func(t *testing.T) {
			for _, v := range agentPod(t, b).Volumes {
				var mode *int32
				switch {
				case v.Secret != nil:
					mode = v.Secret.DefaultMode
				case v.ConfigMap != nil:
					mode = v.ConfigMap.DefaultMode
				default:
					continue
				}
				if mode != nil && *mode&0o040 == 0 {
					t.Errorf("volume %s has mode %#o: its files are root:root, the agent reads them through group 0", v.Name, *mode)
				}
			}
		})
	}
}

// Every mount of a host directory, the CRI socket's first, is read-only and recursively so
// where the runtime can (IfPossible: runtimes without it still run the pod).
func TestHostDirectoriesMountRecursivelyReadOnly(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	for _, b := range builds {
		t.Run(b.Name, func(t *testing.T) {
			pod := agentPod(t, b)
			volumes := map[string]corev1.Volume{}
			for _, v := range pod.Volumes {
				volumes[v.Name] = v
			}
			socket := false
			for _, c := range pod.Containers {
				for _, m := range c.VolumeMounts {
					hp := volumes[m.Name].HostPath
					if hp == nil {
						continue
					}
					socket = socket || m.Name == "cri-socket"
					// A file or socket mount holds no submounts; a directory (or a type left
					// unchecked, which may be one) can.
					file := hp.Type != nil && (*hp.Type == corev1.HostPathFile || *hp.Type == corev1.HostPathSocket)
					rro := m.RecursiveReadOnly != nil && *m.RecursiveReadOnly == corev1.RecursiveReadOnlyIfPossible
					if !m.ReadOnly || (!file || m.Name == "cri-socket") && !rro {
						t.Errorf("host path %s at %s: readOnly %v, recursiveReadOnly %v; want true, IfPossible",
							hp.Path, m.MountPath, m.ReadOnly, deref(m.RecursiveReadOnly))
					}
				}
			}
			if !socket {
				t.Errorf("no cri-socket host path mount")
			}
		})
	}
}

// hostDir is a hostPath volume's path and type.
type hostDir struct {
	Path string
	Type corev1.HostPathType
}

// The runtime host paths each kind of node needs (volume name: host path and type).
var (
	containerdImageFs = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs"
	crioImageFs       = "/var/lib/containers/storage/overlay-images"
	// The default: containerd's and CRI-O's, each created where absent, so that the pod starts on
	// a node of either runtime.
	mixedNodes = map[string]hostDir{
		"cri-socket":    {"/run/containerd", corev1.HostPathDirectoryOrCreate},
		"image-fs":      {containerdImageFs, corev1.HostPathDirectoryOrCreate},
		"crio-socket":   {"/run/crio", corev1.HostPathDirectoryOrCreate},
		"crio-image-fs": {crioImageFs, corev1.HostPathDirectoryOrCreate},
	}
	crioNodes = map[string]hostDir{
		"cri-socket": {"/run/crio", corev1.HostPathDirectory},
		"image-fs":   {crioImageFs, corev1.HostPathDirectory},
	}
	k3sNodes = map[string]hostDir{
		"cri-socket": {"/run/k3s/containerd", corev1.HostPathDirectory},
		"image-fs":   {"/var/lib/rancher/k3s/agent/containerd/io.containerd.snapshotter.v1.overlayfs", corev1.HostPathDirectory},
	}
	criDockerdNodes = map[string]hostDir{
		"cri-socket": {"/run/cri-dockerd.sock", corev1.HostPathSocket},
	}
)

// Each build mounts the runtime host paths of the nodes it is for, and no other: the vanilla
// flavor both containerd's and CRI-O's (DirectoryOrCreate, so either kind of node starts the
// pod); ocp and runtime-crio CRI-O's alone; runtime-k3s and runtime-cri-dockerd their runtime's
// and no CRI-O path. Every one is mounted read-only below /host (checkInstance,
// TestHostDirectoriesMountRecursivelyReadOnly).
func TestRuntimeHostPaths(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	for _, b := range builds {
		t.Run(b.Name, func(t *testing.T) {
			want := mixedNodes
			switch {
			// The overlay's CRI-O patches run after its components, so they win over a
			// runtime component's.
			case strings.HasPrefix(b.Name, FlavorOCP), b.Name == FlavorVanilla+"+runtime-crio":
				want = crioNodes
			case b.Name == FlavorVanilla+"+runtime-k3s":
				want = k3sNodes
			case b.Name == FlavorVanilla+"+runtime-cri-dockerd":
				want = criDockerdNodes
			}
			pod := agentPod(t, b)
			got := map[string]hostDir{}
			for _, v := range pod.Volumes {
				// The credential provider components' own host paths, checked by their tests.
				if v.HostPath != nil && !strings.HasPrefix(v.Name, "credential-provider") {
					got[v.Name] = hostDir{v.HostPath.Path, deref(v.HostPath.Type)}
				}
			}
			if !maps.Equal(got, want) {
				t.Errorf("runtime host paths %v, want %v", got, want)
			}
			mounted := map[string]bool{}
			for _, m := range pod.Containers[0].VolumeMounts {
				mounted[m.Name] = true
			}
			for name := range want {
				if !mounted[name] {
					t.Errorf("volume %s is not mounted", name)
				}
			}
		})
	}
}

// scc is the part of OpenShift's SecurityContextConstraints the tests read.
type scc struct {
	AllowHostDirVolumePlugin bool     `json:"allowHostDirVolumePlugin"`
	AllowPrivilegedContainer bool     `json:"allowPrivilegedContainer"`
	AllowPrivilegeEscalation *bool    `json:"allowPrivilegeEscalation"`
	ReadOnlyRootFilesystem   bool     `json:"readOnlyRootFilesystem"`
	Volumes                  []string `json:"volumes"`
	RunAsUser                struct {
		Type                          string
		UID, UIDRangeMin, UIDRangeMax *int64
	} `json:"runAsUser"`
}

// The ocp flavor's SCC admits the agent's pod and little else: the agent's uid alone, not
// root; the volume types the pod mounts (plus the ServiceAccount token's projected volume).
func TestSCCNarrowedToTheAgent(t *testing.T) {
	t.Parallel()
	_, builds := buildAll(t)
	n := 0
	for _, b := range builds {
		if !strings.HasPrefix(b.Name, FlavorOCP) {
			continue
		}
		n++
		t.Run(b.Name, func(t *testing.T) {
			objs, err := Objects(b.YAML)
			if err != nil {
				t.Fatal(err)
			}
			var s *scc
			for _, o := range objs {
				if o.Kind == "SecurityContextConstraints" {
					s = &scc{}
					if err := yaml.Unmarshal([]byte(o.YAML), s); err != nil {
						t.Fatal(err)
					}
				}
			}
			if s == nil {
				t.Fatal("no SecurityContextConstraints")
			}
			u := s.RunAsUser
			if u.Type != "MustRunAsRange" || deref(u.UIDRangeMin) != agentUID || deref(u.UIDRangeMax) != agentUID {
				t.Errorf("SCC runAsUser %s [%d, %d]: want MustRunAsRange [%d, %d]", u.Type, deref(u.UIDRangeMin), deref(u.UIDRangeMax), agentUID, agentUID)
			}
			if s.AllowPrivilegedContainer || s.AllowPrivilegeEscalation == nil || *s.AllowPrivilegeEscalation || !s.ReadOnlyRootFilesystem {
				t.Errorf("SCC allows privilege or a writable root filesystem: %+v", s)
			}
			pod := agentPod(t, b)
			used := []string{"projected"} // the ServiceAccount token the kubelet mounts
			for _, v := range pod.Volumes {
				switch {
				case v.ConfigMap != nil:
					used = append(used, "configMap")
				case v.Secret != nil:
					used = append(used, "secret")
				case v.HostPath != nil:
					used = append(used, "hostPath")
					if !s.AllowHostDirVolumePlugin {
						t.Errorf("the pod mounts host path %s, the SCC allows none", v.HostPath.Path)
					}
				case v.Projected != nil:
				default:
					t.Errorf("volume %s is of a type this test does not know", v.Name)
				}
			}
			for _, u := range used {
				if !slices.Contains(s.Volumes, u) {
					t.Errorf("the pod mounts a %s volume, the SCC allows %v", u, s.Volumes)
				}
			}
			for _, v := range s.Volumes {
				if !slices.Contains(used, v) && v != "secret" { // secret: the pull-secret component
					t.Errorf("the SCC allows %s volumes, which the pod does not mount", v)
				}
			}
		})
	}
	if n == 0 {
		t.Fatal("no ocp build")
	}
}

func agentPod(t *testing.T, b Build) corev1.PodSpec {
	t.Helper()
	objs, err := Objects(b.YAML)
	if err != nil {
		t.Fatal(err)
	}
	return decodeOne[appsv1.DaemonSet](t, objs, "DaemonSet").Spec.Template.Spec
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
