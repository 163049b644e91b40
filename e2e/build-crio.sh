#!/usr/bin/env bash
# Builds CRI-O (crio) and its pinns helper of one version from the github.com/cri-o/cri-o Go module (through
# whatever GOPROXY is configured) into a cache directory outside the checkout, keyed by version. Debian 12
# has no CRI-O; it has conmon and crun, which the harness uses with it.
#
#   e2e/build-crio.sh [version]      # default: $CRIO_VERSION or v1.35.2
#   prints the bin directory on stdout when done
#
# Needs gcc, pkg-config, libseccomp-dev and libgpgme-dev (e2e/cluster.sh installs them).
set -euo pipefail
VERSION=${1:-${CRIO_VERSION:-v1.35.2}}
CACHE=${IMAGE_PREFETCHER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/image-prefetcher}
DIR=$CACHE/crio/$VERSION
BIN=$DIR/bin
SRC=$DIR/src
# Two of CRI-O's dependencies (containerd/nri, CloudNativeAI/model-spec) fail the checksum-database
# lookup here although the module proxy serves them; go.sum of CRI-O itself still pins every module.
export GOFLAGS="-buildvcs=false -mod=mod" GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOSUMDB=off

log() { echo "[$(date +%T)] build-crio: $*" >&2; }

if [ -x "$BIN/crio" ] && [ -x "$BIN/pinns" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$BIN"
if [ ! -f "$SRC/go.mod" ]; then
  log "fetching github.com/cri-o/cri-o@$VERSION"
  moddir=$(go mod download -json "github.com/cri-o/cri-o@$VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
  [ -d "$moddir" ] || { log "github.com/cri-o/cri-o@$VERSION is not available from the module proxy"; exit 1; }
  rm -rf "$SRC.tmp"; cp -r "$moddir" "$SRC.tmp"; chmod -R u+w "$SRC.tmp"
  # Module versions the proxy refuses ("not available"), replaced by the nearest served release:
  # go-criu v8.1.0 (checkpoint/restore, unused by the harness) -> v8.2.0.
  replaces=(github.com/checkpoint-restore/go-criu/v8=github.com/checkpoint-restore/go-criu/v8@v8.2.0)
  for r in "${replaces[@]}"; do
    if grep -q "${r%%=*} " "$SRC.tmp/go.mod"; then (cd "$SRC.tmp" && go mod edit -replace "$r"); fi
  done
  mv "$SRC.tmp" "$SRC"
fi

if [ ! -x "$BIN/crio" ]; then
  log "go build crio $VERSION (cgo)"
  t0=$SECONDS
  # the build tags of CRI-O's own Makefile for a host without btrfs/devicemapper headers
  (cd "$SRC" && CGO_ENABLED=1 go build -trimpath \
    -tags "containers_image_openpgp exclude_graphdriver_btrfs exclude_graphdriver_devicemapper seccomp" \
    -ldflags "-s -w -X github.com/cri-o/cri-o/internal/version.version=${VERSION#v}" \
    -o "$BIN/.crio.tmp" ./cmd/crio)
  mv "$BIN/.crio.tmp" "$BIN/crio"
  log "built crio in $((SECONDS - t0))s"
fi
if [ ! -x "$BIN/pinns" ]; then
  log "make pinns (C, static)"
  make -s -C "$SRC/pinns" >&2
  install -m 0755 "$SRC/bin/pinns" "$BIN/pinns"
fi
echo "$BIN"
