# shellcheck shell=bash disable=SC2153  # STATE, SOCK, PIDS, LOGS, PKI and the rest come from e2e/cluster.sh
# The two registries, the test images and the agent image pushed to them; sourced by e2e/cluster.sh.

start_registries() {
  local r=$STATE/registry
  mkdir -p "$r/data" "$r/data-auth"
  if [ ! -s "$r/password" ]; then
    (umask 077; openssl rand -hex 16 >"$r/password")
  fi
  htpasswd -Bbn "$AUTH_USER" "$(cat "$r/password")" >"$r/htpasswd"
  (umask 077; printf '{"auths":{"%s":{"auth":"%s"}}}\n' "$AUTH_REGISTRY" \
    "$(printf '%s:%s' "$AUTH_USER" "$(cat "$r/password")" | base64 -w0)" >"$r/auth-dockerconfig.json")
  for name in registry registry-auth; do
    # the plain registry's access log counts what it serves (a fleet's mirror fetches from it)
    local addr=$REGISTRY data=$r/data auth="" nolog=false
    if [ $name = registry-auth ]; then
      addr=$AUTH_REGISTRY data=$r/data-auth nolog=true
      auth="auth: {htpasswd: {realm: image-prefetcher-e2e, path: $r/htpasswd}}"
    fi
    cat >"$r/$name.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: $nolog}}
storage: {filesystem: {rootdirectory: $data}, delete: {enabled: true}}
http: {addr: $addr}
$auth
EOF
    start_bg $name docker-registry serve "$r/$name.yml"
  done
  wait_for 20 "registry on $REGISTRY" registry curl -sf "http://$REGISTRY/v2/"
  # 401 is the healthy answer of the auth registry to an anonymous request
  wait_for 20 "registry on $AUTH_REGISTRY" registry-auth sh -c "curl -s -o /dev/null -w '%{http_code}' http://$AUTH_REGISTRY/v2/ | grep -qx 401"
}

push_test_images() {
  log "pushing test images (deterministic; unchanged ones are skipped)"
  "$BIN/testimages" --registry "$REGISTRY" --auth-registry "$AUTH_REGISTRY" --auth-user "$AUTH_USER" \
    --auth-password-file "$STATE/registry/password" --out "$STATE/images.json"
}


# ---------------------------------------------------------------- the agent image (built by the bundle's builder)
# Hook for the agent's OCI image: the bundle's Makefile target `image-push` builds it without Docker and pushes
# it to the given registry. IMAGE_PREFETCHER_E2E_AGENT_IMAGE: auto = push when the target exists (default),
# 1 = required (fail if it cannot), 0 = skip. Also callable alone: `e2e/cluster.sh push-agent-image`.
push_agent_image() {
  case $AGENT_IMAGE_MODE in 0) return 0 ;; esac
  if ! make -C "$ROOT" -n image-push REGISTRY="$REGISTRY" >/dev/null 2>&1; then
    [ "$AGENT_IMAGE_MODE" = 1 ] && die "no 'make image-push' target in $ROOT/Makefile to build the agent image"
    log "no 'make image-push' target yet: agent image not pushed"
    return 0
  fi
  # The nodes here are all of the host's architecture: the other platforms of a release build
  # would only cost compile time (build/ociimage's tests cover a multi-platform index).
  local platform
  platform="linux/$(go env GOARCH)"
  log "building and pushing the agent image: make image-push REGISTRY=$REGISTRY PLATFORMS=$platform"
  make -C "$ROOT" image-push REGISTRY="$REGISTRY" PLATFORMS="$platform" >"$LOGS/agent-image.log" 2>&1 ||
    { tail -n 30 "$LOGS/agent-image.log" >&2; die "make image-push failed (log: $LOGS/agent-image.log)"; }
  # the builder prints the pushed digest reference last; tests deploy exactly that
  grep -E "^$REGISTRY/[^ ]+@sha256:[0-9a-f]{64}\$" "$LOGS/agent-image.log" | tail -n 1 >"$STATE/agent-image-pushed" || true
  [ -s "$STATE/agent-image-pushed" ] || log "make image-push did not print a $REGISTRY/...@sha256: reference; IMAGE_PREFETCHER_E2E_AGENT_IMAGE stays empty"
}
