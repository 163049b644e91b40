# The Kustomize bundle and the container image (included by the top-level Makefile).
#   make golden                       rewrite bundle/testdata/golden from the current bundle
#   make bundle-test                  goldens, kubectl kustomize equality, structural checks
#   make image                        OCI layout tarball at $(IMAGE_LAYOUT), no Docker needed
#   make image-push REGISTRY=127.0.0.1:5000 [IMAGE_TAG=dev] [PLATFORMS="linux/amd64 linux/arm64"]

REGISTRY ?= 127.0.0.1:5000
IMAGE_NAME ?= image-prefetcher
IMAGE_TAG ?= dev
IMAGE_REF ?= $(REGISTRY)/$(IMAGE_NAME):$(IMAGE_TAG)
PLATFORMS ?= linux/amd64
IMAGE_OUT := _output/image
IMAGE_LAYOUT ?= $(IMAGE_OUT)/$(IMAGE_NAME).oci.tar
# The main packages that go into the image. The KRM function joins once fn/ has its main
# package; then it is required like the agent.
IMAGE_CMDS := agent/cmd/image-prefetcher $(wildcard fn/cmd/image-prefetcher-fn)

.PHONY: golden bundle-test image image-push image-binaries

golden:
	$(GO) test -count=1 ./bundle/ -run '^TestGolden$$' -update

bundle-test:
	$(GO) test -count=1 ./bundle/ ./build/ociimage/

# Static binaries per platform, where build/ociimage (and the Dockerfile) expect them.
image-binaries:
	@set -e; for p in $(PLATFORMS); do \
	  os=$${p%/*}; arch=$${p#*/}; \
	  for cmd in $(IMAGE_CMDS); do \
	    echo "build $$cmd for $$p"; \
	    CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO) build -trimpath -ldflags='-s -w' \
	      -o $(IMAGE_OUT)/bin/$${os}_$${arch}/$$(basename $$cmd) ./$$cmd; \
	  done; \
	done

image: image-binaries
	$(GO) run ./build/ociimage -bin-dir $(IMAGE_OUT)/bin $(foreach p,$(PLATFORMS),-platform $(p)) -layout $(IMAGE_LAYOUT)

image-push: image-binaries
	$(GO) run ./build/ociimage -bin-dir $(IMAGE_OUT)/bin $(foreach p,$(PLATFORMS),-platform $(p)) -push $(IMAGE_REF)
