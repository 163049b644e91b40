# shellcheck shell=bash disable=SC2153  # STATE, SOCK, PIDS, LOGS, PKI and the rest come from e2e/cluster.sh
# The container runtimes (containerd 2.x, containerd 1.6, CRI-O), their configuration and the CNI
# network; sourced by e2e/cluster.sh (and used by e2e/cluster/fleet.sh for every fleet node).

# runtime_bin: build (or find in the cache) the chosen runtime; prints its bin dir (empty for Debian's)
runtime_bin() {
  case $RUNTIME in
    containerd) "$ROOT/e2e/build-containerd.sh" "$CONTAINERD_VERSION" ;;
    cri-o) "$ROOT/e2e/build-crio.sh" "$CRIO_VERSION" ;;
    containerd-1.6) echo "" ;;
  esac
}

# cni_conflist <subnet>: the pod network of a node: a bridge in the node's network namespace, host-local
# addresses of <subnet> (state below the in-node path $STATE/cni), the bridge the pods' gateway (pods reach
# the other nodes' pods and the fleet gateway; no masquerading, so nothing beyond the harness's bridges)
cni_conflist() {
  cat <<EOF
{"cniVersion": "0.4.0", "name": "image-prefetcher-e2e", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$STATE/cni/ipam", "ranges": [[{"subnet": "$1"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
EOF
}

write_cni() {
  mkdir -p "$STATE/cni/net.d" "$STATE/cni/ipam"
  ln -sfn /usr/lib/cni "$STATE/cni/bin"
  cni_conflist "$POD_SUBNET" >"$STATE/cni/net.d/10-image-prefetcher-e2e.conflist"
  # the bridge exists before the first pod: its address is the node IP
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$NODE_IP/${POD_SUBNET#*/}" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
}

# containerd_config <file>: the config of the chosen containerd (format 2 for 1.6, format 3 for 2.x)
containerd_config() {
  local c=$STATE/containerd
  local common="root = \"$c/root\"
state = \"$c/state\"
# snapshotters the tests do not use (the v1 runtime must stay: the tasks service needs it)
disabled_plugins = [\"io.containerd.snapshotter.v1.aufs\", \"io.containerd.snapshotter.v1.btrfs\",
  \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\"]
[grpc]
  address = \"$SOCK\"
[ttrpc]
  address = \"$SOCK.ttrpc\""
  if [ "$RUNTIME" = containerd-1.6 ]; then
    local cri='plugins."io.containerd.grpc.v1.cri"'
    cat <<EOF
version = 2
$common
[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[$cri]
  # this VM has no CAP_SYS_RESOURCE: without this every pod sandbox fails
  # ("failed to update /proc/self/oom_score_adj: Permission denied")
  restrict_oom_score_adj = true
  # pod network namespaces under our state dir instead of /run/netns
  netns_mounts_under_state_dir = true
  sandbox_image = "$REGISTRY/e2e/pause:latest"
  [$cri.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [$cri.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [$cri.containerd.runtimes.runc.options]
        Root = "$STATE/runc"
  [$cri.cni]
    bin_dir = "$STATE/cni/bin"
    conf_dir = "$STATE/cni/net.d"
  [$cri.registry]
    config_path = "$c/certs.d"
EOF
  else
    # containerd 2.x: the CRI plugin is split into runtime and images plugins (config format 3)
    local rt="plugins.'io.containerd.cri.v1.runtime'" im="plugins.'io.containerd.cri.v1.images'"
    cat <<EOF
version = 3
$common
[$rt]
  # this VM has no CAP_SYS_RESOURCE: without this every pod sandbox fails
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [$rt.containerd]
    default_runtime_name = "runc"
    [$rt.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [$rt.containerd.runtimes.runc.options]
        Root = "$STATE/runc"
  [$rt.cni]
    bin_dirs = ["$STATE/cni/bin"]
    conf_dir = "$STATE/cni/net.d"
[$im]
  snapshotter = "overlayfs"
  [$im.pinned_images]
    sandbox = "$REGISTRY/e2e/pause:latest"
  [$im.registry]
    config_path = "$c/certs.d"
EOF
  fi
}

# small_image_fs: with IMAGE_PREFETCHER_E2E_IMAGE_FS_SIZE, the runtime's image store gets a filesystem of its
# own of that size (down unmounts it with the other mounts under the state dir and removes its file)
small_image_fs() {
  [ -n "$IMAGE_FS_SIZE" ] || return 0
  local img=$STATE/image-fs.img
  rm -f "$img"
  truncate -s "$IMAGE_FS_SIZE" "$img"
  mkfs.ext4 -q -F "$img" || die "mkfs.ext4 of the $IMAGE_FS_SIZE image filesystem failed"
  mkdir -p "$RUNTIME_ROOT"
  mount -o loop "$img" "$RUNTIME_ROOT" || die "mounting the $IMAGE_FS_SIZE image filesystem on $RUNTIME_ROOT failed"
  log "image store $RUNTIME_ROOT: an ext4 filesystem of $IMAGE_FS_SIZE of its own"
}

# containerd_hosts <containerd dir> [mirror]: how containerd reaches the registries: directly, or through
# the mirror host:port first (a fleet node reaches the registry at the fleet bridge's address)
containerd_hosts() {
  local r
  for r in $REGISTRY $AUTH_REGISTRY; do
    mkdir -p "$1/certs.d/$r"
    {
      printf 'server = "http://%s"\n' "$r"
      if [ -n "${2:-}" ] && [ "$r" = "$REGISTRY" ]; then
        printf '[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$2"
      fi
      printf '[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$r"
    } >"$1/certs.d/$r/hosts.toml"
  done
}

start_containerd() {
  local rbin=$1 c=$STATE/containerd
  mkdir -p "$c/certs.d/$REGISTRY" "$c/certs.d/$AUTH_REGISTRY" "$(dirname "$SOCK")"
  containerd_config >"$c/config.toml"
  containerd_hosts "$c"
  if [ -n "$rbin" ]; then
    # containerd finds its shim on PATH: ours first, not Debian's 1.6 shim
    start_bg containerd env PATH="$rbin:$PATH" "$rbin/containerd" --config "$c/config.toml"
  else
    start_bg containerd containerd --config "$c/config.toml"
  fi
}

start_crio() {
  local rbin=$1 c=$STATE/crio
  mkdir -p "$(dirname "$SOCK")"
  crio_hugetlb
  write_crio_config "$c" "$rbin"
  start_bg crio "$rbin/crio" --config "$c/crio.conf" --config-dir "$c/conf.d" --registries-conf "$c/registries.conf"
}

crio_hugetlb() {
  # CRI-O sets hugetlb limits whenever the kernel has the controller (/proc/cgroups), mounted or not; on a
  # cgroup v1 host that leaves it unmounted, runc then fails every container ("cannot set hugetlb limit").
  # Mount it as a node distribution would; down unmounts it again.
  if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && [ ! -d /sys/fs/cgroup/hugetlb ] &&
    awk '$1 == "hugetlb" && $2 == 0 && $4 == 1 {found=1} END {exit !found}' /proc/cgroups; then
    mkdir /sys/fs/cgroup/hugetlb
    mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
    echo "mounted /sys/fs/cgroup/hugetlb" >>"$STATE/host-before"
  fi
}

# write_crio_config <dir> <bin dir> [mirror]: CRI-O's configuration, written to <dir>; the paths in it are
# below $STATE/crio (a fleet node sees its own directory there)
write_crio_config() {
  local out=$1 rbin=$2 mirror=${3:-} c=$STATE/crio
  mkdir -p "$out/conf.d"
  # The harness' own policy and registries: accept any image, and the loopback registries over plain HTTP.
  echo '{"default": [{"type": "insecureAcceptAnything"}]}' >"$out/policy.json"
  cat >"$out/registries.conf" <<EOF
unqualified-search-registries = []
[[registry]]
location = "$REGISTRY"
insecure = true
$([ -n "$mirror" ] && printf '[[registry.mirror]]\nlocation = "%s"\ninsecure = true\n' "$mirror")
[[registry]]
location = "$AUTH_REGISTRY"
insecure = true
# any other loopback port too (the benchmark's and the fault tests' shaping proxies listen on random ones):
# containers/image matches a registry location as a prefix of "host:port"
[[registry]]
location = "127.0.0.1"
insecure = true
EOF
  cat >"$out/crio.conf" <<EOF
[crio]
root = "$c/storage"
runroot = "$c/run/storage"
storage_driver = "overlay"
log_dir = "$c/pod-logs"
version_file = "$c/run/version"
version_file_persist = "$c/version"
clean_shutdown_file = "$c/clean.shutdown"
[crio.api]
listen = "$SOCK"
stream_address = "127.0.0.1"
stream_port = "0"
[crio.runtime]
# Debian's crun 1.8.1 refuses the OCI spec version CRI-O 1.35 writes ("unknown version specified");
# Debian's runc runs it.
default_runtime = "runc"
cgroup_manager = "cgroupfs"
conmon_cgroup = "pod"
pinns_path = "$rbin/pinns"
namespaces_dir = "$c/run/ns"
container_exits_dir = "$c/run/exits"
container_attach_socket_dir = "$c/run/attach"
hooks_dir = []
[crio.runtime.runtimes.runc]
runtime_path = "$(command -v runc)"
runtime_root = "$c/run/runc"
monitor_path = "$(command -v conmon)"
[crio.image]
pause_image = "$REGISTRY/e2e/pause:latest"
# empty: run the pause image's own command (ours is busybox sleep, not /pause)
pause_command = ""
signature_policy = "$c/policy.json"
[crio.network]
network_dir = "$STATE/cni/net.d"
plugin_dirs = ["$STATE/cni/bin"]
EOF
}

start_runtime() {
  local rbin=$1
  write_cni
  case $RUNTIME in
    cri-o) start_crio "$rbin" ;;
    *) start_containerd "$rbin" ;;
  esac
  wait_for 60 "$RUNTIME on $SOCK" "$RUNTIME_PROC" "$BIN/crireset" --probe --timeout 2s --socket "$SOCK"
  log "runtime: $("$BIN/crireset" --probe --socket "$SOCK")"
}
