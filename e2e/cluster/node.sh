# shellcheck shell=bash disable=SC2153  # STATE, SOCK, PIDS, LOGS, PKI and the rest come from e2e/cluster.sh
# The first node's kubelet and the configuration every node's kubelet shares; sourced by e2e/cluster.sh.

# kubelet_config <address> [cgroup root] [image gc: 1 = collect every unused image]
kubelet_config() {
  local k=$STATE/kubelet
  cat <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $1
${2:+cgroupRoot: $2}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}, x509: {clientCAFile: $PKI/ca.crt}}
authorization: {mode: AlwaysAllow}
# this VM is cgroup v1, which kubelets >= 1.35 refuse unless told otherwise
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$SOCK
failSwapOn: false
podLogsDir: $k/pod-logs
resolvConf: /etc/resolv.conf
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"}
$(if [ "${3:-}" = 1 ]; then cat <<'GC'
# image GC on (IMAGE_PREFETCHER_E2E_IMAGE_GC=1, add-node --image-gc): any disk usage is over the threshold
# and no image is too young, so every GC run (at the kubelet's start, then every 5 minutes) removes every
# image that no container uses and the runtime does not report pinned
imageGCHighThresholdPercent: 1
imageGCLowThresholdPercent: 0
imageMinimumGCAge: 0s
GC
else cat <<'GC'
# image GC would remove prefetched images behind the tests' backs: off
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
GC
fi)
serializeImagePulls: false
rotateCertificates: false
EOF
}

start_kubelet() {
  local kb=$1 k=$STATE/kubelet
  mkdir -p "$k/root" "$k/pki" "$k/pod-logs"
  kubelet_config "$NODE_IP" "" "$IMAGE_GC" >"$k/config.yaml"
  start_bg kubelet "$kb/kubelet" --config="$k/config.yaml" --kubeconfig="$STATE/node.kubeconfig" \
    --root-dir="$k/root" --cert-dir="$k/pki" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    ${NODE_TAINTS:+--register-with-taints="$NODE_TAINTS"}
  wait_for 90 "node $NODE_NAME Ready" kubelet sh -c \
    "$(declare -f api_get); PKI='$PKI'; api_get /api/v1/nodes/$NODE_NAME | tr -d ' \n' | grep -q '\"type\":\"Ready\",\"status\":\"True\"'"
  # pods need the default ServiceAccount, which the controller-manager creates
  wait_for 60 "default ServiceAccount" kube-controller-manager sh -c \
    "$(declare -f api_get); PKI='$PKI'; api_get /api/v1/namespaces/default/serviceaccounts/default"
}
