package deploy

import (
	"errors"
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/nodeprefetch/image-prefetcher/bundle"
)

// Build needs no cluster: the instance overlay plus the e2e layer, with every option set.
func TestBuild(t *testing.T) {
	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	o := Options{
		Namespace: "e2e-ns", Instance: "e2e-images",
		Images:            []string{"127.0.0.1:5000/e2e/small:01"},
		Components:        []string{"pull-secret", "metrics-collector"},
		AgentImage:        "127.0.0.1:5000/image-prefetcher@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		CRISocketDir:      "/var/tmp/e2e/containerd",
		ImageFs:           "/var/tmp/e2e/root/io.containerd.snapshotter.v1.overlayfs",
		CRIOSocketDir:     "/var/tmp/e2e/crio/run",
		CRIOImageFs:       "/var/tmp/e2e/crio/storage/overlay-images",
		ListenPort:        19477,
		RecheckInterval:   "5s",
		PullSecret:        []byte(`{"auths":{"127.0.0.1:5001":{"auth":"dTpw"}}}`),
		ExtraArgs:         []string{"--log-format=json"},
		CollectorGRPCPort: 19478, CollectorHTTPPort: 19479,
	}
	objs := buildObjects(t, root, o)
	dss, err1 := bundle.OfKind[appsv1.DaemonSet](objs, "DaemonSet")
	secrets, err2 := bundle.OfKind[corev1.Secret](objs, "Secret")
	cms, err3 := bundle.OfKind[corev1.ConfigMap](objs, "ConfigMap")
	if err := errors.Join(err1, err2, err3); err != nil || len(dss) != 1 || len(secrets) != 1 || len(cms) != 1 {
		t.Fatalf("want one DaemonSet, Secret and ConfigMap: %d, %d, %d (%v)", len(dss), len(secrets), len(cms), err)
	}
	ds, secret, cm := dss[0], secrets[0], cms[0]
	if ds.Name != o.Instance || ds.Namespace != o.Namespace {
		t.Fatalf("DaemonSet %s/%s, want %s/%s", ds.Namespace, ds.Name, o.Namespace, o.Instance)
	}
	pod := ds.Spec.Template.Spec
	agent := pod.Containers[0]
	if !pod.HostNetwork || agent.Image != o.AgentImage {
		t.Errorf("hostNetwork %v, image %s", pod.HostNetwork, agent.Image)
	}
	for _, a := range []string{"--listen-address=:19477", "--disk-budget-percent=99", "--recheck-interval=5s", "--collector-address=127.0.0.1:19478", "--log-format=json"} {
		if !slices.Contains(agent.Args, a) {
			t.Errorf("agent args %v lack %s", agent.Args, a)
		}
	}
	for _, v := range pod.Volumes {
		if v.Name == "cri-socket" && (v.HostPath == nil || v.HostPath.Path != o.CRISocketDir) {
			t.Errorf("cri-socket volume %+v, want %s", v.VolumeSource, o.CRISocketDir)
		}
		if v.Name == "image-fs" && (v.HostPath == nil || v.HostPath.Path != o.ImageFs) {
			t.Errorf("image-fs volume %+v, want %s", v.VolumeSource, o.ImageFs)
		}
		if v.Name == "crio-socket" && (v.HostPath == nil || v.HostPath.Path != o.CRIOSocketDir) {
			t.Errorf("crio-socket volume %+v, want %s", v.VolumeSource, o.CRIOSocketDir)
		}
		if v.Name == "crio-image-fs" && (v.HostPath == nil || v.HostPath.Path != o.CRIOImageFs) {
			t.Errorf("crio-image-fs volume %+v, want %s", v.VolumeSource, o.CRIOImageFs)
		}
	}
	if !slices.ContainsFunc(agent.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.Name == "image-fs" && m.MountPath == "/host"+o.ImageFs && m.ReadOnly
	}) {
		t.Errorf("agent mounts %+v: want image-fs read-only at /host%s, where the agent looks", agent.VolumeMounts, o.ImageFs)
	}
	if got := string(secret.Data[corev1.DockerConfigJsonKey]); got != string(o.PullSecret) {
		t.Errorf("pull secret %q, want %s", got, o.PullSecret)
	}
	if cm.Data["images.txt"] != ImagesFile(o.Images) {
		t.Errorf("image list %q, want %q", cm.Data["images.txt"], ImagesFile(o.Images))
	}
}

