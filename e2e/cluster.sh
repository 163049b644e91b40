#!/usr/bin/env bash
# The project's e2e environment: real components on this machine, no Docker. Needs root on Linux.
#
#   e2e/cluster.sh up [runtime|full]   # default full. runtime = the container runtime + CNI + two registries +
#                                      # test images; full = runtime + etcd + kube-apiserver +
#                                      # kube-controller-manager + kube-scheduler + kubelet (one Ready node)
#   e2e/cluster.sh down                # stop everything by recorded PID; leave no process, mount, bridge, cgroup
#   e2e/cluster.sh status              # what runs, and what is left behind
#   e2e/cluster.sh env                 # print the env file (source it, or let e2e/clusterenv read it)
#   e2e/cluster.sh push-agent-image    # build + push the agent image to the local registry (make image-push)
#   e2e/cluster.sh stop-component NAME   # stop one running component by its recorded PID (fault tests)
#   e2e/cluster.sh start-component NAME  # start it again with the command line it had, wait until it answers
#   e2e/cluster.sh add-node NAME RUNTIME [TAINTS]  # one more node (own network and mount namespace, runtime,
#                                      # kubelet; registers with TAINTS, e.g. key=:NoSchedule); Ready on return
#   e2e/cluster.sh kill-node NAME      # SIGKILL that node's kubelet, runtime and containers, remove its namespaces
#   e2e/cluster.sh shape-node NAME MBIT  # cap what the node's link delivers to it (0: no cap)
#   e2e/cluster.sh node-registry NAME block|allow  # refuse (or allow again) the node's connections to the registry
#   e2e/cluster.sh fleet-registry plain|mirror [UPSTREAM]  # the nodes' registry: the plain one's storage, or
#                                      # an empty pull-through cache of it (or of UPSTREAM, host:port, in front of it)
#
# Settings (environment): IMAGE_PREFETCHER_E2E_STATE (default /var/tmp/image-prefetcher-e2e),
# IMAGE_PREFETCHER_E2E_RUNTIME (containerd = containerd 2.x, the default | containerd-1.6 = Debian's | cri-o),
# K8S_VERSION (default v1.37.2), CONTAINERD_VERSION (default v2.2.1), CRIO_VERSION (default v1.35.2),
# IMAGE_PREFETCHER_E2E_AGENT_IMAGE (auto|1|0, see push_agent_image),
# IMAGE_PREFETCHER_E2E_REUSE=1 (keep a healthy environment instead of starting a fresh one),
# IMAGE_PREFETCHER_E2E_NODE_TAINTS (kubelet --register-with-taints: the node registers tainted, as a new node
# of a gated pool does), IMAGE_PREFETCHER_E2E_IMAGE_GC=1 (the kubelet's image GC collects every unused image
# that is not pinned, at the kubelet's start and every 5 minutes; unset: image GC off),
# IMAGE_PREFETCHER_E2E_IMAGE_FS_SIZE (e.g. 160M: the runtime's image store is an ext4 filesystem of its own of
# that size on a loop device, as on a node with a small image filesystem; unset: the state dir's filesystem),
# IMAGE_PREFETCHER_E2E_FLEET (e.g. "cri-o containerd-1.6": full mode adds one node per runtime named, e2e-node-2,
# e2e-node-3, ...; see e2e/cluster/fleet.sh).
# Everything it starts is recorded as "PID STARTTIME" under $STATE/pids and stopped only by that record.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${IMAGE_PREFETCHER_E2E_STATE:-/var/tmp/image-prefetcher-e2e}
K8S_VERSION=${K8S_VERSION:-v1.37.2}
NODE_NAME=${IMAGE_PREFETCHER_E2E_NODE_NAME:-e2e-node}
NODE_TAINTS=${IMAGE_PREFETCHER_E2E_NODE_TAINTS:-}
IMAGE_GC=${IMAGE_PREFETCHER_E2E_IMAGE_GC:-}
IMAGE_FS_SIZE=${IMAGE_PREFETCHER_E2E_IMAGE_FS_SIZE:-}
AGENT_IMAGE_MODE=${IMAGE_PREFETCHER_E2E_AGENT_IMAGE:-auto}
REGISTRY=127.0.0.1:5000
AUTH_REGISTRY=127.0.0.1:5001
AUTH_USER=e2e
# The CNI bridge; its gateway address doubles as the node IP (the kubelet refuses a loopback node IP).
BRIDGE=ipfe2e0
POD_SUBNET=${IMAGE_PREFETCHER_E2E_POD_SUBNET:-10.88.0.0/24}
NODE_IP=${POD_SUBNET%.*}.1
PORTS=(5000 5001 2379 2380 6443 10250 10257 10259 10248)

