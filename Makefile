# image-prefetcher: node agent, KRM function and Kustomize bundle.
# `make test` is the whole proof: static checks, unit and integration tests, bundle goldens,
# then the real single-node cluster (needs root on Linux) and the end-to-end tests on it.
SHELL := /bin/bash
GO ?= go
# -trimpath for every build and test: no path of this clone in a binary, so the Go build cache serves a
# clone at another path (CI's clean clones) as it serves this one. bundle.Root finds the tree from the
# working directory for that reason.
export GOFLAGS := $(strip -trimpath $(GOFLAGS))
BIN := bin
PKGS := ./...
# A count, not a duration: Go 1.26's fuzz coordinator can report a bare "context deadline exceeded" at
# the end of a -fuzztime duration when a worker is slow to stop (golang/go#75804, fixed in Go 1.27); a
# count has no deadline to race. 10000 inputs take 1-7 s per target here.
FUZZTIME ?= 10000x
E2E := e2e/cluster.sh
# Built Kubernetes, runtimes and Flux controllers are cached in IMAGE_PREFETCHER_CACHE (the e2e
# scripts' default too); the CLI tools the tests run (staticcheck, kustomize) in
# IMAGE_PREFETCHER_TOOLS, which .ci/run points at an empty directory so that every run proves
# each target installs what it needs.
CACHE := $(or $(IMAGE_PREFETCHER_CACHE),$(HOME)/.cache/image-prefetcher)
TOOLS := $(or $(IMAGE_PREFETCHER_TOOLS),$(CACHE)/tools)

.PHONY: all build test check shellcheck unit fuzz e2e e2e-disk-budget e2e-cri-o e2e-containerd-1.6 e2e-fleet cluster-up cluster-down demo bench golden clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='$(LDFLAGS)' -o $(BIN)/image-prefetcher ./agent/cmd/image-prefetcher
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='$(LDFLAGS)' -o $(BIN)/image-prefetcher-fn ./fn/cmd/image-prefetcher-fn

# Everything, from cheap to real. CI runs exactly this. Needs root on Linux for the real cluster;
# `make unit` is the quick loop without it.
test: flux-prepare check fuzz e2e e2e-disk-budget e2e-cri-o e2e-containerd-1.6 e2e-fleet

# Static checks (gofmt, vet, a tidy go.mod, staticcheck), then the tests of every package but the
# real-cluster ones under e2e/: with the race detector, but for the trees of single-goroutine rendering
# code (NORACE: the KRM function, the bundle builds, the image builder), whose race builds of kustomize
# and kyaml cost minutes on a cold machine and find nothing. Tests that need the cluster skip here.
STATICCHECK_VERSION ?= v0.8.2
STATICCHECK := $(TOOLS)/staticcheck-$(STATICCHECK_VERSION)/staticcheck
NORACE := /fn /bundle /build /internal
UNIT_PKGS = $(GO) list $(PKGS) | grep -v '/e2e'
NORACE_MATCH := $(foreach d,$(NORACE),-e 'image-prefetcher$(d)\(/\|$$\)')

check: $(STATICCHECK) fn-tools shellcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) mod tidy -diff
	$(STATICCHECK) $(PKGS)
	KUSTOMIZE=$(FN_TOOLS)/kustomize $(GO) test -race -count=1 $$($(UNIT_PKGS) | grep -v $(NORACE_MATCH))
	KUSTOMIZE=$(FN_TOOLS)/kustomize $(GO) test -count=1 $$($(UNIT_PKGS) | grep $(NORACE_MATCH))

# The harness's shell scripts (e2e/cluster.sh and the files it sources, the build scripts). shellcheck is
# Debian's (not a Go tool): installed when missing, which needs root like the e2e targets.
shellcheck:
	@command -v shellcheck >/dev/null || { [ "$$(id -u)" = 0 ] || { echo "shellcheck is missing: run make check as root, or apt-get install shellcheck"; exit 1; }; \
	  echo "installing Debian's shellcheck"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null; }
	shellcheck -x $$(git ls-files '*.sh')

$(STATICCHECK):
	GOBIN=$(dir $(STATICCHECK)) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

unit:
	$(GO) test -count=1 $(PKGS)

# Short runs of every native fuzz test (a fuzz target per parser of outside input).
fuzz:
	@set -e; for pkg in $$($(GO) list $(PKGS)); do \
	  dir=$$($(GO) list -f '{{.Dir}}' $$pkg); \
	  for f in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go 2>/dev/null | sed 's/func //'); do \
	    echo "fuzz $$pkg $$f"; $(GO) test -run='^$$' -fuzz="^$$f\$$" -fuzztime=$(FUZZTIME) $$pkg; \
	  done; \
	done

# Brings the real single-node cluster up on containerd 2.x (the default runtime), runs the tests of
# the packages with real-component tests (e2e/ and those whose tests use e2e/clusterenv; they fail, not
# skip, when the cluster is missing), then Flux's controllers and libraries on the same cluster
# (make/flux.mk), and tears the cluster down.
E2E_PKGS = $(GO) list -f '{{.ImportPath}} {{join .TestImports " "}} {{join .XTestImports " "}}' $(PKGS) | \
  awk '$$1 ~ /\/e2e(\/|$$)/ || / [^ ]*\/e2e\/clusterenv( |$$)/ {print $$1}'

e2e: fn-tools flux-controllers
	@set -e; trap '$(E2E) down' EXIT; $(PREBUILD_PREVIOUS_K8S); IMAGE_PREFETCHER_E2E_RUNTIME=containerd $(E2E) up; \
	  IMAGE_PREFETCHER_E2E=1 KUSTOMIZE=$(FN_TOOLS)/kustomize $(GO) test -count=1 -timeout 45m \
	    -skip '^($(E2E_DISK_BUDGET_TESTS)|$(E2E_FLEET_TESTS))' $$($(E2E_PKGS)); \
	  $(MAKE) --no-print-directory e2e-flux