// The CRI-O volumes the vanilla overlay has beside containerd's get the harness's directories
// when given, stay the overlay's when not, and are never added to an overlay without them (ocp).
func TestBuildCRIODirs(t *testing.T) {
	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	const socketDir, imageFs = "/var/tmp/e2e/crio/run", "/var/tmp/e2e/crio/storage/overlay-images"
	for _, tc := range []struct {
		name, flavor       string
		socketDir, imageFs string
		wantSocket, wantFs string // host paths of crio-socket and crio-image-fs; "" for no volume
		wantFsMount        string // where crio-image-fs is mounted besides the overlay's mount
	}{
		{name: "vanilla given", flavor: bundle.FlavorVanilla, socketDir: socketDir, imageFs: imageFs,
			wantSocket: socketDir, wantFs: imageFs, wantFsMount: "/host" + imageFs},
		{name: "vanilla unset", flavor: bundle.FlavorVanilla,
			wantSocket: "/run/crio", wantFs: "/var/lib/containers/storage/overlay-images"},
		{name: "ocp unset", flavor: bundle.FlavorOCP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := Options{
				Namespace: "e2e-ns", Instance: "e2e-images", Flavor: tc.flavor,
				Images:        []string{"127.0.0.1:5000/e2e/small:01"},
				AgentImage:    "127.0.0.1:5000/image-prefetcher:e2e",
				CRISocketDir:  "/var/tmp/e2e/containerd",
				ImageFs:       "/var/tmp/e2e/root/io.containerd.snapshotter.v1.overlayfs",
				CRIOSocketDir: tc.socketDir, CRIOImageFs: tc.imageFs,
				ListenPort: 19477,
			}
			objs := buildObjects(t, root, o)
			dss, err := bundle.OfKind[appsv1.DaemonSet](objs, "DaemonSet")
			if err != nil || len(dss) != 1 {
				t.Fatalf("want one DaemonSet, got %d (%v)", len(dss), err)
			}
			pod := dss[0].Spec.Template.Spec
			volumes := map[string]corev1.Volume{}
			for _, v := range pod.Volumes {
				volumes[v.Name] = v
			}
			for name, want := range map[string]string{"crio-socket": tc.wantSocket, "crio-image-fs": tc.wantFs} {
				v, ok := volumes[name]
				switch {
				case want == "" && ok:
					t.Errorf("volume %s %+v: want none", name, v.VolumeSource)
				case want == "":
				case v.HostPath == nil || v.HostPath.Path != want:
					t.Errorf("volume %s %+v: want host path %s", name, v.VolumeSource, want)
				case v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectoryOrCreate:
					t.Errorf("volume %s type %v: want DirectoryOrCreate (the harness's node runs one runtime)", name, v.HostPath.Type)
				}
			}
			agent := pod.Containers[0]
			for _, m := range agent.VolumeMounts {
				if _, ok := volumes[m.Name]; !ok {
					t.Errorf("mount %s names no volume %s", m.MountPath, m.Name)
				}
			}
			if tc.wantFsMount != "" && !slices.ContainsFunc(agent.VolumeMounts, func(m corev1.VolumeMount) bool {
				return m.Name == "crio-image-fs" && m.MountPath == tc.wantFsMount && m.ReadOnly
			}) {
				t.Errorf("agent mounts %+v: want crio-image-fs read-only at %s, where the agent looks", agent.VolumeMounts, tc.wantFsMount)
			}
		})
	}
}

// buildObjects is Build's output as objects.
func buildObjects(t *testing.T, root string, o Options) []bundle.Object {
	t.Helper()
	out, err := Build(root, t.TempDir(), o)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := bundle.Objects(out)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}
