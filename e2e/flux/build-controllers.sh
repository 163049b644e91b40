#!/usr/bin/env bash
# Builds Flux's source-controller and kustomize-controller of one release from their Go modules (through
# whatever GOPROXY is configured) into a cache directory outside the checkout, keyed by version, with their
# CRDs beside them, so later runs and CI on the same machine reuse them. The e2e/flux tests run them as
# processes against the harness's cluster.
#
#   e2e/flux/build-controllers.sh            # prints the directory (bin/, crds/) on stdout when done
#   e2e/flux/build-controllers.sh --prepare  # only the build modules (their downloads) and the CRDs
#
# Settings: FLUX_SOURCE_CONTROLLER_VERSION, FLUX_KUSTOMIZE_CONTROLLER_VERSION (default v1.9.6 both: the
# newest releases that build with Go 1.26; v1.10.x need Go 1.27), IMAGE_PREFETCHER_CACHE.
set -euo pipefail
PREPARE=
[ "${1:-}" = --prepare ] && PREPARE=1
SC_VERSION=${FLUX_SOURCE_CONTROLLER_VERSION:-v1.9.6}
KC_VERSION=${FLUX_KUSTOMIZE_CONTROLLER_VERSION:-v1.9.6}
CACHE=${IMAGE_PREFETCHER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/image-prefetcher}
DIR=$CACHE/flux/source-controller-$SC_VERSION+kustomize-controller-$KC_VERSION
BIN=$DIR/bin
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=${GOTOOLCHAIN:-local}

# One caller at a time: make test prepares the modules in the background while make check runs, and the
# build that needs them waits here for that.
mkdir -p "$DIR"
exec 8>"$DIR/.lock"
flock 8

log() { echo "[$(date +%T)] build-flux-controllers: $*" >&2; }

# build <controller> <version> <replace lines...>: a throwaway module that requires the controller and
# repeats the replace directives of the controller's own go.mod (a dependency's replaces do not apply to
# the module that requires it), then `go build` of its main package.
build() {
  local name=$1 version=$2; shift 2
  [ -x "$BIN/$name" ] && return 0
  local mod=$DIR/build-$name
  mkdir -p "$mod" "$BIN"
  if [ ! -f "$mod/go.sum" ]; then
    log "preparing build module for github.com/fluxcd/$name $version"
    {
      printf 'module image-prefetcher.e2e/fluxbuild\n\ngo 1.26.0\n\nrequire github.com/fluxcd/%s %s\n\n' "$name" "$version"
      printf '%s\n' "$@"
    } >"$mod/go.mod"
    printf '//go:build tools\n\npackage fluxbuild\n\nimport _ "github.com/fluxcd/%s"\n' "$name" >"$mod/tools.go"
    # go.sum says the module is prepared (tidy writes it last); a failed tidy must not leave one
    (cd "$mod" && go mod tidy -e >"$mod/tidy.log" 2>&1) || { rm -f "$mod/go.sum"; log "go mod tidy failed: $(tail -5 "$mod/tidy.log")"; exit 1; }
  fi
  [ -n "$PREPARE" ] && return 0
  log "go build $name $version"
  local t0=$SECONDS
  # As the controllers' release images are built: static, no cgo.
  (cd "$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/.$name.tmp" "github.com/fluxcd/$name")
  mv "$BIN/.$name.tmp" "$BIN/$name"
  log "built $name in $((SECONDS - t0))s"
}

# Both controllers replace go-digest with a commit that has BLAKE3; kustomize-controller pins kustomize to
# v0.21.1 (kustomize v5.8.1).
DIGEST='replace github.com/opencontainers/go-digest => github.com/opencontainers/go-digest v1.0.1-0.20220411205349-bde1400a84be'
build kustomize-controller "$KC_VERSION" "$DIGEST" \
  'replace sigs.k8s.io/kustomize/api => sigs.k8s.io/kustomize/api v0.21.1' \
  'replace sigs.k8s.io/kustomize/kyaml => sigs.k8s.io/kustomize/kyaml v0.21.1'
# github.com/fluxcd/pkg/artifact v0.18.3, which source-controller v1.9.6 requires, is refused by the module
# proxy here ("403 Forbidden: This module version is not available"); v0.18.0, its served neighbour, has
# the same API and builds.
build source-controller "$SC_VERSION" "$DIGEST" \
  'replace github.com/fluxcd/pkg/artifact => github.com/fluxcd/pkg/artifact v0.18.0'

# The CRDs of the same releases, from the module sources.
if [ ! -f "$DIR/crds/.done" ]; then
  mkdir -p "$DIR/crds"
  for m in "source-controller@$SC_VERSION" "kustomize-controller@$KC_VERSION"; do
    src=$(cd "$DIR/build-${m%@*}" && go mod download -json "github.com/fluxcd/$m" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
    [ -d "$src/config/crd/bases" ] || { log "no CRDs in github.com/fluxcd/$m ($src)"; exit 1; }
    cp "$src"/config/crd/bases/*.yaml "$DIR/crds/"
  done
  chmod -R u+w "$DIR/crds"
  touch "$DIR/crds/.done"
fi
[ -n "$PREPARE" ] && exit 0
echo "$DIR"
