#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler and kubelet of one Kubernetes version from
# the k8s.io/kubernetes Go module (through whatever GOPROXY is configured) into a cache directory outside the
# checkout, keyed by version, so later runs and CI on the same machine reuse them.
#
#   e2e/build-kubernetes.sh [version]      # default: $K8S_VERSION (e2e/cluster.sh sets it)
#   prints the bin directory on stdout when done
set -euo pipefail
K8S_VERSION=${1:-${K8S_VERSION:?give the Kubernetes version, e.g. v1.37.2}}
CACHE=${IMAGE_PREFETCHER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/image-prefetcher}
DIR=$CACHE/kubernetes/$K8S_VERSION
BIN=$DIR/bin
MOD=$DIR/build
CMDS=(kube-apiserver kubelet kube-controller-manager kube-scheduler)
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=${GOTOOLCHAIN:-local}

log() { echo "[$(date +%T)] build-kubernetes: $*" >&2; }

minor=$(echo "$K8S_VERSION" | cut -d. -f2)
staging=v0.${K8S_VERSION#v1.}

built() {
  for c in "${CMDS[@]}"; do [ -x "$BIN/$c" ] || return 1; done
}
if built; then echo "$BIN"; exit 0; fi

mkdir -p "$MOD" "$BIN"
# One build of a version at a time: make e2e starts the other phases' version in the background
# (at low priority, while its own tests run) and their cluster.sh up waits here for it.
exec 8>"$DIR/.lock"
flock 8
if built; then echo "$BIN"; exit 0; fi
if [ ! -f "$MOD/go.sum" ]; then
  log "preparing build module for k8s.io/kubernetes $K8S_VERSION (staging modules $staging)"
  kmod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  [ -f "$kmod" ] || { log "k8s.io/kubernetes@$K8S_VERSION is not available from the module proxy"; exit 1; }
  {
    printf 'module image-prefetcher.e2e/k8sbuild\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
    # k8s.io/kubernetes maps its staging modules to ./staging/src/...; outside its repo they must be
    # replaced by the published v0.Y.Z modules. A module the proxy refuses and that only tests import
    # gets an empty stub.
    while read -r m; do
      if go mod download -json "$m@$staging" >/dev/null 2>&1; then
        printf '\t%s => %s %s\n' "$m" "$m" "$staging"
      else
        log "module $m@$staging refused; using an empty stub"
        mkdir -p "$MOD/stubs/${m#k8s.io/}"
        printf 'module %s\n\ngo 1.24.0\n' "$m" >"$MOD/stubs/${m#k8s.io/}/go.mod"
        printf '\t%s => ./stubs/%s\n' "$m" "${m#k8s.io/}"
      fi
    done < <(awk '/=> \.\/staging\/src\//{print $1}' "$kmod")
    printf ')\n'
  } >"$MOD/go.mod"
  cat >"$MOD/tools.go" <<'GO'
//go:build tools

package k8sbuild

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  # -e: test-only imports of stubbed modules must not stop the build
  (cd "$MOD" && go mod tidy -e >"$MOD/tidy.log" 2>&1) || { log "go mod tidy failed: $(tail -5 "$MOD/tidy.log")"; exit 1; }
fi

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
missing=()
for c in "${CMDS[@]}"; do [ -x "$BIN/$c" ] || missing+=("$c"); done
log "go build ${missing[*]} $K8S_VERSION"
t0=$SECONDS
# One go build for all of them: their links (single-threaded each) run beside the compiles instead of
# after them. Into a temporary directory, then renamed, so an interrupted build never leaves a
# half-written binary in the cache.
tmp=$BIN/.build
rm -rf "$tmp" && mkdir -p "$tmp"
(cd "$MOD" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" "${missing[@]/#/k8s.io/kubernetes/cmd/}")
for c in "${missing[@]}"; do mv "$tmp/$c" "$BIN/$c"; done
rmdir "$tmp"
log "built ${missing[*]} in $((SECONDS - t0))s"
echo "$BIN"
