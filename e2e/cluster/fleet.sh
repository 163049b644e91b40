# shellcheck shell=bash disable=SC2153  # STATE, SOCK, PIDS, LOGS, PKI and the rest come from e2e/cluster.sh
# The fleet: nodes beyond the first, sourced by e2e/cluster.sh (which defines STATE, log, start_bg, the
# runtime and kubelet configurations this file reuses).
#
# Each fleet node is a network namespace and a mount namespace of its own on this machine, with its own
# container runtime (any of the harness's), its own kubelet (own root dir, cgroup root and node IP) and
# its own pod network. Inside its mount namespace the node sees its own directories at the paths the first
# node has ($STATE/host/run/containerd, $STATE/containerd, $STATE/kubelet, ...) and at the host paths a
# runtime or kubelet uses whatever its flags say (/run/containerd, /var/lib/kubelet, ...): one DaemonSet's
# host mounts and the agent's socket detection then work on every node as on real ones.
#
# Addresses: the fleet bridge (FLEET_BRIDGE, FLEET_GW on the host) joins the nodes (FLEET_NET.<10+index>);
# node <index>'s pods are 10.89.<100+index>.0/24 on a bridge inside its namespace, routed through its
# node address. The API server and the plain registry are reached at FLEET_GW (a forwarder and a second
# registry process on the same storage, whose access log names the node of every request). Nothing is
# sent outside these bridges and namespaces.

FLEET_BRIDGE=ipfe2e1
FLEET_NET=10.89.0
FLEET_GW=$FLEET_NET.1
FLEET_NODES=$STATE/nodes
# the mount namespaces' files (a private mount, as unshare --mount=<file> needs)
FLEET_NS=$FLEET_NODES/.ns
# CRI-O 1.35 and containerd 1.6 nodes run the kubelet of the release before the control plane's newest:
# kubelets from 1.36 on need a runtime with the CRI RuntimeConfig answer (containerd 2.x)
# (make e2e-fleet names it; a later add-node reads the one the environment came up with)
FLEET_OLDER_KUBE_VERSION=${IMAGE_PREFETCHER_E2E_FLEET_OLDER_KUBE_VERSION:-$(sed -n \
  "s/^export IMAGE_PREFETCHER_E2E_FLEET_OLDER_KUBE_VERSION='\(.*\)'/\1/p" "$STATE/env.sh" 2>/dev/null || true)}
FLEET_OLDER_KUBE_VERSION=${FLEET_OLDER_KUBE_VERSION:-v1.35.4}
# the in-node paths each node has a directory of its own for
FLEET_NODE_DIRS=(host containerd crio runc cni kubelet)

