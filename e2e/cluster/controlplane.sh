# shellcheck shell=bash disable=SC2153  # STATE, SOCK, PIDS, LOGS, PKI and the rest come from e2e/cluster.sh
# The control plane: PKI, kubeconfigs, etcd, kube-apiserver, kube-controller-manager, kube-scheduler;
# sourced by e2e/cluster.sh.

cert() { # cert <name> <subject> <extfile>: a key and a certificate signed by the CA, in the current directory
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile "$3" -extensions ext -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}

gen_pki() {
  # kept while the CA is valid for a day and the API server's certificate names the fleet gateway too
  if [ -f "$PKI/ca.crt" ] && openssl x509 -checkend 86400 -noout -in "$PKI/ca.crt" >/dev/null 2>&1 &&
    openssl x509 -noout -ext subjectAltName -in "$PKI/apiserver.crt" 2>/dev/null | grep -q "IP Address:$FLEET_GW\b"; then
    return 0
  fi
  log "generating PKI"
  rm -rf "$PKI"; mkdir -p "$PKI"
  (
    cd "$PKI" || exit 1
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -subj /CN=image-prefetcher-e2e-ca -days 365 -out ca.crt 2>/dev/null
    printf '[ext]\nsubjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.0.0.1,IP:%s\nextendedKeyUsage=serverAuth\n' "$FLEET_GW" >server.cnf
    printf '[ext]\nextendedKeyUsage=clientAuth\n' >client.cnf
    cert apiserver /CN=kube-apiserver server.cnf
    cert admin "/O=system:masters/CN=e2e-admin" client.cnf
    cert node "/O=system:nodes/CN=system:node:$NODE_NAME" client.cnf
    cert controller-manager "/CN=system:kube-controller-manager" client.cnf
    cert scheduler "/CN=system:kube-scheduler" client.cnf
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

kubeconfig() { # kubeconfig <file> <cert name> [server]
  (umask 077; cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: image-prefetcher-e2e
  cluster:
    server: ${3:-https://127.0.0.1:6443}
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$2.crt")
    client-key-data: $(base64 -w0 "$PKI/$2.key")
contexts:
- name: image-prefetcher-e2e
  context: {cluster: image-prefetcher-e2e, user: $2}
current-context: image-prefetcher-e2e
EOF
  )
}

api_get() { # api_get <path>: GET as admin
  curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "https://127.0.0.1:6443$1"
}

start_control_plane() {
  local kb=$1
  kubeconfig "$KUBECONFIG_ADMIN" admin
  kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
  kubeconfig "$STATE/scheduler.kubeconfig" scheduler
  kubeconfig "$STATE/node.kubeconfig" node
  start_bg etcd etcd --name image-prefetcher-e2e --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster image-prefetcher-e2e=http://127.0.0.1:2380 --unsafe-no-fsync
  wait_for 20 "etcd" etcd curl -sf http://127.0.0.1:2379/health
  # --endpoint-reconciler-type=none: the apiserver may then advertise 127.0.0.1.
  # The kubelet is reached on its InternalIP (the bridge address) with the admin client cert, so that
  # `kubectl logs` and exec work without node DNS.
  start_bg kube-apiserver "$kb/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=127.0.0.1 --secure-port=6443 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" --client-ca-file="$PKI/ca.crt" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true --cert-dir="$STATE/apiserver-certs" \
    --kubelet-client-certificate="$PKI/admin.crt" --kubelet-client-key="$PKI/admin.key" \
    --kubelet-preferred-address-types=InternalIP
  wait_for 90 "kube-apiserver /readyz" kube-apiserver sh -c "curl -sf --cacert '$PKI/ca.crt' https://127.0.0.1:6443/readyz | grep -qx ok"
  start_bg kube-scheduler "$kb/kube-scheduler" --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1
  # without the controller-manager: no default ServiceAccount, no DaemonSet pods
  start_bg kube-controller-manager "$kb/kube-controller-manager" --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" --use-service-account-credentials=true \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --controllers="$(controllers "$kb")"
}

# controllers <bin dir>: every controller but the node IPAM and the cloud ones (this node has no
# cloud); Kubernetes 1.37 dropped the cloud controllers from kube-controller-manager, and naming
# an unknown one is an error, so only those the binary knows are switched off.
controllers() {
  local c list='*,-nodeipam' help
  help=$("$1/kube-controller-manager" --help 2>&1 | tr -d '\n' || true)
  for c in cloud-node-lifecycle service-lb-controller node-route-controller; do
    case $help in *"$c"*) list="$list,-$c" ;; esac
  done
  echo "$list"
}

# kubelet_config <node IP> [cgroup root]: the kubelet's configuration; paths below the in-node $STATE/kubelet
