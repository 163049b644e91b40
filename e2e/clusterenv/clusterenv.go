// Package clusterenv gives Go tests the real environment that e2e/cluster.sh brings up: the containerd CRI
// socket, the plain and basic-auth registries with their test images and, in full mode, a single-node
// Kubernetes cluster.
//
// Tests call Require first. Without IMAGE_PREFETCHER_E2E the test is skipped (so `go test ./...` stays fast on
// a laptop); with IMAGE_PREFETCHER_E2E=1 (CI) a missing or dead environment fails the test, so a broken
// harness can never pass as a green run.
package clusterenv

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/e2e/testimage"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The runtimes e2e/cluster.sh can run (IMAGE_PREFETCHER_E2E_RUNTIME).
const (
	RuntimeContainerd   = "containerd" // containerd 2.x, built from its Go module
	RuntimeContainerd16 = "containerd-1.6"
	RuntimeCRIO         = "cri-o"
)

// IsContainerd says whether the runtime is a containerd (either version): its native API is on the socket.
func (e *Env) IsContainerd() bool {
	return e.Runtime == RuntimeContainerd || e.Runtime == RuntimeContainerd16
}

// Mode is how much of the environment a test needs.
type Mode string

const (
	// Runtime is containerd + runc + CNI + the two registries with the test images.
	Runtime Mode = "runtime"
	// Full is Runtime plus etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a Ready kubelet.
	Full Mode = "full"
)

const (
	// EnableVar turns the e2e tests on; CI sets it to 1.
	EnableVar = "IMAGE_PREFETCHER_E2E"
	// StateVar overrides the harness' state directory (default DefaultState).
	StateVar = "IMAGE_PREFETCHER_E2E_STATE"
	// DefaultState is where e2e/cluster.sh keeps its state and env file by default.
	DefaultState = "/var/tmp/image-prefetcher-e2e"
)

// Env is the environment as recorded in the env file written by `e2e/cluster.sh up`.
type Env struct {
	Mode  Mode
	State string
	// Runtime is the container runtime the harness runs (RuntimeContainerd, RuntimeContainerd16 or
	// RuntimeCRIO); RuntimeVersion is what it reports over CRI.
	Runtime        string
	RuntimeVersion string
	// HostRoot is laid out like a node's / for the runtime's socket (run/containerd/containerd.sock or
	// run/crio/crio.sock): the agent's --host-root detection finds the socket there.
	HostRoot string
	// CRISocket is the containerd socket path (no scheme); CRIEndpoint is unix://CRISocket.
	CRISocket, CRIEndpoint string
	// ImageFs is the image filesystem's directory as CRI ImageFsInfo names it (containerd's
	// overlayfs snapshotter, CRI-O's overlay-images).
	ImageFs string
	// ImageFsSize is the size of the filesystem of its own the runtime's store has (e.g. 128M),
	// empty when it shares the state dir's.
	ImageFsSize string
	// ContainerdNamespace holds the images pulled through CRI (k8s.io).
	ContainerdNamespace string
	// Registry is the plain HTTP registry, AuthRegistry the one with basic auth (host:port).
	Registry, AuthRegistry string
	AuthUser               string
	AuthPasswordFile       string
	// AuthDockerConfig is a dockerconfigjson file with the right credentials for AuthRegistry.
	AuthDockerConfig string
	// ImagesFile is the catalogue of test images (JSON, see Images).
	ImagesFile string

	// Full mode only.
	Kubeconfig, APIServer, NodeName, NodeIP, PodLogsDir, KubeVersion, KubeBin string
	AgentImagePushed                                                          bool
	// AgentImage is the digest reference `make image-push` pushed during up (empty when it did not run).
	AgentImage string

	vars map[string]string
}

// Image is one test image from the catalogue that e2e/cmd/testimages writes.
type Image = testimage.CatalogueEntry

// Require returns the environment for a test that needs mode, skipping or failing as the package doc says.
func Require(t testing.TB, mode Mode) *Env {
	t.Helper()
	if os.Getenv(EnableVar) == "" {
		t.Skipf("e2e test needs the real environment: run `e2e/cluster.sh up %s` as root, then set %s=1", modeArg(mode), EnableVar)
	}
	env, err := Load()
	if err != nil {
		t.Fatalf("%s is set but the e2e environment is not usable: %v\n(run `e2e/cluster.sh up %s` as root)", EnableVar, err, modeArg(mode))
	}
	if mode == Full && env.Mode != Full {
		t.Fatalf("%s is set and this test needs the full cluster, but the environment at %s is %q (run `e2e/cluster.sh up`)", EnableVar, env.State, env.Mode)
	}
	if err := env.check(mode); err != nil {
		t.Fatalf("%s is set but the e2e environment at %s does not answer: %v\n(see `e2e/cluster.sh status`; restart with `e2e/cluster.sh up %s`)", EnableVar, env.State, err, modeArg(mode))
	}
	return env
}

