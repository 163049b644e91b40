package deploy

import (
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
	var ds appsv1.DaemonSet
	var secret corev1.Secret
	var cm corev1.ConfigMap
	for _, obj := range objs {
		var err error
		switch obj.Kind {
		case "DaemonSet":
			err = obj.Decode(&ds)
		case "Secret":
			err = obj.Decode(&secret)
		case "ConfigMap":
			err = obj.Decode(&cm)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if ds.Name != o.Instance || ds.Namespace != o.Namespace {
		t.Fatalf("DaemonSet %s/%s, want %s/%s", ds.Namespace, ds.Name, o.Namespace, o.Instance)
	}
	pod := ds.Spec.Template.Spec
	agent := pod.Containers[0]
	if !pod.HostNetwork || agent.Image != o.AgentImage {
		t.Errorf("hostNetwork %v, image %s", pod.HostNetwork, agent.Image)
	}
	for _, a := range []string{"--listen-address=:19477", "--recheck-interval=5s", "--collector-address=127.0.0.1:19478", "--log-format=json"} {
		if !slices.Contains(agent.Args, a) {
			t.Errorf("agent args %v lack %s", agent.Args, a)
		}
	}
	for _, v := range pod.Volumes {
		if v.Name == "cri-socket" && (v.HostPath == nil || v.HostPath.Path != o.CRISocketDir) {
			t.Errorf("cri-socket volume %+v, want %s", v.VolumeSource, o.CRISocketDir)
		}
	}
	if got := string(secret.Data[corev1.DockerConfigJsonKey]); got != string(o.PullSecret) {
		t.Errorf("pull secret %q, want %s", got, o.PullSecret)
	}
	if cm.Data["images.txt"] != ImagesFile(o.Images) {
		t.Errorf("image list %q, want %q", cm.Data["images.txt"], ImagesFile(o.Images))
	}
}
