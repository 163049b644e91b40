# shellcheck shell=bash disable=SC2153  # STATE, SOCK, PIDS, LOGS, PKI and the rest come from e2e/cluster.sh
# What the harness installs when missing, and the host state it records at up and gives back at down;
# sourced by e2e/cluster.sh.

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