func modeArg(m Mode) string {
	if m == Runtime {
		return "runtime"
	}
	return "full"
}

// Load reads the env file of the state directory ($IMAGE_PREFETCHER_E2E_STATE or DefaultState).
func Load() (*Env, error) {
	state := os.Getenv(StateVar)
	if state == "" {
		state = DefaultState
	}
	return LoadFile(filepath.Join(state, "env.sh"))
}

// LoadFile reads an env file: lines `export NAME='value'` (values never contain quotes).
func LoadFile(path string) (*Env, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read env file (written by `e2e/cluster.sh up`): %w", err)
	}
	defer f.Close()
	vars := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, value, ok := strings.Cut(strings.TrimPrefix(line, "export "), "=")
		if !ok {
			return nil, fmt.Errorf("%s:%d: not NAME=value: %q", path, n, line)
		}
		vars[name] = strings.Trim(value, `'"`)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	e := &Env{
		Mode:                Mode(vars["IMAGE_PREFETCHER_E2E_MODE"]),
		State:               vars["IMAGE_PREFETCHER_E2E_STATE"],
		Runtime:             vars["IMAGE_PREFETCHER_E2E_RUNTIME"],
		RuntimeVersion:      vars["IMAGE_PREFETCHER_E2E_RUNTIME_VERSION"],
		HostRoot:            vars["IMAGE_PREFETCHER_E2E_HOST_ROOT"],
		CRISocket:           vars["IMAGE_PREFETCHER_E2E_CRI_SOCKET"],
		CRIEndpoint:         vars["IMAGE_PREFETCHER_E2E_CRI_ENDPOINT"],
		ImageFs:             vars["IMAGE_PREFETCHER_E2E_IMAGE_FS"],
		ImageFsSize:         vars["IMAGE_PREFETCHER_E2E_IMAGE_FS_SIZE"],
		ContainerdNamespace: vars["IMAGE_PREFETCHER_E2E_CONTAINERD_NAMESPACE"],
		Registry:            vars["IMAGE_PREFETCHER_E2E_REGISTRY"],
		AuthRegistry:        vars["IMAGE_PREFETCHER_E2E_AUTH_REGISTRY"],
		AuthUser:            vars["IMAGE_PREFETCHER_E2E_AUTH_USER"],
		AuthPasswordFile:    vars["IMAGE_PREFETCHER_E2E_AUTH_PASSWORD_FILE"],
		AuthDockerConfig:    vars["IMAGE_PREFETCHER_E2E_AUTH_DOCKERCONFIG"],
		ImagesFile:          vars["IMAGE_PREFETCHER_E2E_IMAGES"],
		Kubeconfig:          vars["IMAGE_PREFETCHER_E2E_KUBECONFIG"],
		APIServer:           vars["IMAGE_PREFETCHER_E2E_APISERVER"],
		NodeName:            vars["IMAGE_PREFETCHER_E2E_NODE_NAME"],
		NodeIP:              vars["IMAGE_PREFETCHER_E2E_NODE_IP"],
		PodLogsDir:          vars["IMAGE_PREFETCHER_E2E_POD_LOGS_DIR"],
		KubeVersion:         vars["IMAGE_PREFETCHER_E2E_KUBE_VERSION"],
		KubeBin:             vars["IMAGE_PREFETCHER_E2E_KUBE_BIN"],
		AgentImagePushed:    vars["IMAGE_PREFETCHER_E2E_AGENT_IMAGE_PUSHED"] == "1",
		AgentImage:          vars["IMAGE_PREFETCHER_E2E_AGENT_IMAGE"],
		vars:                vars,
	}
	if e.Mode != Runtime && e.Mode != Full {
		return nil, fmt.Errorf("%s: unknown mode %q", path, e.Mode)
	}
	switch e.Runtime {
	case RuntimeContainerd, RuntimeContainerd16, RuntimeCRIO:
	default:
		return nil, fmt.Errorf("%s: unknown runtime %q (an environment from an older harness: run e2e/cluster.sh up again)", path, e.Runtime)
	}
	for name, v := range map[string]string{"CRI socket": e.CRISocket, "registry": e.Registry, "auth registry": e.AuthRegistry} {
		if v == "" {
			return nil, fmt.Errorf("%s: no %s recorded", path, name)
		}
	}
	if e.Mode == Full && e.Kubeconfig == "" {
		return nil, fmt.Errorf("%s: full mode without a kubeconfig", path)
	}
	return e, nil
}

// Var returns any variable of the env file by its full name.
func (e *Env) Var(name string) string { return e.vars[name] }

