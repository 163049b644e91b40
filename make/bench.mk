# make bench: the pull benchmarks of docs/benchmarks.md on the real runtime (containerd + local registry)
# of the e2e harness. Root on Linux. Brings the runtime environment up when none is running (and stops it
# again afterwards); a running one (runtime or full) is reused and left running. Prints the Markdown table
# and keeps a copy in _output/bench/latest.md. BENCH_FLAGS passes flags to prefetchbench (-rounds,
# -delay, -mbit, -stall, -hold-after, -windows, -big-mbit, -big-cap, -artifact-mib, -artifact-mbit,
# -artifact-cap, -only (e.g. -only artifact: a 1 GiB OCI artifact through a slow link); see
# `go run ./bench/cmd/prefetchbench -h`).
BENCH_FLAGS ?=
BENCH_OUT := _output/bench

.PHONY: bench
bench:
	@set -eo pipefail; mkdir -p $(BENCH_OUT) $(BIN); \
	IMAGE_PREFETCHER_E2E_REUSE=1 CI=true $(E2E) up runtime >$(BENCH_OUT)/up.log 2>&1 || { cat $(BENCH_OUT)/up.log; exit 1; }; \
	if ! grep -q 'healthy; reusing it' $(BENCH_OUT)/up.log; then trap '$(E2E) down' EXIT; fi; \
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/image-prefetcher ./agent/cmd/image-prefetcher; \
	$(GO) build -o $(BIN)/prefetchbench ./bench/cmd/prefetchbench; \
	$(BIN)/prefetchbench -agent-bin $(BIN)/image-prefetcher $(BENCH_FLAGS) | tee $(BENCH_OUT)/latest.md.tmp; \
	mv $(BENCH_OUT)/latest.md.tmp $(BENCH_OUT)/latest.md