PIDS=$STATE/pids LOGS=$STATE/logs BIN=$STATE/bin PKI=$STATE/pki
# The runtime of a running environment is the one it was started with (recorded by up); otherwise the
# caller's choice. Its socket lies where it would on a real node, below a host root of our own: the agent's
# socket detection (--host-root) and the DaemonSet's host mount then see the node's real layout.
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.2.1}
CRIO_VERSION=${CRIO_VERSION:-v1.35.2}
HOSTROOT=$STATE/host
use_runtime() { # use_runtime <name>: RUNTIME, its process name, its socket, its store and image filesystem
  RUNTIME=$1
  case $RUNTIME in
    containerd | containerd-1.6) SOCK=$HOSTROOT/run/containerd/containerd.sock RUNTIME_PROC=containerd RUNTIME_ROOT=$STATE/containerd/root
      IMAGE_FS=$RUNTIME_ROOT/io.containerd.snapshotter.v1.overlayfs ;;
    cri-o) SOCK=$HOSTROOT/run/crio/crio.sock RUNTIME_PROC=crio RUNTIME_ROOT=$STATE/crio/storage IMAGE_FS=$RUNTIME_ROOT/overlay-images ;;
    *) echo "IMAGE_PREFETCHER_E2E_RUNTIME=$RUNTIME: must be containerd (2.x), containerd-1.6 or cri-o" >&2; exit 2 ;;
  esac
}
WANT_RUNTIME=${IMAGE_PREFETCHER_E2E_RUNTIME:-containerd}
use_runtime "$WANT_RUNTIME"
[ -f "$STATE/runtime" ] && use_runtime "$(cat "$STATE/runtime")"
KUBECONFIG_ADMIN=$STATE/admin.kubeconfig
FLEET=${IMAGE_PREFETCHER_E2E_FLEET:-}
# shellcheck source=e2e/cluster/fleet.sh
. "$ROOT/e2e/cluster/fleet.sh"
ENV_FILE=$STATE/env.sh
# Host paths that containerd 1.6, libcni and the kubelet create whatever their flags say. `up` records which
# of them existed before; `down` removes only the ones it created.
HOST_PATHS=(/run/containerd /var/lib/kubelet /var/log/containers /var/log/pods /var/lib/cni /run/netns /etc/cni /opt/cni /run/nri)
# Kernel settings the kubelet (and the CNI bridge) change; restored on down.
SYSCTLS=(vm/overcommit_memory kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/ip_forward)

export GOFLAGS=${GOFLAGS:--buildvcs=false}
[ -x /usr/local/go/bin/go ] && PATH=$PATH:/usr/local/go/bin
T_START=$SECONDS

log() { echo "[$(date +%T) +$((SECONDS - T_START))s] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- processes, by recorded PID only
# starttime <pid>: the process' start time in clock ticks; empty when it is gone or a zombie
starttime() { sed -n 's/^.*) \([^Z]\) .*$/&/p' "/proc/$1/stat" 2>/dev/null | sed 's/^.*) //' | cut -d' ' -f20; }

# alive <name>: the recorded PID runs and is the same process (same start time), not a reused PID
alive() {
  local f=$PIDS/$1.pid pid st
  [ -f "$f" ] || return 1
  read -r pid st <"$f" || return 1
  [ -n "$pid" ] && [ "$(starttime "$pid")" = "$st" ]
}

start_bg() { # start_bg <name> <cmd...>
  local name=$1; shift
  mkdir -p "$PIDS" "$LOGS"
  # Only stdin, stdout and stderr reach the component: a lock the caller holds (the harness' own on fd
  # 9, or a `flock FILE cmd` around a test run) must not be inherited by what outlives the caller.
  (
    for fd in "/proc/$BASHPID/fd"/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null
    done
    exec nohup "$@" >"$LOGS/$name.log" 2>&1 </dev/null
  ) &
  local pid=$!
  echo "$pid $(starttime $pid)" >"$PIDS/$name.pid"
  # the command line, so that start-component can start exactly this process again
  printf '%q ' "$@" >"$PIDS/$name.cmd"
}

stop_many() { # stop_many <name...>: SIGTERM all, wait up to 10 s for all, then SIGKILL the rest
  local name pid st waiting
  for name in "$@"; do
    alive "$name" || continue
    read -r pid st <"$PIDS/$name.pid"
    kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 100); do
    waiting=0
    for name in "$@"; do alive "$name" && waiting=1; done
    [ $waiting = 0 ] && break
    sleep 0.1
  done
  for name in "$@"; do
    if alive "$name"; then
      read -r pid st <"$PIDS/$name.pid"
      log "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    rm -f "$PIDS/$name.pid"
  done
}

