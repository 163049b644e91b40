# Generated code (included by the top-level Makefile).
#   make generate    regenerate the gRPC/protobuf Go code of api/ with the pinned generators
#                    (versions in api/generate.sh); api/results/v1's TestGeneratedCodeIsCurrent
#                    fails in `make test` when the committed code is stale.

.PHONY: generate

generate:
	api/generate.sh
