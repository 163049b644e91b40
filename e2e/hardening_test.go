package e2e_test

// The agent's pod as the bundle ships it, seen from the host: the user and group its process
// runs as, its PID 1 reaping a credential plugin's orphans, and its socket mount read-only down
// to the mounts below it. The process is found through the kubelet's pod cgroup and read in
// /proc, so what is asserted is what the kernel applies, not what the manifest asks for.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/deploy"
)

// procStatus is one field of /proc/<pid>/status, read from the host.
func procStatus(pid int, field string) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strings.Join(strings.Fields(v), " ")
		}
	}
	return ""
}

func hostPIDs(t *testing.T) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// agentProcess finds the host PID of the instance's agent: a process in the pod's cgroup whose
// program is image-prefetcher.
func (in *instance) agentProcess(ctx context.Context) int {
	in.t.Helper()
	var pid int
	err := wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		pods := in.pods(ctx)
		if len(pods) != 1 || pods[0].Status.Phase != corev1.PodRunning {
			return false, nil
		}
		marker := "pod" + string(pods[0].UID)
		for _, p := range hostPIDs(in.t) {
			cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p))
			if err != nil || !bytes.Contains(cg, []byte(marker)) {
				continue
			}
			cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
			argv0, _, _ := bytes.Cut(cmd, []byte{0})
			if filepath.Base(string(argv0)) == "image-prefetcher" {
				pid = p
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		in.t.Fatalf("no image-prefetcher process of %s's pod on the host: %v\n%s", in.name(), err, in.diagnose())
	}
	return pid
}

// recursiveReadOnlySupported says whether the node's default runtime handler reports
// recursive read-only mounts (node.status.runtimeHandlers, filled by the kubelet from CRI).
func recursiveReadOnlySupported(ctx context.Context, t *testing.T, env *clusterenv.Env) bool {
	t.Helper()
	n, err := env.Clientset(t).CoreV1().Nodes().Get(ctx, env.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range n.Status.RuntimeHandlers {
		if h.Name == "" && h.Features != nil && h.Features.RecursiveReadOnlyMounts != nil {
			return *h.Features.RecursiveReadOnlyMounts
		}
	}
	return false
}

// mountOptions returns the per-mount options (ro/rw, ...) of the mount at path in pid's mount
// namespace, from /proc/<pid>/mountinfo.
func mountOptions(t *testing.T, pid int, path string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	opts := ""
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 5 && f[4] == path {
			opts = f[5] // the last mount at a path is the one seen there
		}
	}
	return opts
}