fleet_nodes() { # the fleet nodes' names, in the order they were added
  local f
  for f in "$FLEET_NODES"/*/index; do [ -f "$f" ] && echo "$(cat "$f") $(basename "$(dirname "$f")")"; done | sort -n | cut -d' ' -f2
}

# fleet_net: the fleet bridge, the API server's forwarder and the fleet registry (idempotent)
fleet_net() {
  if ! ip link show "$FLEET_BRIDGE" >/dev/null 2>&1; then
    ip link add "$FLEET_BRIDGE" type bridge
    ip addr add "$FLEET_GW/24" dev "$FLEET_BRIDGE"
    ip link set "$FLEET_BRIDGE" up
  fi
  echo 1 >/proc/sys/net/ipv4/ip_forward
  if ! alive apiserver-fleet; then
    start_bg apiserver-fleet socat "TCP-LISTEN:6443,bind=$FLEET_GW,reuseaddr,fork" TCP:127.0.0.1:6443
    wait_for 20 "the API server at $FLEET_GW:6443" apiserver-fleet \
      sh -c "curl -sf --cacert '$PKI/ca.crt' https://$FLEET_GW:6443/readyz | grep -qx ok"
  fi
  alive registry-fleet || fleet_registry plain
  # the first node fetches through the fleet registry too, so that its log shows every node's fetches
  # (containerd reads its hosts files at each pull)
  case $RUNTIME in containerd | containerd-1.6) containerd_hosts "$STATE/containerd" "$FLEET_GW:5000" ;; esac
  mkdir -p "$FLEET_NS"
  if ! mountpoint -q "$FLEET_NS"; then
    mount --bind "$FLEET_NS" "$FLEET_NS"
    mount --make-private "$FLEET_NS"
  fi
}

# fleet_registry plain|mirror [upstream]: the registry the nodes reach at the fleet gateway, with an access log whose
# lines name the node (source address) and the bytes of every request. plain: the plain registry's own
# storage; mirror: a pull-through cache of the plain registry (distribution's proxy mode, as a site mirror
# in front of a remote registry), started empty, so that the plain registry's log counts what the
# registry itself serves through it; upstream (host:port, default the plain registry) may be a shaping
# proxy in front of it, a remote registry's link.
fleet_registry() {
  local mode=$1 conf=$STATE/registry/registry-fleet.yml storage=$STATE/registry/data proxy=""
  case $mode in
    plain) ;;
    mirror) storage=$STATE/registry/mirror-cache proxy="proxy: {remoteurl: http://${2:-$REGISTRY}}" ;;
    *) die "fleet-registry: plain or mirror, not '$mode'" ;;
  esac
  stop_many registry-fleet
  rm -rf "$STATE/registry/mirror-cache"
  cat >"$conf" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $storage}, delete: {enabled: true}}
http: {addr: $FLEET_GW:5000}
$proxy
EOF
  # its access log starts empty: a reader takes its offset after a switch
  start_bg registry-fleet docker-registry serve "$conf"
  wait_for 20 "registry on $FLEET_GW:5000" registry-fleet curl -sf "http://$FLEET_GW:5000/v2/"
}

# node_socket <name>: the node's CRI socket as the host sees it
node_socket() {
  local name=$1 rt
  rt=$(cat "$FLEET_NODES/$name/runtime")
  (use_runtime "$rt"; echo "$FLEET_NODES/$name/host/${SOCK#"$HOSTROOT"/}")
}

# add_node <name> <runtime> [taints] [--image-gc]: a new node joins the cluster (Ready when this returns);
# --image-gc: its kubelet collects every unused, unpinned image (IMAGE_PREFETCHER_E2E_IMAGE_GC=1's
# configuration for this node alone)
add_node() {
  local name=${1:?usage: add-node NAME RUNTIME [TAINTS] [--image-gc]} rt=${2:?usage: add-node NAME RUNTIME [TAINTS] [--image-gc]}
  local taints="" gc="" a
  shift 2
  for a in "$@"; do
    case $a in
      --image-gc) gc=1 ;;
      -*) die "add-node: unknown option '$a'" ;;
      *) taints=$a ;;
    esac
  done
  [ "$(cat "$STATE/mode" 2>/dev/null)" = full ] || die "add-node needs a running full environment (e2e/cluster.sh up)"
  [[ $name =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]] || die "add-node: '$name' is not a usable node name"
  if [ "$name" = "$NODE_NAME" ] || [ -e "$FLEET_NODES/$name" ]; then die "add-node: node $name exists"; fi
  (use_runtime "$rt") || exit 2
  local t0=$SECONDS idx=2 f
  for f in "$FLEET_NODES"/*/index; do [ -f "$f" ] && [ "$(cat "$f")" -ge "$idx" ] && idx=$(($(cat "$f") + 1)); done
  [ "$idx" -le 99 ] || die "add-node: at most 98 fleet nodes"
  local ip=$FLEET_NET.$((10 + idx)) podnet=10.89.$((100 + idx)).0/24 n=$FLEET_NODES/$name
  local kv=$K8S_VERSION rbin kbin
  [ "$rt" = containerd ] || kv=$FLEET_OLDER_KUBE_VERSION
  rbin=$(RUNTIME=$rt runtime_bin) || die "building the $rt runtime failed"
  kbin=$(K8S_VERSION=$kv "$ROOT/e2e/build-kubernetes.sh") || die "building Kubernetes $kv failed"
  fleet_net
  local d
  for d in "${FLEET_NODE_DIRS[@]}"; do mkdir -p "$n/$d" "$STATE/$d"; done
  echo "$idx" >"$n/index"; echo "$rt" >"$n/runtime"; echo "$ip" >"$n/ip"; echo "$podnet" >"$n/podnet"
  echo "$gc" >"$n/image-gc"

  # network: a veth into the node's namespace, the node's address, a route to its pods
  local netns=ipfe2e-$name
  ip netns add "$netns"
  ip link add "ipfe2e-v$idx" type veth peer name eth0 netns "$netns"
  ip link set "ipfe2e-v$idx" master "$FLEET_BRIDGE" up
  ip -n "$netns" addr add "$ip/24" dev eth0
  ip -n "$netns" link set lo up
  ip -n "$netns" link set eth0 up
  ip -n "$netns" route add default via "$FLEET_GW"
  ip route add "$podnet" via "$ip"
  nsenter --net="/run/netns/$netns" sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'

  # cgroups: the kubelet's cgroup root (it must exist in every hierarchy, CRI-O's hugetlb one too);
  # cpuset children start empty and need the parent's sets
  if [ "$rt" = cri-o ]; then crio_hugetlb; fi
  local c
  if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p "/sys/fs/cgroup/$netns"
  else
    for c in /sys/fs/cgroup/*/; do
      case $c in */unified/) continue ;; esac
      mkdir -p "$c$netns"
      if [ -f "$c/cpuset.cpus" ]; then
        cat "$c/cpuset.cpus" >"$c$netns/cpuset.cpus"
        cat "$c/cpuset.mems" >"$c$netns/cpuset.mems"
      fi
    done
  fi

  # the runtime's configuration, written where the node will see it
  mkdir -p "$n/cni/net.d" "$n/cni/ipam"
  ln -sfn /usr/lib/cni "$n/cni/bin"
  cni_conflist "$podnet" >"$n/cni/net.d/10-image-prefetcher-e2e.conflist"
  local runtime_cmd=()
  case $rt in
    cri-o)
      (use_runtime "$rt"; write_crio_config "$n/crio" "$rbin" "$FLEET_GW:5000")
      runtime_cmd=("$rbin/crio" --config "$STATE/crio/crio.conf" --config-dir "$STATE/crio/conf.d" --registries-conf "$STATE/crio/registries.conf") ;;
    *)
      (use_runtime "$rt"; containerd_config) >"$n/containerd/config.toml"
      containerd_hosts "$n/containerd" "$FLEET_GW:5000"
      if [ -n "$rbin" ]; then runtime_cmd=(env PATH="$rbin:$PATH" "$rbin/containerd" --config "$STATE/containerd/config.toml")
      else runtime_cmd=(containerd --config "$STATE/containerd/config.toml"); fi ;;
  esac

  # the mount namespace: its own directories at the in-node paths and at the host paths runtimes and the
  # kubelet use whatever their flags say; copies of the other nodes' mounts (pod netns, rootfs, namespace
  # files) are dropped first, so that no node keeps another's namespaces alive
  local binds="" p
  for d in "${FLEET_NODE_DIRS[@]}"; do binds+="mount --bind '$n/$d' '$STATE/$d'; "; done
  for p in "${HOST_PATHS[@]}"; do
    [ "$p" = /run/netns ] && continue
    mkdir -p "$p" "$n/paths$p"
    binds+="mount --bind '$n/paths$p' '$p'; "
  done
  touch "$FLEET_NS/$name"
  unshare --mount="$FLEET_NS/$name" --propagation private sh -ec "
    awk '{print \$2}' /proc/self/mounts | grep -E '^($STATE/|/run/netns/|/run/containerd/|/var/lib/kubelet/)' | sort -r |
      while read -r m; do umount -l \"\$m\" 2>/dev/null || true; done
    $binds"

  start_bg "node-$name-runtime" nsenter --net="/run/netns/$netns" --mount="$FLEET_NS/$name" -- "${runtime_cmd[@]}"
  local sock
  sock=$(node_socket "$name")
  wait_for 60 "$rt on node $name" "node-$name-runtime" "$BIN/crireset" --probe --timeout 2s --socket "$sock"

  # the kubelet: its own client certificate (the Node authorizer and NodeRestriction know it by name)
  (
    cd "$PKI" || exit 1
    printf '[ext]\nextendedKeyUsage=clientAuth\n' >client.cnf
    cert "node-$name" "/O=system:nodes/CN=system:node:$name" client.cnf
  )
  kubeconfig "$n/kubelet/kubeconfig" "node-$name" "https://$FLEET_GW:6443"
  mkdir -p "$n/kubelet/root" "$n/kubelet/pki" "$n/kubelet/pod-logs"
  (use_runtime "$rt"; kubelet_config "$ip" "/$netns" "$gc") >"$n/kubelet/config.yaml"
  start_bg "node-$name-kubelet" nsenter --net="/run/netns/$netns" --mount="$FLEET_NS/$name" -- \
    "$kbin/kubelet" --config="$STATE/kubelet/config.yaml" --kubeconfig="$STATE/kubelet/kubeconfig" \
    --root-dir="$STATE/kubelet/root" --cert-dir="$STATE/kubelet/pki" --hostname-override="$name" --node-ip="$ip" \
    ${taints:+--register-with-taints="$taints"}
  wait_for 120 "node $name Ready" "node-$name-kubelet" sh -c \
    "$(declare -f api_get); PKI='$PKI'; api_get /api/v1/nodes/$name | tr -d ' \n' | grep -q '\"type\":\"Ready\",\"status\":\"True\"'"
  echo $((SECONDS - t0)) >"$n/bringup-seconds"
  log "node $name ($rt $("$BIN/crireset" --probe --socket "$sock" | cut -d' ' -f2), kubelet $kv${gc:+ collecting unused images}, $ip, pods $podnet) Ready in $((SECONDS - t0))s"
}