// check proves that the recorded components answer: the CRI socket, the registries and, in full mode,
// the API server's /readyz.
func (e *Env) check(mode Mode) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rt, _, closeCRI, err := e.dialCRI()
	if err != nil {
		return err
	}
	defer closeCRI()
	if _, err := rt.Version(ctx, &runtimeapi.VersionRequest{}); err != nil {
		return fmt.Errorf("CRI Version on %s: %w", e.CRISocket, err)
	}
	for _, r := range []string{e.Registry, e.AuthRegistry} {
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", r)
		if err != nil {
			return fmt.Errorf("registry %s: %w", r, err)
		}
		conn.Close()
	}
	if mode != Full {
		return nil
	}
	cfg, err := e.RESTConfig()
	if err != nil {
		return err
	}
	rc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return fmt.Errorf("API client: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, cfg.Host+"/readyz", nil)
	if err != nil {
		return err
	}
	resp, err := rc.Do(req)
	if err != nil {
		return fmt.Errorf("kube-apiserver /readyz: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("kube-apiserver /readyz: %s", resp.Status)
	}
	return nil
}

// Kubectl runs kubectl with the environment's admin kubeconfig (stdin, when not nil, as its input) and
// returns what it printed, stdout and stderr together.
func (e *Env) Kubectl(ctx context.Context, stdin []byte, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "kubectl", args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+e.Kubeconfig)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// RESTConfig is the admin (system:masters) client configuration.
func (e *Env) RESTConfig() (*rest.Config, error) {
	if e.Kubeconfig == "" {
		return nil, errors.New("no kubeconfig: the environment is not in full mode")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", e.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", e.Kubeconfig, err)
	}
	return cfg, nil
}

// Clientset is an admin clientset; it fails the test when the kubeconfig cannot be used.
func (e *Env) Clientset(t testing.TB) kubernetes.Interface {
	t.Helper()
	cfg, err := e.RESTConfig()
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatalf("clientset: %v", err)
	}
	return cs
}

func (e *Env) dialCRI() (runtimeapi.RuntimeServiceClient, runtimeapi.ImageServiceClient, func(), error) {
	conn, err := grpc.NewClient("unix://"+e.CRISocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("connect CRI %s: %w", e.CRISocket, err)
	}
	return runtimeapi.NewRuntimeServiceClient(conn), runtimeapi.NewImageServiceClient(conn), func() { conn.Close() }, nil
}

// CRI returns runtime and image clients on the CRI socket, closed when the test ends.
func (e *Env) CRI(t testing.TB) (runtimeapi.RuntimeServiceClient, runtimeapi.ImageServiceClient) {
	t.Helper()
	rt, img, closeFn, err := e.dialCRI()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeFn)
	return rt, img
}

// AuthPassword is the auth registry's password.
func (e *Env) AuthPassword(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(e.AuthPasswordFile)
	if err != nil {
		t.Fatalf("read auth registry password: %v", err)
	}
	return strings.TrimSpace(string(b))
}

// AuthConfig is the CRI AuthConfig with the right credentials for the auth registry.
//
// ServerAddress stays empty: containerd 1.6 parses it as a URL, so a bare "127.0.0.1:5001" is an error
// ("first path segment in URL cannot contain colon") and "host:port" without a scheme silently drops the
// credentials; a set value must look like "http://127.0.0.1:5001".
func (e *Env) AuthConfig(t testing.TB) *runtimeapi.AuthConfig {
	t.Helper()
	return &runtimeapi.AuthConfig{Username: e.AuthUser, Password: e.AuthPassword(t)}
}

// Images returns the test image catalogue.
func (e *Env) Images(t testing.TB) []Image {
	t.Helper()
	images, err := e.Catalogue()
	if err != nil {
		t.Fatal(err)
	}
	return images
}

// Catalogue reads the test image catalogue (Images, for a program rather than a test).
func (e *Env) Catalogue() ([]Image, error) {
	b, err := os.ReadFile(e.ImagesFile)
	if err != nil {
		return nil, fmt.Errorf("read test image catalogue: %w", err)
	}
	var images []Image
	if err := json.Unmarshal(b, &images); err != nil {
		return nil, fmt.Errorf("parse %s: %w", e.ImagesFile, err)
	}
	return images, nil
}

// Image returns the catalogue entry with the given tagged reference, e.g. Image(t, "e2e/busybox:latest")
// (the registry host may be left out for images on the plain registry).
func (e *Env) Image(t testing.TB, ref string) Image {
	t.Helper()
	for _, img := range e.Images(t) {
		if img.Ref == ref || img.Ref == e.Registry+"/"+ref || img.Ref == e.AuthRegistry+"/"+ref {
			return img
		}
	}
	t.Fatalf("no test image %q in %s", ref, e.ImagesFile)
	return Image{}
}
