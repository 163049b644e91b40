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
		ListenPort:        19477,
		RecheckInterval:   "5s",
		PullSecret:        []byte(`{"auths":{"127.0.0.1:5001":{"auth":"dTpw"}}}`),
		ExtraArgs:         []string{"--log-format=json"},
		CollectorGRPCPort: 19478, CollectorHTTPPort: 19479,
	}
	out, err := Build(root, t.TempDir(), o)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := bundle.Objects(out)
	if err != nil {
		t.Fatal(err)
	}
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
