# The Kustomize bundle and the container image (included by the top-level Makefile).
#   make golden                       rewrite bundle/testdata/golden from the current bundle
#   make bundle-test                  goldens, kubectl kustomize equality, structural checks
#   make image                        OCI layout tarball at $(IMAGE_LAYOUT), no Docker needed
#   make image-push REGISTRY=host[:port][/path] [OVERLAY=overlays/vanilla] [IMAGE_TAG=...] [PLATFORMS=...]
#                                     build (linux/amd64 and linux/arm64 by default), push, print the
#                                     digest reference and, with OVERLAY, pin it in that overlay's
#                                     `images:` (kustomize edit set image)

# The version stamped into the binaries and used as the image tag: `git describe` of the checkout
# (the commit when there is no tag; -dirty for uncommitted changes), so every build says what it is
# and a re-push never reuses a tag that nodes may already hold.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
APP_PKG := github.com/nodeprefetch/image-prefetcher/agent/app
LDFLAGS := -s -w -X $(APP_PKG).Version=$(VERSION) -X $(APP_PKG).Commit=$(COMMIT)

REGISTRY ?= 127.0.0.1:5000
IMAGE_NAME ?= image-prefetcher
IMAGE_TAG ?= $(VERSION)
IMAGE_REF ?= $(REGISTRY)/$(IMAGE_NAME):$(IMAGE_TAG)
PLATFORMS ?= linux/amd64 linux/arm64
OVERLAY ?=
IMAGE_OUT := _output/image
IMAGE_LAYOUT ?= $(IMAGE_OUT)/$(IMAGE_NAME).oci.tar
# The main packages that go into the image.
IMAGE_CMDS := agent/cmd/image-prefetcher fn/cmd/image-prefetcher-fn
# The image name the bundle's DaemonSet uses before an overlay's `images:` sets it.
BUNDLE_IMAGE := image-prefetcher

.PHONY: golden bundle-test image image-push image-binaries

golden:
	$(GO) test -count=1 ./bundle/ -run '^TestGolden$$' -update

bundle-test:
	$(GO) test -count=1 ./bundle/ ./build/ociimage/

# Static binaries per platform, where build/ociimage (and the Dockerfile) expect them.
image-binaries:
	@set -e; rm -rf $(IMAGE_OUT)/bin; for p in $(PLATFORMS); do \
	  os=$${p%/*}; arch=$${p#*/}; \
	  for cmd in $(IMAGE_CMDS); do \
	    echo "build $$cmd $(VERSION) for $$p"; \
	    CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO) build -trimpath -ldflags='$(LDFLAGS)' \
	      -o $(IMAGE_OUT)/bin/$${os}_$${arch}/$$(basename $$cmd) ./$$cmd; \
	  done; \
	done

image: image-binaries
	$(GO) run ./build/ociimage -bin-dir $(IMAGE_OUT)/bin $(foreach p,$(PLATFORMS),-platform $(p)) -layout $(IMAGE_LAYOUT)

# The last line printed is the pushed digest reference; with OVERLAY it also goes into that overlay.
image-push: image-binaries $(if $(OVERLAY),fn-tools)
	@set -eo pipefail; \
	ref=$$($(GO) run ./build/ociimage -bin-dir $(IMAGE_OUT)/bin $(foreach p,$(PLATFORMS),-platform $(p)) \
	  -label org.opencontainers.image.version=$(VERSION) -label org.opencontainers.image.revision=$(COMMIT) \
	  -push $(IMAGE_REF) | tail -n 1); \
	echo "pushed $(IMAGE_REF) ($(PLATFORMS))"; \
	if [ -n "$(OVERLAY)" ]; then \
	  (cd $(OVERLAY) && $(FN_TOOLS)/kustomize edit set image $(BUNDLE_IMAGE)=$$ref); \
	  echo "$(OVERLAY)/kustomization.yaml: images: $(BUNDLE_IMAGE) -> $$ref"; \
	fi; \
	echo "$$ref"
