# The KRM function (included by the top-level Makefile).
#   make fn-build                    bin/image-prefetcher-fn (the examples' exec paths point here)
#   make fn-tools                    the kustomize CLI for the exec-transformer test, into $(FN_TOOLS)
#   make fn-test                     goldens, bundle equality, standalone, kpt render twice, kustomize exec
#   make fn-hydrate                  regenerate examples/flux's committed, Flux-ready output
#   make fn-render-example OUT=dir   render examples/standalone into dir/prefetch.yaml (cluster e2e)

KUSTOMIZE_VERSION ?= v5.8.1
FN_TOOLS ?= $(TOOLS)/kustomize-$(KUSTOMIZE_VERSION)
FN_BIN := $(BIN)/image-prefetcher-fn

.PHONY: fn-build fn-tools fn-test fn-hydrate fn-render-example

fn-build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(FN_BIN) ./fn/cmd/image-prefetcher-fn

fn-tools:
	@test -x $(FN_TOOLS)/kustomize || GOBIN=$(FN_TOOLS) $(GO) install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

# IMAGE_PREFETCHER_E2E=1: a missing kpt or kustomize fails the entry-point tests.
fn-test: fn-tools
	IMAGE_PREFETCHER_E2E=1 KUSTOMIZE=$(FN_TOOLS)/kustomize $(GO) test -count=1 ./fn/...

fn-hydrate: fn-build
	$(FN_BIN) examples/flux/prefetcher.yaml > examples/flux/clusters/dev/image-prefetcher/prefetch.yaml

fn-render-example: fn-build
	@test -n "$(OUT)" || { echo "usage: make fn-render-example OUT=dir"; exit 1; }
	mkdir -p $(OUT)
	$(FN_BIN) examples/standalone/prefetcher.yaml > $(OUT)/prefetch.yaml