# node_kill <name>: SIGKILL every process of the node: kubelet, runtime, shims, monitors, containers
node_kill() {
  local name=$1 pids
  for _ in $(seq 50); do
    # the namespace's processes (kubelet, runtime, shims, monitors, host-network pods) and the cgroup
    # root's (every pod's containers, in network namespaces of their own)
    pids=$( {
      ip netns pids "ipfe2e-$name" 2>/dev/null || true
      find /sys/fs/cgroup/ -path "*/ipfe2e-$name/*" \( -name tasks -o -name cgroup.procs \) -exec cat {} + 2>/dev/null || true
    } | sort -un)
    [ -z "$pids" ] && break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  rm -f "$PIDS/node-$name-runtime.pid" "$PIDS/node-$name-kubelet.pid"
}

# node_remove <name>: once nothing of the node runs: its namespaces, route, cgroups and directories
node_remove() {
  local name=$1 n=$FLEET_NODES/$1
  umount "$FLEET_NS/$name" 2>/dev/null || true
  rm -f "$FLEET_NS/$name"
  if [ -f "$n/podnet" ]; then ip route del "$(cat "$n/podnet")" 2>/dev/null || true; fi
  # the veth goes with its namespace, unless something still holds the namespace (seen once after a
  # containerd 1.6 node's down): deleting the host's end removes both, so the index can be used again
  if [ -f "$n/index" ]; then ip link del "ipfe2e-v$(cat "$n/index")" 2>/dev/null || true; fi
  ip netns del "ipfe2e-$name" 2>/dev/null || true
  local c
  for c in /sys/fs/cgroup/*/"ipfe2e-$name" "/sys/fs/cgroup/ipfe2e-$name"; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  rm -rf --one-file-system "$n"
  rm -f "$PIDS/node-$name-runtime.cmd" "$PIDS/node-$name-kubelet.cmd" "$PKI/node-$name.crt" "$PKI/node-$name.key"
}

# kill_node <name>: the node dies hard (no drain, no cleanup by its runtime); its Node object stays, as a
# dead machine's does, until someone deletes it
kill_node() {
  local name=$1
  [ -f "$FLEET_NODES/$name/index" ] || die "kill-node: no fleet node $name (fleet: $(fleet_nodes | tr '\n' ' '))"
  node_kill "$name"
  node_remove "$name"
  log "node $name killed (kubelet, runtime and containers SIGKILLed, namespaces removed)"
}

# shape_node <name> <mbit>: the node's link delivers at most <mbit> Mbit/s to it (a token bucket on the
# bridge side of its veth, as a node's NIC would); 0 removes the cap
shape_node() {
  local name=$1 mbit=$2 dev
  [ -f "$FLEET_NODES/$name/index" ] || die "shape-node: no fleet node $name"
  [[ $mbit =~ ^[0-9]+$ ]] || die "shape-node: '$mbit' is not a rate in Mbit/s"
  dev=ipfe2e-v$(cat "$FLEET_NODES/$name/index")
  if [ "$mbit" = 0 ]; then
    tc qdisc del dev "$dev" root 2>/dev/null || true
  else
    tc qdisc replace dev "$dev" root tbf rate "${mbit}mbit" burst 64kb latency 1s
  fi
}

# node_registry <name> block|allow: the node's connections to the registry are refused (in its own
# network namespace), or allowed again
node_registry() {
  local name=$1 rule=(OUTPUT -d "$FLEET_GW" -p tcp --dport 5000 -j REJECT --reject-with tcp-reset)
  [ -f "$FLEET_NODES/$name/index" ] || die "node-registry: no fleet node $name"
  case $2 in
    block) nsenter --net="/run/netns/ipfe2e-$name" iptables -C "${rule[@]}" 2>/dev/null ||
      nsenter --net="/run/netns/ipfe2e-$name" iptables -A "${rule[@]}" ;;
    allow) while nsenter --net="/run/netns/ipfe2e-$name" iptables -D "${rule[@]}" 2>/dev/null; do :; done ;;
    *) die "node-registry: block or allow, not '$2'" ;;
  esac
}

# node_links: the host ends of the nodes' veths (ipfe2e-v<index>) on this machine
node_links() {
  ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^ipfe2e-v[0-9]/ {sub(/@.*/, "", $2); print $2}'
}