# The same cluster on the other runtimes users run, with the real tests that concern the runtime:
# the agent against it, what differs per runtime, and (CRI-O, deployed from overlays/ocp) the
# scenarios a node of that runtime must pass.
E2E_RUNTIME_TESTS := TestAgent|TestCRI|TestRuntime|TestNode|TestPod
# The other runtimes run on the previous Kubernetes minor (CRI-O's own minor), so the suite proves both:
# e2e/cluster.sh's default (the newest) with containerd 2.x, this one with CRI-O and containerd 1.6.
E2E_PREVIOUS_K8S := v1.35.4
# On a machine without it, that version is built in the background at the lowest priority while the
# containerd 2.x phase runs (mostly waiting on the cluster), instead of after it; e2e-cri-o's bring-up
# waits for that build (build-kubernetes.sh holds a lock per version) and says why if it failed.
PREBUILD_PREVIOUS_K8S = (K8S_VERSION=$(E2E_PREVIOUS_K8S) nice -n 19 e2e/build-kubernetes.sh >/dev/null 2>&1 &)
E2E_CRIO_SCENARIOS := TestScenario(QuickStart|MissingTag|PrivateImage|RecheckRepullsRemovedImage|WorkloadImages)

# The progress tests are left out on CRI-O: it shows no pull progress (the agent's escalating timeouts apply).
e2e-cri-o: fn-tools
	@set -e; trap '$(E2E) down' EXIT; K8S_VERSION=$(E2E_PREVIOUS_K8S) IMAGE_PREFETCHER_E2E_RUNTIME=cri-o $(E2E) up; \
	  IMAGE_PREFETCHER_E2E=1 KUSTOMIZE=$(FN_TOOLS)/kustomize $(GO) test -count=1 -timeout 30m -run '^($(E2E_RUNTIME_TESTS)|$(E2E_CRIO_SCENARIOS)$$)' \
	    -skip '^TestAgentProgress' ./e2e/

# containerd 2.x whose image store is a filesystem of its own, too small for the list: the disk budget.
# The runtime alone (no Kubernetes): the agent runs as `fetch` on the host.
E2E_DISK_BUDGET_TESTS := TestDiskBudget
E2E_IMAGE_FS_SIZE := 128M

e2e-disk-budget:
	@set -e; trap '$(E2E) down' EXIT; IMAGE_PREFETCHER_E2E_RUNTIME=containerd \
	  IMAGE_PREFETCHER_E2E_IMAGE_FS_SIZE=$(E2E_IMAGE_FS_SIZE) $(E2E) up runtime; \
	  IMAGE_PREFETCHER_E2E=1 $(GO) test -count=1 -timeout 10m -v -run '^($(E2E_DISK_BUDGET_TESTS))' ./e2e/

e2e-containerd-1.6:
	@set -e; trap '$(E2E) down' EXIT; K8S_VERSION=$(E2E_PREVIOUS_K8S) IMAGE_PREFETCHER_E2E_RUNTIME=containerd-1.6 $(E2E) up; \
	  IMAGE_PREFETCHER_E2E=1 $(GO) test -count=1 -timeout 30m -run '^($(E2E_RUNTIME_TESTS))' ./e2e/

# The fleet: one cluster of nodes of every runtime (the first node containerd 2.x on Kubernetes's newest
# kubelet; the others, each in a network and mount namespace of its own, CRI-O and containerd 1.6 on the
# previous minor's), instances from the default overlay. The tests add and kill nodes of their own: among
# them a node whose kubelet collects every unused image and one that registers with a startup taint (the
# startup-taint gate). The image-GC test waits minutes for the kubelet's collection, so it runs as a go test
# of its own beside the other fleet tests and Flux's; its output follows theirs.
E2E_FLEET := cri-o containerd-1.6
E2E_FLEET_TESTS := TestFleet
E2E_FLEET_GC_TESTS := TestFleetImageGC

e2e-fleet: fn-tools flux-controllers
	@set -e; gc=; gclog=$$(mktemp); \
	  trap 'if [ -n "$$gc" ]; then kill $$gc 2>/dev/null; wait $$gc; fi; cat $$gclog; rm -f $$gclog; $(E2E) down' EXIT; \
	  IMAGE_PREFETCHER_E2E_RUNTIME=containerd IMAGE_PREFETCHER_E2E_FLEET='$(E2E_FLEET)' \
	  IMAGE_PREFETCHER_E2E_FLEET_OLDER_KUBE_VERSION=$(E2E_PREVIOUS_K8S) $(E2E) up; \
	  IMAGE_PREFETCHER_E2E=1 KUSTOMIZE=$(FN_TOOLS)/kustomize $(GO) test -count=1 -timeout 30m -v -run '^($(E2E_FLEET_GC_TESTS))' ./e2e/ >$$gclog 2>&1 & gc=$$!; \
	  IMAGE_PREFETCHER_E2E=1 KUSTOMIZE=$(FN_TOOLS)/kustomize $(GO) test -count=1 -timeout 30m -v -run '^($(E2E_FLEET_TESTS))' \
	    -skip '^($(E2E_FLEET_GC_TESTS))' ./e2e/; \
	  $(MAKE) --no-print-directory e2e-flux-fleet; \
	  echo "e2e-fleet: waiting for $(E2E_FLEET_GC_TESTS)"; st=0; wait $$gc || st=$$?; gc=; exit $$st

cluster-up:
	$(E2E) up

cluster-down:
	$(E2E) down

clean:
	rm -rf $(BIN)

-include make/*.mk
