package clusterenv

import (
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Node is one node of the harness's cluster: the first one (which runs in the machine's own
// namespaces) or a fleet node (`e2e/cluster.sh add-node`, IMAGE_PREFETCHER_E2E_FLEET at up: a network and
// mount namespace of its own with its own runtime and kubelet).
type Node struct {
	Name, Runtime, IP string
	// CRISocket is the node's CRI socket as this machine's namespaces see it.
	CRISocket string
}

// IsContainerd says whether the node runs a containerd (either version).
func (n Node) IsContainerd() bool {
	return n.Runtime == RuntimeContainerd || n.Runtime == RuntimeContainerd16
}

// CRI returns the node's image client, closed when the test ends.
func (n Node) CRI(t testing.TB) runtimeapi.ImageServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+n.CRISocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("connect CRI of node %s (%s): %v", n.Name, n.CRISocket, err)
	}
	t.Cleanup(func() { conn.Close() })
	return runtimeapi.NewImageServiceClient(conn)
}

// Nodes are every node of the cluster, the first one first.
func (e *Env) Nodes() ([]Node, error) {
	nodes := []Node{{Name: e.NodeName, Runtime: e.Runtime, IP: e.NodeIP, CRISocket: e.CRISocket}}
	recs := e.vars["IMAGE_PREFETCHER_E2E_FLEET_NODES"]
	if recs == "" {
		return nodes, nil
	}
	for _, r := range strings.Split(recs, ";") {
		f := strings.Split(r, ",")
		if len(f) != 4 || f[0] == "" || f[3] == "" {
			return nil, fmt.Errorf("IMAGE_PREFETCHER_E2E_FLEET_NODES: record %q is not name,runtime,ip,socket", r)
		}
		nodes = append(nodes, Node{Name: f[0], Runtime: f[1], IP: f[2], CRISocket: f[3]})
	}
	return nodes, nil
}

// FleetGateway is the machine's address on the fleet bridge, where fleet nodes reach the API server and
// the registry (empty without fleet nodes).
func (e *Env) FleetGateway() string { return e.vars["IMAGE_PREFETCHER_E2E_FLEET_GATEWAY"] }

// FleetRegistryLog is the access log of the registry the nodes pull from (every node's requests, with
// its address and the bytes served).
func (e *Env) FleetRegistryLog() string { return e.vars["IMAGE_PREFETCHER_E2E_FLEET_REGISTRY_LOG"] }

// NodePaths are where every node of the cluster has a runtime's socket directory and image filesystem,
// as its own mount namespace shows them (the paths a DaemonSet's host mounts name).
type NodePaths struct {
	SocketDir, ImageFs string
}

// NodePathsOf returns the paths of containerd (either version) or CRI-O nodes.
func (e *Env) NodePathsOf(runtime string) NodePaths {
	if runtime == RuntimeCRIO {
		return NodePaths{SocketDir: e.vars["IMAGE_PREFETCHER_E2E_NODE_CRIO_SOCKET_DIR"], ImageFs: e.vars["IMAGE_PREFETCHER_E2E_NODE_CRIO_IMAGE_FS"]}
	}
	return NodePaths{SocketDir: e.vars["IMAGE_PREFETCHER_E2E_NODE_CONTAINERD_SOCKET_DIR"], ImageFs: e.vars["IMAGE_PREFETCHER_E2E_NODE_CONTAINERD_IMAGE_FS"]}
}