// The default overlay's agent (vanilla; ocp on CRI-O) runs as uid 65532 with group 0 and no
// capability, reaches the runtime's root:root 0660 socket, and labels the node. A mount below
// the socket directory is read-only in the container where the runtime supports recursive
// read-only mounts; elsewhere (IfPossible) the pod still runs.
func TestPodRunsAsNonRootAndLabelsTheNode(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	_, images := env.CRI(t)
	list := refs(t, env, "e2e/small:11")
	removeImages(ctx, t, images, list)

	socketDir := filepath.Dir(env.CRISocket)
	if fi, err := os.Stat(env.CRISocket); err != nil {
		t.Fatal(err)
	} else if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || st.Gid != 0 || fi.Mode().Perm()&0o007 != 0 {
		t.Fatalf("%s is %d:%d %v: the test is about a root:root socket closed to others", env.CRISocket, st.Uid, st.Gid, fi.Mode().Perm())
	}
	t.Logf("%s: root:root %v", env.CRISocket, mustStat(t, env.CRISocket).Mode().Perm())

	// A mount below the socket directory, there before the container starts (as the runtime's
	// own mounts are on a node): recursively read-only it is read-only in the container too.
	sub := filepath.Join(socketDir, "e2e-rro-"+suffix(t))
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(sub) })
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "e2e-rro", sub).CombinedOutput(); err != nil {
		t.Fatalf("mount a tmpfs at %s: %v\n%s", sub, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", sub).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", sub, err, out)
		}
	})

	in := newInstance(t, env, "nonroot", list)
	in.apply()
	in.requireRollout(3 * time.Minute)
	in.waitLabel(ctx, "succeeded")
	requireAllPresent(ctx, t, images, list)

	pid := in.agentProcess(ctx)
	for field, want := range map[string]string{
		"Uid":        "65532 65532 65532 65532",
		"Gid":        "0 0 0 0",
		"CapEff":     "0000000000000000",
		"CapPrm":     "0000000000000000",
		"NoNewPrivs": "1",
	} {
		if got := procStatus(pid, field); got != want {
			t.Errorf("agent process %d %s: %q, want %q", pid, field, got, want)
		}
	}
	t.Logf("agent process %d: Uid %s, Gid %s, Groups %q", pid, procStatus(pid, "Uid"), procStatus(pid, "Gid"), procStatus(pid, "Groups"))
	if groups := strings.Fields(procStatus(pid, "Groups")); len(groups) > 1 || len(groups) == 1 && groups[0] != "0" && groups[0] != "65532" {
		t.Errorf("agent process %d has supplementary groups %v: want none beyond its own", pid, groups)
	}
	if nspid := strings.Fields(procStatus(pid, "NSpid")); len(nspid) < 2 || nspid[len(nspid)-1] != "1" {
		t.Errorf("agent process %d NSpid %v: want PID 1 in its namespace (the reaper's case)", pid, nspid)
	}

	// The flavor's socket mount point, and the tmpfs below it.
	mountPoint := "/host/run/containerd"
	if in.opts.Flavor == bundle.FlavorOCP {
		mountPoint = "/host/run/crio"
	}
	top := mountOptions(t, pid, mountPoint)
	below := mountOptions(t, pid, mountPoint+"/"+filepath.Base(sub))
	rro := recursiveReadOnlySupported(ctx, t, env)
	t.Logf("%s (%s): runtime handler recursiveReadOnlyMounts=%v; in the container %s is %q, the mount below it %q",
		env.Runtime, env.RuntimeVersion, rro, mountPoint, top, below)
	if !strings.HasPrefix(top, "ro") {
		t.Errorf("%s is mounted %q in the agent's container, want ro", mountPoint, top)
	}
	switch {
	case below == "":
		t.Errorf("the tmpfs below %s is not in the agent's container", mountPoint)
	case rro && !strings.HasPrefix(below, "ro"):
		t.Errorf("the tmpfs below %s is %q in the agent's container: the runtime supports recursive read-only mounts, want ro", mountPoint, below)
	case !rro && !strings.HasPrefix(below, "rw"):
		t.Errorf("the tmpfs below %s is %q without recursive read-only support: this test's assumption is wrong", mountPoint, below)
	}

	// The image filesystem, mounted for the disk budget's statfs: read-only, and the budget is in
	// force (the agent, not root, reached the filesystem the runtime names), yet the agent's
	// credentials open no image content there. The host's directories are the container's
	// (a bind mount, same inodes), so setpriv with the agent's uid, gid and no groups or
	// capabilities tries what the agent could.
	storeMount := filepath.Join("/host", env.ImageFs)
	if got := mountOptions(t, pid, storeMount); !strings.HasPrefix(got, "ro") {
		t.Errorf("the image filesystem %s is mounted %q in the agent's container, want ro", storeMount, got)
	}
	if logs := in.logs(); strings.Contains(logs, "disk budget not in force") || !strings.Contains(logs, "pass finished") {
		t.Errorf("the agent's log does not show a pass under the disk budget:\n%s", logs)
	}
	var content []string
	_ = filepath.WalkDir(env.ImageFs, func(p string, de os.DirEntry, err error) error {
		if err == nil && de.Type().IsRegular() && len(content) < 20 {
			content = append(content, p)
		}
		return nil
	})
	if len(content) == 0 {
		t.Fatalf("no file under the image filesystem %s to try", env.ImageFs)
	}
	for _, f := range content {
		out, err := exec.Command("setpriv", "--reuid=65532", "--regid=0", "--clear-groups", "--inh-caps=-all",
			"--bounding-set=-all", "head", "-c", "1", f).CombinedOutput()
		if err == nil {
			t.Errorf("the agent's uid 65532, gid 0 reads %s of the image filesystem: want no image content readable", f)
		} else if !strings.Contains(string(out), "Permission denied") {
			t.Errorf("reading %s as the agent: %v (%s), want permission denied", f, err, out)
		}
	}
	t.Logf("image filesystem %s: mounted read-only, disk budget in force, %d of its files tried, none readable by the agent", env.ImageFs, len(content))
}

func mustStat(t *testing.T, path string) os.FileInfo {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi
}

