#!/usr/bin/env bash
# Builds containerd and its runc shim of one containerd 2.x version from the github.com/containerd/containerd/v2
# Go module (through whatever GOPROXY is configured) into a cache directory outside the checkout, keyed by
# version, so later runs and CI on the same machine reuse them. Debian 12 ships only containerd 1.6.
#
#   e2e/build-containerd.sh [version]      # default: $CONTAINERD_VERSION or v2.2.1
#   prints the bin directory on stdout when done
set -euo pipefail
VERSION=${1:-${CONTAINERD_VERSION:-v2.2.1}}
CACHE=${IMAGE_PREFETCHER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/image-prefetcher}
DIR=$CACHE/containerd/$VERSION
BIN=$DIR/bin
MOD=$DIR/build
CMDS=(containerd containerd-shim-runc-v2)
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=${GOTOOLCHAIN:-local}

log() { echo "[$(date +%T)] build-containerd: $*" >&2; }

missing=0
for c in "${CMDS[@]}"; do [ -x "$BIN/$c" ] || missing=1; done
if [ $missing = 0 ]; then echo "$BIN"; exit 0; fi

mkdir -p "$MOD" "$BIN"
if [ ! -f "$MOD/go.sum" ]; then
  log "preparing build module for github.com/containerd/containerd/v2 $VERSION"
  printf 'module image-prefetcher.e2e/containerdbuild\n\ngo 1.24.0\n\nrequire github.com/containerd/containerd/v2 %s\n' "$VERSION" >"$MOD/go.mod"
  cat >"$MOD/tools.go" <<'GO'
//go:build tools

package containerdbuild

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
)
GO
  (cd "$MOD" && go mod tidy -e >"$MOD/tidy.log" 2>&1) || { log "go mod tidy failed: $(tail -5 "$MOD/tidy.log")"; exit 1; }
fi

# The same settings as containerd's own static release builds: no cgo, and no btrfs snapshotter (its
# cgo headers are not installed here, and the harness uses overlayfs).
ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$VERSION"
for c in "${CMDS[@]}"; do
  [ -x "$BIN/$c" ] && continue
  log "go build $c $VERSION"
  t0=$SECONDS
  (cd "$MOD" && CGO_ENABLED=0 go build -trimpath -tags no_btrfs -ldflags "$ldflags" -o "$BIN/.$c.tmp" \
    "github.com/containerd/containerd/v2/cmd/$c")
  mv "$BIN/.$c.tmp" "$BIN/$c"
  log "built $c in $((SECONDS - t0))s"
done
echo "$BIN"
