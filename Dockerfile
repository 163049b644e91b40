# syntax=docker/dockerfile:1
# The image-prefetcher image: the node agent and the KRM function, static, on an empty base.
# build/ociimage builds the same contents without a Docker engine (make image / image-push).
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/image-prefetcher:TAG .

ARG GO_VERSION=1.26

# The builder runs on the build machine's platform and cross-compiles (no emulation).
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION} AS build
ARG TARGETOS
ARG TARGETARCH
# Stamped into the binaries (`image-prefetcher version`); make image-push passes the same values.
ARG VERSION=dev
ARG COMMIT=unknown
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Every main package that exists goes in: the agent always, the KRM function once fn/ has it.
RUN set -e; mkdir -p /out/usr/local/bin /out/etc; \
    for cmd in agent/cmd/image-prefetcher fn/cmd/image-prefetcher-fn; do \
      if [ "$cmd" = agent/cmd/image-prefetcher ] || [ -d "$cmd" ]; then \
        CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
          go build -trimpath -ldflags="-s -w -X github.com/nodeprefetch/image-prefetcher/agent/app.Version=$VERSION -X github.com/nodeprefetch/image-prefetcher/agent/app.Commit=$COMMIT" -o /out/usr/local/bin/$(basename $cmd) ./$cmd; \
      fi; \
    done; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > /out/etc/passwd; \
    printf 'root:x:0:\nnonroot:x:65532:\n' > /out/etc/group

# scratch: nothing but our static binaries, the users and the CA certificates (kubelet
# credential provider plugins run inside this container and call cloud APIs over TLS).
FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
# Non-root by default: the KRM function needs nothing more. The DaemonSet asks for uid 0
# explicitly, because containerd's and CRI-O's sockets are root:root 0660, and drops every
# capability.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/image-prefetcher"]
