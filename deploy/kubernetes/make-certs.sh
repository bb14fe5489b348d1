#!/usr/bin/env bash
# Certificates and the API token for conntrack-watch in Kubernetes.
#
# Every agent needs a client certificate whose first DNS name is its node's
# name (the collector refuses an agent that claims another node). A DaemonSet
# has one pod template for every node, so the per-node Secrets are projected
# into one volume, one directory per node (<node>/ca.crt, tls.crt, tls.key),
# and the agent's init container links its own node's directory to a fixed
# path. This script writes, into the overlay's generated/ directory:
#
#   --mode static (default), for small clusters without cert-manager:
#     secrets.yaml          CA-signed Secrets made with `ctw-collector certs`
#                           and `kubectl create secret --dry-run=client`:
#                           ctw-collector-tls and one ctw-agent-<node> per node
#     pki/                  the CA and every key (keep it to add nodes later;
#                           keep it private: ca-key.pem signs agents)
#   --mode cert-manager:
#     agent-certificates.yaml   one cert-manager Certificate per node
#   both modes:
#     agent-tls-volume.yaml     the DaemonSet patch projecting the node Secrets
#     token-secret.yaml         Secret ctw-collector-token (made once, kept)
#
# Then: kubectl apply -k deploy/kubernetes/<static-certs|cert-manager>
# When a node joins, run the script again and apply again: existing
# certificates, keys and the token are kept, the new node gets its own.
#
# Usage: make-certs.sh [--mode static|cert-manager] [--nodes "n1 n2 ..."]
#                      [--out DIR] [--namespace NS] [--collector-dns a,b]
#                      [--days N]
# Nodes default to `kubectl get nodes`. The `ctw-collector` binary is taken
# from $CTW_COLLECTOR, else from PATH.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
mode=static
nodes=""
out=""
ns=conntrack-watch
extra_dns=""
days=365

die() { echo "make-certs.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode=${2:?--mode needs a value}; shift 2 ;;
    --nodes) nodes=${2:?--nodes needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    --namespace) ns=${2:?--namespace needs a value}; shift 2 ;;
    --collector-dns) extra_dns=${2:?--collector-dns needs a value}; shift 2 ;;
    --days) days=${2:?--days needs a value}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

case "$mode" in
  static) out=${out:-$here/static-certs/generated} ;;
  cert-manager) out=${out:-$here/cert-manager/generated} ;;
  *) die "--mode: expected static or cert-manager, got '$mode'" ;;
esac

if [ -z "$nodes" ]; then
  command -v kubectl >/dev/null || die "no --nodes given and no kubectl to list them"
  nodes=$(kubectl get nodes -o jsonpath='{.items[*].metadata.name}')
