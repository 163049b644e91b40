package clusterenv

import (
	"context"
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
	// ImageGC: the node's kubelet collects every unused, unpinned image (add-node --image-gc).
	ImageGC bool
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

// SandboxImage is the pause image every node's runtime runs pod sandboxes from (e2e/cluster.sh writes it
// into each runtime's configuration).
func (e *Env) SandboxImage() string { return e.Registry + "/e2e/pause:latest" }

// PullAgentImages pulls onto the node what the agent's pod needs before its list (the sandbox image and the
// agent's image), so that a test can then cut the node off from the registry and still have an agent.
func (e *Env) PullAgentImages(ctx context.Context, t testing.TB, n Node) {
	t.Helper()
	images := n.CRI(t)
	for _, ref := range []string{e.SandboxImage(), e.AgentImage} {
		if _, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
			t.Fatalf("pull %s on node %s: %v", ref, n.Name, err)
		}
	}
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
		if len(f) < 4 || len(f) > 5 || f[0] == "" || f[3] == "" || (len(f) == 5 && f[4] != "image-gc") {
			return nil, fmt.Errorf("IMAGE_PREFETCHER_E2E_FLEET_NODES: record %q is not name,runtime,ip,socket[,image-gc]", r)
		}
		nodes = append(nodes, Node{Name: f[0], Runtime: f[1], IP: f[2], CRISocket: f[3], ImageGC: len(f) == 5})
	}
	return nodes, nil
}

// FleetNodes are the nodes the fleet tests' instances serve, the first one first: every node but those a
// test added with image GC on for itself (their kubelet removes every image no container uses, so no
// other test's list stays there; the test that adds one taints it against every other instance).
func (e *Env) FleetNodes() ([]Node, error) {
	all, err := e.Nodes()
	if err != nil {
		return nil, err
	}
	var nodes []Node
	for _, n := range all {
		if !n.ImageGC {
			nodes = append(nodes, n)
		}
	}
	return nodes, nil
}

// RequireFleet fails the test unless the cluster has at least 3 nodes of at least 2 runtimes on the fleet
// network; it returns them (FleetNodes), the first one first.
func (e *Env) RequireFleet(t testing.TB) []Node {
	t.Helper()
	nodes, err := e.FleetNodes()
	if err != nil {
		t.Fatal(err)
	}
	runtimes := map[string]bool{}
	for _, n := range nodes {
		runtimes[n.Runtime] = true
	}
	if len(nodes) < 3 || len(runtimes) < 2 || e.FleetGateway() == "" {
		t.Fatalf("the fleet tests need >= 3 nodes of >= 2 runtimes; the cluster has %d (%v): e2e/cluster.sh up with "+
			"IMAGE_PREFETCHER_E2E_FLEET='cri-o containerd-1.6' (make e2e-fleet)", len(nodes), runtimes)
	}
	return nodes
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
