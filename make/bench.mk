# make bench: bench-pulls, then bench-fleet.
#
# make bench-pulls: the pull benchmarks of docs/benchmarks.md on the real runtime (containerd + local registry)
# of the e2e harness. Root on Linux. Brings the runtime environment up when none is running (and stops it
# again afterwards); a running one (runtime or full) is reused and left running. Prints the Markdown table
# and keeps a copy in _output/bench/latest.md. BENCH_FLAGS passes flags to prefetchbench (-rounds,
# -delay, -mbit, -stall, -hold-after, -windows, -big-mbit, -big-cap, -artifact-mib, -artifact-mbit,
# -artifact-cap, -only (e.g. -only artifact: a 1 GiB OCI artifact through a slow link); see
# `go run ./bench/cmd/prefetchbench -h`).
BENCH_FLAGS ?=
BENCH_OUT := _output/bench

.PHONY: bench bench-pulls bench-fleet
bench: bench-pulls bench-fleet

bench-pulls:
	@set -eo pipefail; mkdir -p $(BENCH_OUT) $(BIN); \
	IMAGE_PREFETCHER_E2E_REUSE=1 CI=true $(E2E) up runtime >$(BENCH_OUT)/up.log 2>&1 || { cat $(BENCH_OUT)/up.log; exit 1; }; \
	if ! grep -q 'healthy; reusing it' $(BENCH_OUT)/up.log; then trap '$(E2E) down' EXIT; fi; \
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/image-prefetcher ./agent/cmd/image-prefetcher; \
	$(GO) build -o $(BIN)/prefetchbench ./bench/cmd/prefetchbench; \
	$(BIN)/prefetchbench -agent-bin $(BIN)/image-prefetcher $(BENCH_FLAGS) | tee $(BENCH_OUT)/latest.md.tmp; \
	mv $(BENCH_OUT)/latest.md.tmp $(BENCH_OUT)/latest.md

# make bench-fleet: the fleet rollout benchmark (docs/benchmarks.md, "Fleet rollout"): a full cluster whose
# first node runs the control plane, and BENCH_FLEET's nodes (each in namespaces of its own, its link capped)
# that the rollouts go to. Always a fresh cluster, stopped afterwards. BENCH_FLEET_FLAGS passes flags to
# prefetchbench (-rounds, -fleet-images, -fleet-mbit, -fleet-upstream-mbit). Keeps a copy in _output/bench/fleet.md.
BENCH_FLEET ?= containerd containerd containerd containerd
BENCH_FLEET_FLAGS ?= -rounds 3

bench-fleet:
	@set -eo pipefail; mkdir -p $(BENCH_OUT) $(BIN); trap '$(E2E) down' EXIT; \
	IMAGE_PREFETCHER_E2E_RUNTIME=containerd IMAGE_PREFETCHER_E2E_FLEET='$(BENCH_FLEET)' CI=true $(E2E) up >$(BENCH_OUT)/up-fleet.log 2>&1 || \
	  { tail -n 50 $(BENCH_OUT)/up-fleet.log; exit 1; }; \
	$(GO) build -o $(BIN)/prefetchbench ./bench/cmd/prefetchbench; \
	$(BIN)/prefetchbench -only fleet $(BENCH_FLEET_FLAGS) | tee $(BENCH_OUT)/fleet.md.tmp; \
	mv $(BENCH_OUT)/fleet.md.tmp $(BENCH_OUT)/fleet.md