# fleet_down: every fleet node stopped in order (kubelet, pods through CRI, runtime), then the fleet's network
fleet_down() {
  local name sock
  for name in $(fleet_nodes); do
    stop_many "node-$name-kubelet"
    if alive "node-$name-runtime"; then
      sock=$(node_socket "$name")
      "$BIN/crireset" --socket "$sock" || log "crireset on node $name failed; continuing"
      stop_many "node-$name-runtime"
    fi
    node_kill "$name"
    node_remove "$name"
  done
  stop_many apiserver-fleet registry-fleet
  # a node veth whose namespace outlived an earlier run (see node_remove)
  local link
  for link in $(node_links); do ip link del "$link" 2>/dev/null || true; done
  ip link del "$FLEET_BRIDGE" 2>/dev/null || true
  if mountpoint -q "$FLEET_NS" 2>/dev/null; then umount "$FLEET_NS" || umount -l "$FLEET_NS"; fi
  rm -rf --one-file-system "$FLEET_NODES"
  # `ip netns add` made /run/netns a mount point; give it back empty as it was
  if mountpoint -q /run/netns 2>/dev/null && [ -z "$(ls -A /run/netns)" ] && ! grep -qx "path /run/netns" "$STATE/host-before" 2>/dev/null; then
    umount /run/netns || true
  fi
}

