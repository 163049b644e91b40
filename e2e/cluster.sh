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
#   e2e/cluster.sh add-node NAME RUNTIME [TAINTS] [--image-gc]  # one more node (own network and mount
#                                      # namespace, runtime, kubelet; registers with TAINTS, e.g. key=:NoSchedule;
#                                      # --image-gc: its kubelet collects every unused, unpinned image); Ready on return
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
# This file holds the settings, the env file and the commands; the rest is in e2e/cluster/*.sh by concern.
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

export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"
[ -x /usr/local/go/bin/go ] && PATH=$PATH:/usr/local/go/bin
T_START=$SECONDS

log() { echo "[$(date +%T) +$((SECONDS - T_START))s] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The harness by concern (each file says what it holds); fleet.sh, above, holds the nodes beyond the first.
# shellcheck source=e2e/cluster/process.sh
. "$ROOT/e2e/cluster/process.sh"
# shellcheck source=e2e/cluster/host.sh
. "$ROOT/e2e/cluster/host.sh"
# shellcheck source=e2e/cluster/registry.sh
. "$ROOT/e2e/cluster/registry.sh"
# shellcheck source=e2e/cluster/runtime.sh
. "$ROOT/e2e/cluster/runtime.sh"
# shellcheck source=e2e/cluster/controlplane.sh
. "$ROOT/e2e/cluster/controlplane.sh"
# shellcheck source=e2e/cluster/node.sh
. "$ROOT/e2e/cluster/node.sh"

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
    # The agent image (a Go build and a push, about 8 s) is built while the control plane and the nodes
    # start, which mostly wait.
    push_agent_image &
    local image_pid=$!
    gen_pki
    start_control_plane "$kbin"
    start_kubelet "$kbin"
    local i=2 rt
    for rt in $FLEET; do add_node "e2e-node-$i" "$rt"; i=$((i + 1)); done
    wait "$image_pid" || die "the agent image was not built and pushed; see above"
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
  # 3) the rest, by recorded PID. kube-apiserver holds no state of its own (etcd, stopped after it, does)
  #    and has no client left that matters, but it can spend its whole wait draining connections on
  #    SIGTERM: 3 s, so a down does not wait 10 s for nothing.
  stop_many -w 3 kube-apiserver &
  stop_many "$RUNTIME_PROC" registry-auth registry
  wait $!
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
  add-node) need_root; lock; shift; add_node "$@"
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
