// Command crireset stops and removes every pod sandbox (and so every container) a CRI runtime knows, through
// the CRI API, so the runtime itself tears down network namespaces, CNI allocations and mounts. The e2e
// harness runs it on `down` after the kubelet has stopped: killing tasks by hand would leave those behind.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func main() {
	socket := flag.String("socket", "", "CRI socket path")
	timeout := flag.Duration("timeout", 60*time.Second, "overall time limit")
	probe := flag.Bool("probe", false, "only check that the runtime answers CRI Version (the harness' readiness check, the same for every runtime)")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("crireset: ")
	if *socket == "" {
		log.Fatal("--socket is required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if *probe {
		if err := version(ctx, *socket); err != nil {
			log.Print(err)
			os.Exit(1)
		}
		return
	}
	if err := reset(ctx, *socket); err != nil {
		log.Print(err)
		os.Exit(1)
	}
}

// version prints the runtime's name and version once it answers CRI Version.
func version(ctx context.Context, socket string) error {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect %s: %w", socket, err)
	}
	defer conn.Close()
	v, err := runtimeapi.NewRuntimeServiceClient(conn).Version(ctx, &runtimeapi.VersionRequest{})
	if err != nil {
		return fmt.Errorf("CRI Version on %s: %w", socket, err)
	}
	fmt.Println(v.GetRuntimeName(), v.GetRuntimeVersion())
	return nil
}

func reset(ctx context.Context, socket string) error {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect %s: %w", socket, err)
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	// A containerd started just for this cleanup answers "server is not initialized yet" for a moment.
	var sandboxes *runtimeapi.ListPodSandboxResponse
	for {
		sandboxes, err = rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("list pod sandboxes on %s: %w", socket, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
	var failed int
	for _, sb := range sandboxes.Items {
		name := sb.GetMetadata().GetNamespace() + "/" + sb.GetMetadata().GetName()
		if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sb.Id}); err != nil {
			log.Printf("stop sandbox %s (%s): %v", name, sb.Id, err)
			failed++
			continue
		}
		if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sb.Id}); err != nil {
			log.Printf("remove sandbox %s (%s): %v", name, sb.Id, err)
			failed++
			continue
		}
	}
	// Containers outside any listed sandbox should not exist; remove them if they do.
	containers, err := rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{})
	if err != nil {
		return fmt.Errorf("list containers on %s: %w", socket, err)
	}
	for _, c := range containers.Containers {
		_, _ = rt.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: c.Id, Timeout: 1})
		if _, err := rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: c.Id}); err != nil {
			log.Printf("remove container %s: %v", c.Id, err)
			failed++
		}
	}
	log.Printf("removed %d pod sandboxes and %d stray containers", len(sandboxes.Items)-failed, len(containers.Containers))
	if failed > 0 {
		return fmt.Errorf("%d sandboxes or containers could not be removed", failed)
	}
	return nil
}
