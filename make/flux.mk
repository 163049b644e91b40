# Flux's own code reconciling the bundle on the e2e cluster (included by the top-level Makefile).
#   make flux-controllers  Flux's source-controller and kustomize-controller of one release, built once
#                          into the cache with their CRDs (e2e/flux/build-controllers.sh)
#   make flux-prepare      only their build modules (the downloads, 2.5 min on a fresh machine), in the
#                          background at the lowest priority: make test starts it first, so the downloads
#                          overlap make check, and the build waits for it (the script holds a lock)
#   make e2e-flux          the checks and tests of the e2e/flux module (a module of its own, so the
#                          product's dependency pins do not move) on the running cluster; `make e2e`
#                          runs it after the main tests, on the same cluster; the fleet's tests
#                          (TestFleet*) are left to `make e2e-fleet`, which runs them on its cluster
#                          through `make e2e-flux-fleet`
FLUX_MOD := e2e/flux

.PHONY: flux-controllers flux-prepare e2e-flux e2e-flux-fleet

flux-prepare:
	@(nice -n 19 $(FLUX_MOD)/build-controllers.sh --prepare >/dev/null 2>&1 &)

flux-controllers:
	@$(FLUX_MOD)/build-controllers.sh >/dev/null

e2e-flux: flux-controllers $(STATICCHECK)
	cd $(FLUX_MOD) && $(GO) vet ./... && $(GO) mod tidy -diff && $(STATICCHECK) ./...
	@set -e; dir=$$($(FLUX_MOD)/build-controllers.sh); cd $(FLUX_MOD); \
	  IMAGE_PREFETCHER_E2E=1 IMAGE_PREFETCHER_FLUX_CONTROLLERS=$$dir $(GO) test -count=1 -timeout 30m -v -skip '^($(E2E_FLEET_TESTS))' ./...

e2e-flux-fleet: flux-controllers
	@set -e; dir=$$($(FLUX_MOD)/build-controllers.sh); cd $(FLUX_MOD); \
	  IMAGE_PREFETCHER_E2E=1 IMAGE_PREFETCHER_FLUX_CONTROLLERS=$$dir $(GO) test -count=1 -timeout 30m -v -run '^($(E2E_FLEET_TESTS))' ./...
