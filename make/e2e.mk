# The end-to-end demo and scenario tests (included by the top-level Makefile).
#   make demo          a real single-node cluster on this machine (root, Linux), overlays/vanilla
#                      deployed on it with the e2e layer and a sample list of the harness's images
#   make e2e-scenarios the scenario tests only, on an environment that is already up
#   make cluster-down  tears the demo down
# The demo reuses a healthy running environment (IMAGE_PREFETCHER_E2E_REUSE=1) instead of
# replacing it, so it is safe on a machine where others test.

DEMO_INSTANCE ?= demo-images
DEMO_NAMESPACE ?= prefetch-demo
DEMO_IMAGES ?= e2e/family:a e2e/family:b e2e/family:c e2e/random:4mib e2e/random:8mib
DEMO_REGISTRY ?= 127.0.0.1:5000

.PHONY: demo e2e-scenarios

demo:
	IMAGE_PREFETCHER_E2E_REUSE=1 $(E2E) up
	@set -e; . $${IMAGE_PREFETCHER_E2E_STATE:-/var/tmp/image-prefetcher-e2e}/env.sh; \
	  echo "deploying overlays/vanilla as instance $(DEMO_INSTANCE) in namespace $(DEMO_NAMESPACE)"; \
	  $(GO) run ./e2e/cmd/instance -instance $(DEMO_INSTANCE) -namespace $(DEMO_NAMESPACE) \
	    $(foreach i,$(DEMO_IMAGES),-image $(DEMO_REGISTRY)/$(i)) | kubectl apply -f -; \
	  kubectl -n $(DEMO_NAMESPACE) rollout status daemonset/$(DEMO_INSTANCE) --timeout=5m; \
	  echo; kubectl get nodes -L image-prefetcher.stackrox.io/$(DEMO_INSTANCE); echo; \
	  echo "The node is labelled image-prefetcher.stackrox.io/$(DEMO_INSTANCE)=succeeded: every image of the list is on it."; \
	  echo "Try it:   export KUBECONFIG=$$KUBECONFIG"; \
	  echo "          kubectl -n $(DEMO_NAMESPACE) get pods,configmaps"; \
	  echo "          kubectl get events -n default --field-selector involvedObject.kind=Node"; \
	  echo "Remove the instance only:  kubectl delete namespace $(DEMO_NAMESPACE); kubectl delete clusterrole,clusterrolebinding image-prefetcher.$(DEMO_NAMESPACE).$(DEMO_INSTANCE)"; \
	  echo "                           kubectl label nodes --all image-prefetcher.stackrox.io/$(DEMO_INSTANCE)-; kubectl annotate nodes --all list.image-prefetcher.stackrox.io/$(DEMO_INSTANCE)-"; \
	  echo "Tear the whole cluster down (stops every process, removes mounts, bridge, cgroups):  make cluster-down"

e2e-scenarios:
	IMAGE_PREFETCHER_E2E=1 $(GO) test -count=1 -timeout 20m -run '^TestScenario' -v ./e2e/
