package clusterenv

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func loadText(t *testing.T, text string) (*Env, error) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "env.sh")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return LoadFile(p)
}

const fleetEnvBase = `export IMAGE_PREFETCHER_E2E_MODE='full'
export IMAGE_PREFETCHER_E2E_RUNTIME='containerd'
export IMAGE_PREFETCHER_E2E_CRI_SOCKET='/s/host/run/containerd/containerd.sock'
export IMAGE_PREFETCHER_E2E_REGISTRY='127.0.0.1:5000'
export IMAGE_PREFETCHER_E2E_AUTH_REGISTRY='127.0.0.1:5001'
export IMAGE_PREFETCHER_E2E_KUBECONFIG='/s/admin.kubeconfig'
export IMAGE_PREFETCHER_E2E_NODE_NAME='e2e-node'
export IMAGE_PREFETCHER_E2E_NODE_IP='10.88.0.1'
export IMAGE_PREFETCHER_E2E_NODE_CRIO_SOCKET_DIR='/s/host/run/crio'
export IMAGE_PREFETCHER_E2E_NODE_CRIO_IMAGE_FS='/s/crio/storage/overlay-images'
export IMAGE_PREFETCHER_E2E_NODE_CONTAINERD_SOCKET_DIR='/s/host/run/containerd'
export IMAGE_PREFETCHER_E2E_NODE_CONTAINERD_IMAGE_FS='/s/containerd/root/io.containerd.snapshotter.v1.overlayfs'
`

func TestNodes(t *testing.T) {
	env, err := loadText(t, fleetEnvBase+`export IMAGE_PREFETCHER_E2E_FLEET_NODES='e2e-node-2,cri-o,10.89.0.12,/s/nodes/e2e-node-2/host/run/crio/crio.sock;e2e-node-3,containerd-1.6,10.89.0.13,/s/nodes/e2e-node-3/host/run/containerd/containerd.sock;e2e-gc,containerd,10.89.0.14,/s/nodes/e2e-gc/host/run/containerd/containerd.sock,image-gc'
export IMAGE_PREFETCHER_E2E_FLEET_GATEWAY='10.89.0.1'
`)
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := env.Nodes()
	if err != nil {
		t.Fatal(err)
	}
	want := []Node{
		{Name: "e2e-node", Runtime: RuntimeContainerd, IP: "10.88.0.1", CRISocket: "/s/host/run/containerd/containerd.sock"},
		{Name: "e2e-node-2", Runtime: RuntimeCRIO, IP: "10.89.0.12", CRISocket: "/s/nodes/e2e-node-2/host/run/crio/crio.sock"},
		{Name: "e2e-node-3", Runtime: RuntimeContainerd16, IP: "10.89.0.13", CRISocket: "/s/nodes/e2e-node-3/host/run/containerd/containerd.sock"},
		{Name: "e2e-gc", Runtime: RuntimeContainerd, IP: "10.89.0.14", CRISocket: "/s/nodes/e2e-gc/host/run/containerd/containerd.sock", ImageGC: true},
	}
	if !reflect.DeepEqual(nodes, want) {
		t.Errorf("Nodes() = %+v\nwant %+v", nodes, want)
	}
	if !nodes[2].IsContainerd() || nodes[1].IsContainerd() {
		t.Errorf("IsContainerd: containerd-1.6 %v, cri-o %v", nodes[2].IsContainerd(), nodes[1].IsContainerd())
	}
	if g := env.FleetGateway(); g != "10.89.0.1" {
		t.Errorf("FleetGateway() = %q", g)
	}
	if p := env.NodePathsOf(RuntimeCRIO); p.SocketDir != "/s/host/run/crio" || p.ImageFs != "/s/crio/storage/overlay-images" {
		t.Errorf("NodePathsOf(cri-o) = %+v", p)
	}
	if p := env.NodePathsOf(RuntimeContainerd16); p.SocketDir != "/s/host/run/containerd" {
		t.Errorf("NodePathsOf(containerd-1.6) = %+v", p)
	}
}

func TestNodesWithoutFleetIsTheFirstNode(t *testing.T) {
	env, err := loadText(t, fleetEnvBase)
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := env.Nodes()
	if err != nil || len(nodes) != 1 || nodes[0].Name != "e2e-node" {
		t.Errorf("Nodes() = %+v, %v; want the first node alone", nodes, err)
	}
}

func TestNodesRejectsABadRecord(t *testing.T) {
	for _, rec := range []string{"e2e-node-2,cri-o", "e2e-node-2,cri-o,10.89.0.12,/s/crio.sock,gc"} {
		env, err := loadText(t, fleetEnvBase+"export IMAGE_PREFETCHER_E2E_FLEET_NODES='"+rec+"'\n")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := env.Nodes(); err == nil || !strings.Contains(err.Error(), `"`+rec+`"`) {
			t.Errorf("Nodes() error = %v, want one naming the record %q", err, rec)
		}
	}
}
