#!/usr/bin/env bash
# Regenerates the Go code of every .proto under api/ with pinned generators.
#   api/generate.sh [OUT_DIR]     (default: the repository root; `make generate`)
# The generated files land at their package paths under OUT_DIR, so a test can
# generate into a temporary directory and compare with the committed files.
#
# Generators: protoc-gen-go and protoc-gen-go-grpc are built from the pinned
# module versions into .cache/tools (the Go module proxy serves them). protoc
# itself comes from Debian's protobuf-compiler package; its version is part of
# the generated headers, so it must be exactly $PROTOC_VERSION. When it is
# missing and INSTALL_PROTOC=1 (CI sets it through the staleness test), it is
# installed with apt-get.
#
# Exit status 3 means a generator is unavailable (nothing was generated).
set -euo pipefail

PROTOC_VERSION=3.21.12
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
tools=$root/.cache/tools

unavailable() { echo "api/generate.sh: $*" >&2; exit 3; }

protoc_ok() { command -v protoc >/dev/null && [ "$(protoc --version)" = "libprotoc $PROTOC_VERSION" ]; }
if ! protoc_ok; then
  if [ "${INSTALL_PROTOC:-}" = 1 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "api/generate.sh: installing protobuf-compiler with apt-get" >&2
    (apt-get install -y --no-install-recommends protobuf-compiler >/dev/null ||
      { apt-get update >/dev/null && apt-get install -y --no-install-recommends protobuf-compiler >/dev/null; }) ||
      unavailable "apt-get install protobuf-compiler failed"
  fi
  protoc_ok || unavailable "need protoc $PROTOC_VERSION (Debian bookworm's protobuf-compiler), have: $(protoc --version 2>&1 || true)"
fi

install_tool() { # name module version
  local dir=$tools/$1-$3
  if [ ! -x "$dir/$1" ]; then
    mkdir -p "$dir"
    GOBIN=$dir GOFLAGS=-mod=mod go install "$2@$3" || unavailable "go install $2@$3 failed"
  fi
  echo "$dir/$1"
}
gen_go=$(install_tool protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION")
gen_grpc=$(install_tool protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION")

cd "$root"
mkdir -p "$out"
mapfile -t protos < <(find api -name '*.proto' | LC_ALL=C sort)
module=github.com/nodeprefetch/image-prefetcher
protoc -I . \
  --plugin=protoc-gen-go="$gen_go" --plugin=protoc-gen-go-grpc="$gen_grpc" \
  --go_out="$out" --go_opt=module=$module \
  --go-grpc_out="$out" --go-grpc_opt=module=$module \
  "${protos[@]}"