// A credential plugin that leaves a child behind (a shell script's background job): the child
// is reparented to the agent, PID 1 of its container, and once it exits the agent reaps it: no
// zombie stays in the pod's PID namespace. The plugin is busybox's sh from a host directory
// mounted into the pod the way the credential-provider components mount the kubelet's plugins.
func TestPodReapsCredentialPluginOrphans(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 4*time.Minute)
	_, images := env.CRI(t)
	list := refs(t, env, "e2e/small:12")
	removeImages(ctx, t, images, list)

	dir := pluginDir(t, env.Registry)
	in := newInstance(t, env, "reaper", list)
	in.apply(in.withPluginDir(dir))
	in.waitLabel(ctx, "succeeded")
	agent := in.agentProcess(ctx)
	nsLink := func(pid int) string {
		l, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid))
		return l
	}
	ns := nsLink(agent)

	// The plugin's child, a `sleep 300` whose parent is now the agent.
	var orphan int
	err := wait.PollUntilContextCancel(ctx, 100*time.Millisecond, true, func(context.Context) (bool, error) {
		for _, p := range hostPIDs(t) {
			cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
			if procStatus(p, "PPid") == strconv.Itoa(agent) && bytes.HasSuffix(cmd, []byte("/busybox\x00sleep\x00300\x00")) {
				orphan = p
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("no orphan of the plugin under the agent (PID %d): %v\n%s", agent, err, in.diagnose())
	}
	t.Logf("the plugin's orphan: host PID %d, NSpid %s, parent the agent (host PID %d)", orphan, procStatus(orphan, "NSpid"), agent)
	if err := syscall.Kill(orphan, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Without a reaper it stays a zombie of the agent for as long as the pod lives.
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		return procStatus(orphan, "PPid") != strconv.Itoa(agent), nil
	})
	if err != nil {
		t.Fatalf("the plugin's orphan %d is still the agent's child, state %q: not reaped", orphan, procStatus(orphan, "State"))
	}
	for _, p := range hostPIDs(t) {
		if nsLink(p) == ns && strings.HasPrefix(procStatus(p, "State"), "Z") {
			t.Errorf("zombie in the agent's PID namespace: host PID %d (NSpid %s, parent %s)", p, procStatus(p, "NSpid"), procStatus(p, "PPid"))
		}
	}
	if got := procStatus(agent, "State"); strings.HasPrefix(got, "Z") || got == "" {
		t.Errorf("the agent itself is %q", got)
	}
}

// pluginDir writes a credential plugin and its CredentialProviderConfig for images of registry
// into a host directory the agent (uid 65532) can read, and returns the directory.
func pluginDir(t *testing.T, registry string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/var/tmp", "image-prefetcher-e2e-plugin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("busybox-static (the harness installs it): %v", err)
	}
	mounted := "/host" + dir
	files := map[string]string{
		"busybox": string(busybox),
		// A background job the shell does not wait for: when the shell exits, the job's parent
		// becomes the agent. The answer gives no credentials (the registry is anonymous) and
		// no cache, so every pull runs the plugin.
		"orphan-plugin": fmt.Sprintf(`#!%[1]s/busybox sh
%[1]s/busybox sleep 300 </dev/null >/dev/null 2>&1 &
%[1]s/busybox cat >/dev/null
echo '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","cacheDuration":"0s"}'
`, mounted),
		"config.yaml": fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
- name: orphan-plugin
  apiVersion: credentialprovider.kubelet.k8s.io/v1
  matchImages: [%q]
  defaultCacheDuration: 0s
`, registry),
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// withPluginDir builds the instance with dir mounted (read-only, as the credential-provider
// components do) and the agent's credential provider flags pointing into it.
func (in *instance) withPluginDir(dir string) []byte {
	in.t.Helper()
	root, err := bundle.Root()
	if err != nil {
		in.t.Fatal(err)
	}
	tmp := in.t.TempDir()
	e2e, err := deploy.Overlay(root, tmp, in.opts)
	if err != nil {
		in.t.Fatal(err)
	}
	mounted := "/host" + dir
	patch := fmt.Sprintf(`- op: add
  path: /spec/template/spec/volumes/-
  value: {name: e2e-plugin, hostPath: {path: %[1]q, type: Directory}}
- op: add
  path: /spec/template/spec/containers/0/volumeMounts/-
  value: {name: e2e-plugin, mountPath: %[2]q, readOnly: true, recursiveReadOnly: IfPossible}
- op: add
  path: /spec/template/spec/containers/0/args/-
  value: --image-credential-provider-config=%[2]s/config.yaml
- op: add
  path: /spec/template/spec/containers/0/args/-
  value: --image-credential-provider-bin-dir=%[2]s
`, dir, mounted)
	k := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- ../%s
patches:
- target: {group: apps, kind: DaemonSet, name: %s}
  patch: |-
%s`, filepath.Base(e2e), in.name(), indent(patch, "    "))
	pdir := filepath.Join(tmp, "plugin")
	if err := os.MkdirAll(pdir, 0o755); err != nil {
		in.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pdir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		in.t.Fatal(err)
	}
	out, err := bundle.Kustomize(pdir)
	if err != nil {
		in.t.Fatal(err)
	}
	return out
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = prefix + l
	}
	return strings.Join(lines, "\n") + "\n"
}