wait_for() { # wait_for <secs> <what> <log name|-> <cmd...>
  local t=$1 what=$2 name=$3; shift 3
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if [ "$name" != - ] && ! alive "$name"; then
      tail -n 30 "$LOGS/$name.log" >&2 || true
      die "$name exited while waiting for $what (log: $LOGS/$name.log)"
    fi
    if [ $SECONDS -ge $end ]; then
      [ "$name" != - ] && tail -n 30 "$LOGS/$name.log" >&2
      die "timeout after ${t}s waiting for $what${name:+ (log: $LOGS/$name.log)}"
    fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------- installing what is missing
need_root() { [ "$(id -u)" = 0 ] || die "needs root (containerd, mounts, cgroups, bridge); run with sudo"; }

install_packages() {
  local missing=() pair cmd pkg
  for pair in containerd:containerd ctr:containerd runc:runc docker-registry:docker-registry etcd:etcd-server \
    htpasswd:apache2-utils /usr/lib/cni/bridge:containernetworking-plugins /usr/lib/cni/host-local:containernetworking-plugins \
    ip:iproute2 ss:iproute2 openssl:openssl curl:curl make:make gcc:gcc socat:socat; do
    cmd=${pair%%:*} pkg=${pair#*:}
    if [[ $cmd == /* ]]; then [ -x "$cmd" ] && continue; else command -v "$cmd" >/dev/null && continue; fi
    missing+=("$pkg")
  done
  # the runnable test images need a static busybox (Debian's busybox package is dynamically linked)
  if ! [ -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi
  # CRI-O is built here with cgo (seccomp, gpgme) and runs containers through conmon and runc
  if [ "$RUNTIME" = cri-o ]; then
    for pair in conmon:conmon pkg-config:pkg-config; do
      command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    for pkg in libseccomp-dev libgpgme-dev; do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    local pkgs
    mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    # On a systemd machine the packages start their own services, which would hold our ports (5000, 2379)
    # or a second containerd: stop the ones this install just brought in.
    if [ -d /run/systemd/system ]; then
      for pkg in docker-registry etcd-server containerd; do
        printf '%s\n' "${missing[@]}" | grep -qx "$pkg" || continue
        local svc=${pkg%-server}
        log "stopping and disabling the $svc service the package started (the harness runs its own)"
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
      done
    fi
  fi
  command -v go >/dev/null || die "Go is not installed (need Go >= the version in go.mod, e.g. /usr/local/go)"
}

build_tools() {
  mkdir -p "$BIN"
  log "building the harness' Go programs (testimages, crireset)"
  (cd "$ROOT" && go build -o "$BIN/" ./e2e/cmd/testimages ./e2e/cmd/crireset)
}

# ---------------------------------------------------------------- host state we must give back
record_host() {
  mkdir -p "$STATE"
  [ -f "$STATE/host-before" ] && return 0 # keep the first record until down restores it
  {
    for p in "${HOST_PATHS[@]}"; do [ -e "$p" ] && echo "path $p"; done
    for s in "${SYSCTLS[@]}"; do echo "sysctl $s $(cat "/proc/sys/$s")"; done
    for ipt in iptables ip6tables; do
      command -v $ipt >/dev/null || continue
      for t in filter nat mangle; do
        $ipt -t $t -S 2>/dev/null | awk -v t="$ipt/$t" '$1=="-N"{print "chain " t " " $2}'
      done
    done
  } >"$STATE/host-before"
}

restore_host() {
  local f=$STATE/host-before
  [ -f "$f" ] || return 0
  local t c p
  while read -r kind a b; do
    if [ "$kind" = sysctl ]; then echo "$b" >"/proc/sys/$a" 2>/dev/null || true; fi
  done <"$f"
  # iptables chains the kubelet creates (KUBE-FIREWALL, canaries, hints) and the rules jumping to them:
  # remove those that were not there before
  local ipt rule
  for ipt in iptables ip6tables; do
    command -v $ipt >/dev/null || continue
    for t in filter nat mangle; do
      for c in $($ipt -t $t -S 2>/dev/null | awk '$1=="-N"{print $2}'); do
        grep -qx "chain $ipt/$t $c" "$f" && continue
        case $c in KUBE-*) ;; *) continue ;; esac
        { $ipt -t $t -S 2>/dev/null | grep -E -- "-j $c( |\$)" | grep -v "^-A $c " || true; } | while read -r rule; do
          eval "$ipt -t $t ${rule/#-A/-D}" 2>/dev/null || true
        done
        $ipt -t $t -F "$c" 2>/dev/null || true
        $ipt -t $t -X "$c" 2>/dev/null || true
      done
    done
  done
  if grep -qx "mounted /sys/fs/cgroup/hugetlb" "$f"; then
    umount /sys/fs/cgroup/hugetlb 2>/dev/null && rmdir /sys/fs/cgroup/hugetlb
  fi
  for p in "${HOST_PATHS[@]}"; do
    grep -qx "path $p" "$f" && continue
    [ -e "$p" ] || continue
    if grep -q " ${p}[/ ]" /proc/mounts; then log "not removing $p: something is mounted below it"; continue; fi
    rm -rf --one-file-system "$p"
  done
  rm -f "$f"
}

# ---------------------------------------------------------------- registries and test images
start_registries() {
  local r=$STATE/registry
  mkdir -p "$r/data" "$r/data-auth"
  if [ ! -s "$r/password" ]; then
    (umask 077; openssl rand -hex 16 >"$r/password")
  fi
  htpasswd -Bbn "$AUTH_USER" "$(cat "$r/password")" >"$r/htpasswd"
  (umask 077; printf '{"auths":{"%s":{"auth":"%s"}}}\n' "$AUTH_REGISTRY" \
    "$(printf '%s:%s' "$AUTH_USER" "$(cat "$r/password")" | base64 -w0)" >"$r/auth-dockerconfig.json")
  for name in registry registry-auth; do
    # the plain registry's access log counts what it serves (a fleet's mirror fetches from it)
    local addr=$REGISTRY data=$r/data auth="" nolog=false
    if [ $name = registry-auth ]; then
      addr=$AUTH_REGISTRY data=$r/data-auth nolog=true
      auth="auth: {htpasswd: {realm: image-prefetcher-e2e, path: $r/htpasswd}}"
    fi
    cat >"$r/$name.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: $nolog}}
storage: {filesystem: {rootdirectory: $data}, delete: {enabled: true}}
http: {addr: $addr}
$auth
EOF
    start_bg $name docker-registry serve "$r/$name.yml"
  done
  wait_for 20 "registry on $REGISTRY" registry curl -sf "http://$REGISTRY/v2/"
  # 401 is the healthy answer of the auth registry to an anonymous request
  wait_for 20 "registry on $AUTH_REGISTRY" registry-auth sh -c "curl -s -o /dev/null -w '%{http_code}' http://$AUTH_REGISTRY/v2/ | grep -qx 401"
}

push_test_images() {
  log "pushing test images (deterministic; unchanged ones are skipped)"
  "$BIN/testimages" --registry "$REGISTRY" --auth-registry "$AUTH_REGISTRY" --auth-user "$AUTH_USER" \
    --auth-password-file "$STATE/registry/password" --out "$STATE/images.json"
}

# ---------------------------------------------------------------- the container runtime + CNI
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

# ---------------------------------------------------------------- Kubernetes
cert() { # cert <name> <subject> <extfile>: a key and a certificate signed by the CA, in the current directory
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile "$3" -extensions ext -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}

gen_pki() {
  # kept while the CA is valid for a day and the API server's certificate names the fleet gateway too
  if [ -f "$PKI/ca.crt" ] && openssl x509 -checkend 86400 -noout -in "$PKI/ca.crt" >/dev/null 2>&1 &&
    openssl x509 -noout -ext subjectAltName -in "$PKI/apiserver.crt" 2>/dev/null | grep -q "IP Address:$FLEET_GW\b"; then
    return 0
  fi
  log "generating PKI"
  rm -rf "$PKI"; mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -subj /CN=image-prefetcher-e2e-ca -days 365 -out ca.crt 2>/dev/null
    printf '[ext]\nsubjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.0.0.1,IP:%s\nextendedKeyUsage=serverAuth\n' "$FLEET_GW" >server.cnf
    printf '[ext]\nextendedKeyUsage=clientAuth\n' >client.cnf
    cert apiserver /CN=kube-apiserver server.cnf
    cert admin "/O=system:masters/CN=e2e-admin" client.cnf
    cert node "/O=system:nodes/CN=system:node:$NODE_NAME" client.cnf
    cert controller-manager "/CN=system:kube-controller-manager" client.cnf
    cert scheduler "/CN=system:kube-scheduler" client.cnf
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

kubeconfig() { # kubeconfig <file> <cert name> [server]
  (umask 077; cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: image-prefetcher-e2e
  cluster:
    server: ${3:-https://127.0.0.1:6443}
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$2.crt")
    client-key-data: $(base64 -w0 "$PKI/$2.key")
contexts:
- name: image-prefetcher-e2e
  context: {cluster: image-prefetcher-e2e, user: $2}
current-context: image-prefetcher-e2e
EOF
  )
}

api_get() { # api_get <path>: GET as admin
  curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "https://127.0.0.1:6443$1"
}

start_control_plane() {
  local kb=$1
  kubeconfig "$KUBECONFIG_ADMIN" admin
  kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
  kubeconfig "$STATE/scheduler.kubeconfig" scheduler
  kubeconfig "$STATE/node.kubeconfig" node
  start_bg etcd etcd --name image-prefetcher-e2e --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster image-prefetcher-e2e=http://127.0.0.1:2380 --unsafe-no-fsync
  wait_for 20 "etcd" etcd curl -sf http://127.0.0.1:2379/health
  # --endpoint-reconciler-type=none: the apiserver may then advertise 127.0.0.1.
  # The kubelet is reached on its InternalIP (the bridge address) with the admin client cert, so that
  # `kubectl logs` and exec work without node DNS.
  start_bg kube-apiserver "$kb/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=127.0.0.1 --secure-port=6443 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" --client-ca-file="$PKI/ca.crt" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true --cert-dir="$STATE/apiserver-certs" \
    --kubelet-client-certificate="$PKI/admin.crt" --kubelet-client-key="$PKI/admin.key" \
    --kubelet-preferred-address-types=InternalIP
  wait_for 90 "kube-apiserver /readyz" kube-apiserver sh -c "curl -sf --cacert '$PKI/ca.crt' https://127.0.0.1:6443/readyz | grep -qx ok"
  start_bg kube-scheduler "$kb/kube-scheduler" --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1
  # without the controller-manager: no default ServiceAccount, no DaemonSet pods
  start_bg kube-controller-manager "$kb/kube-controller-manager" --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" --use-service-account-credentials=true \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --controllers="$(controllers "$kb")"
}

# controllers <bin dir>: every controller but the node IPAM and the cloud ones (this node has no
# cloud); Kubernetes 1.37 dropped the cloud controllers from kube-controller-manager, and naming
# an unknown one is an error, so only those the binary knows are switched off.
controllers() {
  local c list='*,-nodeipam' help
  help=$("$1/kube-controller-manager" --help 2>&1 | tr -d '\n' || true)
  for c in cloud-node-lifecycle service-lb-controller node-route-controller; do
    case $help in *"$c"*) list="$list,-$c" ;; esac
  done
  echo "$list"
}

# kubelet_config <node IP> [cgroup root]: the kubelet's configuration; paths below the in-node $STATE/kubelet
kubelet_config() {
  local k=$STATE/kubelet
  cat <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $1
${2:+cgroupRoot: $2}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}, x509: {clientCAFile: $PKI/ca.crt}}
authorization: {mode: AlwaysAllow}
# this VM is cgroup v1, which kubelets >= 1.35 refuse unless told otherwise
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$SOCK
failSwapOn: false
podLogsDir: $k/pod-logs
resolvConf: /etc/resolv.conf
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"}
$(if [ "$IMAGE_GC" = 1 ]; then cat <<'GC'
# IMAGE_PREFETCHER_E2E_IMAGE_GC=1: any disk usage is over the threshold and no image is too young, so every
# GC run (at the kubelet's start, then every 5 minutes) removes every image that no container uses and the
# runtime does not report pinned
imageGCHighThresholdPercent: 1
imageGCLowThresholdPercent: 0
imageMinimumGCAge: 0s
GC
else cat <<'GC'
# image GC would remove prefetched images behind the tests' backs: off
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
GC
fi)
serializeImagePulls: false
rotateCertificates: false
EOF
}

start_kubelet() {
  local kb=$1 k=$STATE/kubelet
  mkdir -p "$k/root" "$k/pki" "$k/pod-logs"
  kubelet_config "$NODE_IP" >"$k/config.yaml"
  start_bg kubelet "$kb/kubelet" --config="$k/config.yaml" --kubeconfig="$STATE/node.kubeconfig" \
    --root-dir="$k/root" --cert-dir="$k/pki" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    ${NODE_TAINTS:+--register-with-taints="$NODE_TAINTS"}
  wait_for 90 "node $NODE_NAME Ready" kubelet sh -c \
    "$(declare -f api_get); PKI='$PKI'; api_get /api/v1/nodes/$NODE_NAME | tr -d ' \n' | grep -q '\"type\":\"Ready\",\"status\":\"True\"'"
  # pods need the default ServiceAccount, which the controller-manager creates
  wait_for 60 "default ServiceAccount" kube-controller-manager sh -c \
    "$(declare -f api_get); PKI='$PKI'; api_get /api/v1/namespaces/default/serviceaccounts/default"
}

# ---------------------------------------------------------------- the agent image (built by the bundle's builder)
# Hook for the agent's OCI image: the bundle's Makefile target `image-push` builds it without Docker and pushes
# it to the given registry. IMAGE_PREFETCHER_E2E_AGENT_IMAGE: auto = push when the target exists (default),
# 1 = required (fail if it cannot), 0 = skip. Also callable alone: `e2e/cluster.sh push-agent-image`.
push_agent_image() {
  case $AGENT_IMAGE_MODE in 0) return 0 ;; esac
  if ! make -C "$ROOT" -n image-push REGISTRY="$REGISTRY" >/dev/null 2>&1; then
    [ "$AGENT_IMAGE_MODE" = 1 ] && die "no 'make image-push' target in $ROOT/Makefile to build the agent image"
    log "no 'make image-push' target yet: agent image not pushed"
    return 0
  fi
  # The nodes here are all of the host's architecture: the other platforms of a release build
  # would only cost compile time (build/ociimage's tests cover a multi-platform index).
  local platform
  platform="linux/$(go env GOARCH)"
  log "building and pushing the agent image: make image-push REGISTRY=$REGISTRY PLATFORMS=$platform"
  make -C "$ROOT" image-push REGISTRY="$REGISTRY" PLATFORMS="$platform" >"$LOGS/agent-image.log" 2>&1 ||
    { tail -n 30 "$LOGS/agent-image.log" >&2; die "make image-push failed (log: $LOGS/agent-image.log)"; }
  # the builder prints the pushed digest reference last; tests deploy exactly that
  grep -E "^$REGISTRY/[^ ]+@sha256:[0-9a-f]{64}\$" "$LOGS/agent-image.log" | tail -n 1 >"$STATE/agent-image-pushed" || true
  [ -s "$STATE/agent-image-pushed" ] || log "make image-push did not print a $REGISTRY/...@sha256: reference; IMAGE_PREFETCHER_E2E_AGENT_IMAGE stays empty"
}

# ---------------------------------------------------------------- env file
write_env() {
  local mode=$1 kbin=${2:-}
  {
    echo "# image-prefetcher e2e environment ($mode), written by e2e/cluster.sh up at $(date -Is)"
    echo "export IMAGE_PREFETCHER_E2E_MODE='$mode'"
    echo "export IMAGE_PREFETCHER_E2E_STATE='$STATE'"
    echo "export IMAGE_PREFETCHER_E2E_RUNTIME='$RUNTIME'"
    echo "export IMAGE_PREFETCHER_E2E_RUNTIME_VERSION='$("$BIN/crireset" --probe --socket "$SOCK" 2>/dev/null | cut -d' ' -f2)'"
    echo "export IMAGE_PREFETCHER_E2E_HOST_ROOT='$HOSTROOT'"
    echo "export IMAGE_PREFETCHER_E2E_CRI_SOCKET='$SOCK'"
    echo "export IMAGE_PREFETCHER_E2E_IMAGE_FS='$IMAGE_FS'"
    echo "export IMAGE_PREFETCHER_E2E_IMAGE_FS_SIZE='$IMAGE_FS_SIZE'"
    echo "export IMAGE_PREFETCHER_E2E_CRI_ENDPOINT='unix://$SOCK'"
    echo "export IMAGE_PREFETCHER_E2E_CONTAINERD_NAMESPACE='k8s.io'"
    echo "export IMAGE_PREFETCHER_E2E_REGISTRY='$REGISTRY'"
    echo "export IMAGE_PREFETCHER_E2E_REGISTRY_LOG='$LOGS/registry.log'"
    echo "export IMAGE_PREFETCHER_E2E_AUTH_REGISTRY='$AUTH_REGISTRY'"
    echo "export IMAGE_PREFETCHER_E2E_AUTH_USER='$AUTH_USER'"
    echo "export IMAGE_PREFETCHER_E2E_AUTH_PASSWORD_FILE='$STATE/registry/password'"
    echo "export IMAGE_PREFETCHER_E2E_AUTH_DOCKERCONFIG='$STATE/registry/auth-dockerconfig.json'"
    echo "export IMAGE_PREFETCHER_E2E_IMAGES='$STATE/images.json'"
    if [ "$mode" = full ]; then
      echo "export KUBECONFIG='$KUBECONFIG_ADMIN'"
      echo "export IMAGE_PREFETCHER_E2E_KUBECONFIG='$KUBECONFIG_ADMIN'"
      echo "export IMAGE_PREFETCHER_E2E_APISERVER='https://127.0.0.1:6443'"
      echo "export IMAGE_PREFETCHER_E2E_NODE_NAME='$NODE_NAME'"
      echo "export IMAGE_PREFETCHER_E2E_NODE_IP='$NODE_IP'"
      echo "export IMAGE_PREFETCHER_E2E_NODE_TAINTS='$NODE_TAINTS'"
      echo "export IMAGE_PREFETCHER_E2E_IMAGE_GC='$IMAGE_GC'"
      echo "export IMAGE_PREFETCHER_E2E_POD_LOGS_DIR='$STATE/kubelet/pod-logs'"
      echo "export IMAGE_PREFETCHER_E2E_KUBE_VERSION='$K8S_VERSION'"
      echo "export IMAGE_PREFETCHER_E2E_KUBE_BIN='$kbin'"
      echo "export IMAGE_PREFETCHER_E2E_AGENT_IMAGE_PUSHED='$([ -f "$STATE/agent-image-pushed" ] && echo 1 || echo 0)'"
      echo "export IMAGE_PREFETCHER_E2E_AGENT_IMAGE='$(cat "$STATE/agent-image-pushed" 2>/dev/null || true)'"
      echo "export IMAGE_PREFETCHER_E2E_FLEET='$FLEET'"
      fleet_env
    fi
  } >"$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

# ---------------------------------------------------------------- commands
up() {
  local mode=${1:-full}
  case $mode in runtime | full) ;; *) die "unknown mode '$mode' (runtime|full)" ;; esac
  need_root
  [ "$(uname -s)" = Linux ] || die "needs Linux"
  if [ -d "$STATE" ]; then
    local stale=()
    for f in "$PIDS"/*.pid; do [ -f "$f" ] && alive "$(basename "$f" .pid)" && stale+=("$(basename "$f" .pid)"); done
    [ ${#stale[@]} -gt 0 ] && log "stale environment from an earlier run (${stale[*]} still running): stopping it by its recorded PIDs"
    down quiet || die "could not clean up the earlier environment; see above"
  fi
  use_runtime "$WANT_RUNTIME"
  local p busy
  for p in "${PORTS[@]}"; do
    busy=$(ss -Hltnp "sport = :$p" 2>/dev/null || true)
    [ -z "$busy" ] || die "port $p is in use by a process this harness did not start: $busy"
  done
  install_packages
  local kbin="" rbin
  rbin=$(runtime_bin) || die "building the $RUNTIME runtime failed"
  if [ "$mode" = full ]; then
    kbin=$(K8S_VERSION=$K8S_VERSION "$ROOT/e2e/build-kubernetes.sh") || die "building Kubernetes $K8S_VERSION failed"
  fi
  record_host
  mkdir -p "$STATE"
  echo "$mode" >"$STATE/mode"
  echo "$RUNTIME" >"$STATE/runtime"
  # a fresh node and cluster every time; registry content (deterministic) and PKI are kept
  rm -rf --one-file-system "$STATE/containerd/root" "$STATE/containerd/state" "$STATE/runc" "$STATE/etcd" \
    "$STATE/crio" "$HOSTROOT" \
    "$STATE/kubelet" "$STATE/cni/ipam" "$STATE/agent-image-pushed" "$STATE/apiserver-certs"
  build_tools
  start_registries
  push_test_images
  small_image_fs
  start_runtime "$rbin"
  if [ "$mode" = full ]; then
    gen_pki
    start_control_plane "$kbin"
    start_kubelet "$kbin"
    local i=2 rt
    for rt in $FLEET; do add_node "e2e-node-$i" "$rt"; i=$((i + 1)); done
    push_agent_image
  fi
  write_env "$mode" "$kbin"
  log "environment ($mode) up in $((SECONDS - T_START))s; env file: $ENV_FILE  (e2e/cluster.sh env)"
}

# leftovers: print everything of ours still on the machine; exit status 1 when anything is
leftovers() {
  local found=0 f n
  for f in "$PIDS"/*.pid; do
    [ -f "$f" ] || continue
    n=$(basename "$f" .pid)
    alive "$n" && { echo "process: $n (pid $(cut -d' ' -f1 "$f"))"; found=1; }
  done
  # processes naming our state dir (e.g. containerd shims, which carry our socket path)
  local cmd
  while read -r f; do
    n=${f#/proc/}; n=${n%/cmdline}
    cmd=$(tr '\0' ' ' 2>/dev/null <"$f") || continue
    case $cmd in "" | *cluster.sh* | grep\ *) continue ;; esac
    echo "process: $(echo "$cmd" | cut -c1-120) (pid $n)"; found=1
  done < <(grep -lsF -- "$STATE/" /proc/[0-9]*/cmdline)
  while read -r _ mnt fstype _; do
    case $mnt in "$STATE"/* | /run/containerd/* | /run/netns/cni-*) echo "mount: $mnt ($fstype)"; found=1 ;; esac
  done </proc/mounts
  ip link show "$BRIDGE" >/dev/null 2>&1 && { echo "bridge: $BRIDGE"; found=1; }
  for f in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/kubepods.slice; do
    [ -d "$f" ] && { echo "cgroup: $f"; found=1; }
  done
  fleet_leftovers || found=1
  return $found
}

down() {
  local quiet=${1:-}
  [ -d "$STATE" ] || { [ -n "$quiet" ] || log "nothing to stop ($STATE does not exist)"; return 0; }
  # 1) the cluster first, so nothing recreates pods, then the kubelet
  stop_many kube-controller-manager kube-scheduler kubelet
  fleet_down
  # 2) every pod sandbox through CRI, so containerd itself removes netns, CNI state, shm and rootfs mounts.
  #    After a crash containerd may be gone while its shims and mounts live on: start it again to clean up.
  local rstate=$STATE/containerd/state
  [ "$RUNTIME" = cri-o ] && rstate=$STATE/crio/run
  if [ -f "$PIDS/$RUNTIME_PROC.cmd" ] && [ -d "$rstate" ]; then
    if ! alive "$RUNTIME_PROC"; then
      eval "start_bg $RUNTIME_PROC $(cat "$PIDS/$RUNTIME_PROC.cmd")"
      wait_for 30 "$RUNTIME (for cleanup)" "$RUNTIME_PROC" "$BIN/crireset" --probe --timeout 2s --socket "$SOCK"
    fi
    if [ -x "$BIN/crireset" ]; then
      "$BIN/crireset" --socket "$SOCK" || log "crireset failed; continuing"
    fi
  fi
  # 3) the rest, by recorded PID
  stop_many "$RUNTIME_PROC" kube-apiserver registry-auth registry
  stop_many etcd
  # 4) mounts left under our dirs (kubelet volume tmpfs, anything containerd did not get to), deepest first
  local mnt
  while read -r mnt; do
    umount "$mnt" 2>/dev/null || umount -l "$mnt" || true
  done < <(awk -v s="$STATE/" 'index($2, s) == 1 {print $2}' /proc/mounts | sort -r)
  ip link del "$BRIDGE" 2>/dev/null || true
  grep -q " $RUNTIME_ROOT " /proc/mounts || rm -f "$STATE/image-fs.img"
  # containerd's runtime state (shim bundles, sandboxes) is meaningless once it is down and nothing is
  # mounted below it; removing it keeps a second down from restarting containerd for nothing
  if ! grep -q " $rstate/" /proc/mounts; then rm -rf --one-file-system "$rstate"; fi
  # CRI-O's overlay storage stays mounted on its root after shutdown; image content is not kept between runs
  if [ -d "$STATE/crio/storage" ]; then
    while read -r mnt; do umount "$mnt" 2>/dev/null || true; done < <(awk -v s="$STATE/crio/storage" 'index($2, s) == 1 {print $2}' /proc/mounts | sort -r)
  fi
  # 5) kubelet cgroups (cgroupfs driver: /kubepods under every v1 hierarchy), deepest first
  for c in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  restore_host
  rm -f "$ENV_FILE" "$STATE/mode" "$STATE/runtime" "$PIDS"/*.cmd
  local left
  if left=$(leftovers); then
    [ -n "$quiet" ] || log "down: nothing left behind"
  else
    log "down: left behind:"; echo "$left" >&2
    return 1
  fi
}

status() {
  local mode n f
  mode=$(cat "$STATE/mode" 2>/dev/null || echo none)
  echo "state: $STATE  mode: $mode  env file: $([ -f "$ENV_FILE" ] && echo "$ENV_FILE" || echo "none (not up)")"
  echo "runtime: $RUNTIME"
  for n in registry registry-auth containerd crio etcd kube-apiserver kube-scheduler kube-controller-manager kubelet \
    apiserver-fleet registry-fleet $(for f in "$PIDS"/node-*.pid; do [ -f "$f" ] && basename "$f" .pid; done); do
    f=$PIDS/$n.pid
    if alive "$n"; then echo "  $n: running (pid $(cut -d' ' -f1 "$f"))";
    elif [ -f "$f" ]; then echo "  $n: DEAD (recorded pid $(cut -d' ' -f1 "$f"); log $LOGS/$n.log)";
    fi
  done
  if [ "$mode" = none ]; then
    if leftovers >/dev/null; then echo "nothing of ours on the machine"; else echo "left behind:"; leftovers || true; fi
  fi
}

# One environment per state dir: up, down and push-agent-image hold a lock, so a second caller (another
# developer's test run, CI) waits instead of wiping directories under a running cluster.
lock() {
  mkdir -p "$(dirname "$STATE")"
  exec 9>"$STATE.lock"
  if ! flock -n 9; then
    log "another e2e/cluster.sh is working on $STATE; waiting for it (up to 30 min)"
    flock -w 1800 9 || die "gave up waiting for $STATE.lock"
  fi
}

# reuse <mode>: with IMAGE_PREFETCHER_E2E_REUSE=1, keep a healthy environment of at least this mode
reusable() {
  [ "${IMAGE_PREFETCHER_E2E_REUSE:-}" = 1 ] && [ -f "$ENV_FILE" ] || return 1
  local have n
  have=$(cat "$STATE/mode" 2>/dev/null)
  [ "$have" = full ] || [ "$have" = "$1" ] || return 1
  [ "$RUNTIME" = "$WANT_RUNTIME" ] || return 1
  grep -qx "export IMAGE_PREFETCHER_E2E_IMAGE_FS_SIZE='$IMAGE_FS_SIZE'" "$ENV_FILE" || return 1
  if [ "$have" = full ]; then # the node's settings must be the ones asked for
    grep -qx "export IMAGE_PREFETCHER_E2E_NODE_TAINTS='$NODE_TAINTS'" "$ENV_FILE" || return 1
    grep -qx "export IMAGE_PREFETCHER_E2E_IMAGE_GC='$IMAGE_GC'" "$ENV_FILE" || return 1
    grep -qx "export IMAGE_PREFETCHER_E2E_FLEET='$FLEET'" "$ENV_FILE" || return 1
  fi
  for n in registry registry-auth "$RUNTIME_PROC"; do alive $n || return 1; done
  if [ "$have" = full ]; then
    for n in etcd kube-apiserver kube-scheduler kube-controller-manager kubelet; do alive $n || return 1; done
  fi
  if [ "$have" = full ] && ! grep -q "^export IMAGE_PREFETCHER_E2E_KUBE_VERSION='$K8S_VERSION'$" "$ENV_FILE"; then
    log "IMAGE_PREFETCHER_E2E_REUSE=1: the running cluster is not Kubernetes $K8S_VERSION; starting a fresh one"
    return 1
  fi
  log "IMAGE_PREFETCHER_E2E_REUSE=1: the $have environment in $STATE is healthy; reusing it"
  # the test images and the agent image may have changed since it came up; both pushes are idempotent
  build_tools
  push_test_images
  if [ "$have" = full ]; then
    push_agent_image
    write_env full "$(sed -n "s/^export IMAGE_PREFETCHER_E2E_KUBE_BIN='\(.*\)'/\1/p" "$ENV_FILE")"
  fi
}

# Fault tests stop one component and start it again: only by its recorded PID, and with the exact command
# line it was started with; start-component returns once the component answers again.
stop_component() {
  local name=${1:?usage: stop-component NAME}
  [ -f "$PIDS/$name.cmd" ] || die "no component '$name' in this environment (see $PIDS)"
  alive "$name" || die "$name is not running"
  stop_many "$name"
  log "stopped $name"
}

start_component() {
  local name=${1:?usage: start-component NAME}
  [ -f "$PIDS/$name.cmd" ] || die "no component '$name' in this environment (see $PIDS)"
  alive "$name" && die "$name is already running"
  # keep the log of the earlier run: a test may want to read what happened before the stop
  [ -f "$LOGS/$name.log" ] && mv "$LOGS/$name.log" "$LOGS/$name.log.$(date +%s)"
  eval "start_bg $name $(cat "$PIDS/$name.cmd")"
  case $name in
    kube-apiserver) wait_for 90 "kube-apiserver /readyz" kube-apiserver sh -c "curl -sf --cacert '$PKI/ca.crt' https://127.0.0.1:6443/readyz | grep -qx ok" ;;
    containerd | crio) wait_for 60 "$name on $SOCK" "$name" "$BIN/crireset" --probe --timeout 2s --socket "$SOCK" ;;
    etcd) wait_for 20 etcd etcd curl -sf http://127.0.0.1:2379/health ;;
    registry) wait_for 20 "registry on $REGISTRY" registry curl -sf "http://$REGISTRY/v2/" ;;
    *) sleep 1; alive "$name" || die "$name exited right after its start (log: $LOGS/$name.log)" ;;
  esac
  log "started $name"
}

case ${1:-} in
  stop-component) need_root; shift; stop_component "$@" ;;
  start-component) need_root; shift; start_component "$@" ;;
  up) shift; need_root; lock; reusable "${1:-full}" || up "${1:-full}" ;;
  add-node) need_root; lock; shift; add_node "${1:?usage: add-node NAME RUNTIME [TAINTS]}" "${2:?usage: add-node NAME RUNTIME [TAINTS]}" "${3:-}"
    write_env full "$(sed -n "s/^export IMAGE_PREFETCHER_E2E_KUBE_BIN='\(.*\)'/\1/p" "$ENV_FILE")" ;;
  shape-node) need_root; shift; shape_node "${1:?usage: shape-node NAME MBIT}" "${2:?usage: shape-node NAME MBIT}" ;;
  fleet-registry) need_root; shift; fleet_registry "${1:?usage: fleet-registry plain|mirror [UPSTREAM]}" "${2:-}"; write_env full "$(sed -n "s/^export IMAGE_PREFETCHER_E2E_KUBE_BIN='\(.*\)'/\1/p" "$ENV_FILE")" ;;
  node-registry) need_root; shift; node_registry "${1:?usage: node-registry NAME block|allow}" "${2:?usage: node-registry NAME block|allow}" ;;
  kill-node) need_root; lock; shift; kill_node "${1:?usage: kill-node NAME}"
    write_env full "$(sed -n "s/^export IMAGE_PREFETCHER_E2E_KUBE_BIN='\(.*\)'/\1/p" "$ENV_FILE")" ;;
  down) need_root; lock; down ;;
  status) status ;;
  env) if [ -f "$ENV_FILE" ]; then cat "$ENV_FILE"; else die "no environment is up ($ENV_FILE missing): run e2e/cluster.sh up"; fi ;;
  push-agent-image) need_root; lock; AGENT_IMAGE_MODE=1; push_agent_image; [ -f "$STATE/mode" ] && write_env "$(cat "$STATE/mode")" "$(sed -n "s/^export IMAGE_PREFETCHER_E2E_KUBE_BIN='\(.*\)'/\1/p" "$ENV_FILE" 2>/dev/null)" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