# fleet_leftovers: what of the fleet is still on the machine (printed); status 1 when anything is
fleet_leftovers() {
  local found=0 x
  for x in $(ip netns list 2>/dev/null | awk '$1 ~ /^ipfe2e-/ {print $1}'); do echo "netns: $x"; found=1; done
  ip link show "$FLEET_BRIDGE" >/dev/null 2>&1 && { echo "bridge: $FLEET_BRIDGE"; found=1; }
  for x in $(node_links); do echo "link: $x"; found=1; done
  for x in /sys/fs/cgroup/*/ipfe2e-* /sys/fs/cgroup/ipfe2e-*; do [ -d "$x" ] && { echo "cgroup: $x"; found=1; }; done
  return $found
}

# fleet_env: the fleet's lines of the env file
fleet_env() {
  local name recs=""
  for name in $(fleet_nodes); do
    recs+="$name,$(cat "$FLEET_NODES/$name/runtime"),$(cat "$FLEET_NODES/$name/ip"),$(node_socket "$name")"
    if [ "$(cat "$FLEET_NODES/$name/image-gc" 2>/dev/null)" = 1 ]; then recs+=",image-gc"; fi
    recs+=";"
  done
  echo "export IMAGE_PREFETCHER_E2E_FLEET_NODES='${recs%;}'"
  echo "export IMAGE_PREFETCHER_E2E_FLEET_OLDER_KUBE_VERSION='$FLEET_OLDER_KUBE_VERSION'"
  # where every node (the first one in this machine's namespaces, a fleet node in its own) has each
  # runtime's socket directory and image filesystem: one DaemonSet mounts both
  (use_runtime containerd; echo "export IMAGE_PREFETCHER_E2E_NODE_CONTAINERD_SOCKET_DIR='$(dirname "$SOCK")'"
    echo "export IMAGE_PREFETCHER_E2E_NODE_CONTAINERD_IMAGE_FS='$IMAGE_FS'")
  (use_runtime cri-o; echo "export IMAGE_PREFETCHER_E2E_NODE_CRIO_SOCKET_DIR='$(dirname "$SOCK")'"
    echo "export IMAGE_PREFETCHER_E2E_NODE_CRIO_IMAGE_FS='$IMAGE_FS'")
  if ip link show "$FLEET_BRIDGE" >/dev/null 2>&1; then
    echo "export IMAGE_PREFETCHER_E2E_FLEET_GATEWAY='$FLEET_GW'"
    echo "export IMAGE_PREFETCHER_E2E_FLEET_REGISTRY_LOG='$LOGS/registry-fleet.log'"
  fi
}