fi
# shellcheck disable=SC2206 # node names contain no spaces or globs
node_list=($nodes)
[ ${#node_list[@]} -gt 0 ] || die "no nodes"
for n in "${node_list[@]}"; do
  # A node name is a DNS subdomain; it becomes a Secret name and a file name.
  [[ "$n" =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]] || die "not a node name: '$n'"
  case "$n" in ca|ctw-collector) die "node name '$n' clashes with a file name of the CA directory" ;; esac
done

svc_dns="ctw-collector,ctw-collector.$ns,ctw-collector.$ns.svc,ctw-collector.$ns.svc.cluster.local"
[ -z "$extra_dns" ] || svc_dns="$svc_dns,$extra_dns"

mkdir -p "$out"
umask 077

# The Secret's name for a node's certificate.
secret_of() { echo "ctw-agent-$1"; }

write_patch() {
  {
    echo "# Written by make-certs.sh for: ${node_list[*]}"
    echo "# Projects each node's certificate Secret into <node>/ of the agent-tls volume."
    echo "apiVersion: apps/v1"
    echo "kind: DaemonSet"
    echo "metadata:"
    echo "  name: ctw-agent"
    echo "spec:"
    echo "  template:"
    echo "    spec:"
    echo "      volumes:"
    echo "        - name: agent-tls"
    echo "          projected:"
    echo "            defaultMode: 0400"
    echo "            sources:"
    for n in "${node_list[@]}"; do
      echo "              - secret:"
      echo "                  name: $(secret_of "$n")"
      echo "                  items:"
      for k in ca.crt tls.crt tls.key; do
        echo "                    - key: $k"
        echo "                      path: $n/$k"
      done
    done
  } >"$out/agent-tls-volume.yaml"
}

write_token() {
  local f="$out/token-secret.yaml"
  if [ -f "$f" ]; then
    echo "kept $f"
    return
  fi
  local token
  token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  cat >"$f" <<EOF
# Written by make-certs.sh: the bearer token of the collector's API and UI.
apiVersion: v1
kind: Secret
metadata:
  name: ctw-collector-token
  namespace: $ns
type: Opaque
stringData:
  token: "$token"
EOF
  echo "wrote $f (read the token with: kubectl -n $ns get secret ctw-collector-token -o jsonpath='{.data.token}' | base64 -d)"
}

static_mode() {
  local bin=${CTW_COLLECTOR:-ctw-collector}
  command -v "$bin" >/dev/null || die "ctw-collector not found (set CTW_COLLECTOR=/path/to/ctw-collector)"
  command -v kubectl >/dev/null || die "kubectl is needed to write the Secrets"
  local pki="$out/pki"
  mkdir -p "$pki"
  if [ ! -f "$pki/ca.pem" ]; then
    "$bin" certs init-ca --dir "$pki"
  fi
  if [ ! -f "$pki/ctw-collector.pem" ]; then
    "$bin" certs issue --dir "$pki" --name ctw-collector --kind server --dns "$svc_dns" --days "$days"
  fi
  for n in "${node_list[@]}"; do
    if [ ! -f "$pki/$n.pem" ]; then
      "$bin" certs issue --dir "$pki" --name "$n" --kind client --days "$days"
    fi
  done
  local f="$out/secrets.yaml"
  {
    echo "# Written by make-certs.sh from $pki: private keys inside. Never commit."
    kubectl create secret generic ctw-collector-tls --namespace "$ns" \
      --from-file=ca.crt="$pki/ca.pem" \
      --from-file=tls.crt="$pki/ctw-collector.pem" \
      --from-file=tls.key="$pki/ctw-collector-key.pem" \
      --dry-run=client -o yaml
    for n in "${node_list[@]}"; do
      echo "---"
      kubectl create secret generic "$(secret_of "$n")" --namespace "$ns" \
        --from-file=ca.crt="$pki/ca.pem" \
        --from-file=tls.crt="$pki/$n.pem" \
        --from-file=tls.key="$pki/$n-key.pem" \
        --dry-run=client -o yaml
    done
  } >"$f"
  echo "wrote $f (${#node_list[@]} node certificates, CA and keys in $pki)"
}

cert_manager_mode() {
  local f="$out/agent-certificates.yaml"
  {
    echo "# Written by make-certs.sh: one client certificate per node, signed by"
    echo "# the Issuer ctw-ca-issuer (ca-issuer.yaml). First DNS name = node name."
    local first=1
    for n in "${node_list[@]}"; do
      [ $first = 1 ] || echo "---"
      first=0
      cat <<EOF
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: $(secret_of "$n")
  namespace: $ns
spec:
  secretName: $(secret_of "$n")
  commonName: $n
  dnsNames:
    - $n
  usages:
    - digital signature
    - client auth
  duration: 2160h
  renewBefore: 720h
  privateKey:
    algorithm: ECDSA
    size: 256
    rotationPolicy: Always
  issuerRef:
    kind: Issuer
    name: ctw-ca-issuer
EOF
    done
  } >"$f"
  echo "wrote $f (${#node_list[@]} Certificates)"
}

case "$mode" in
  static) static_mode ;;
  cert-manager) cert_manager_mode ;;
esac
write_patch
echo "wrote $out/agent-tls-volume.yaml"
write_token
