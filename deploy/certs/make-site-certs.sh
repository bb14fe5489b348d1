#!/bin/sh
# A CA, a collector certificate and one agent certificate per node, for a test
# or a small site outside Kubernetes (for Kubernetes see
# deploy/kubernetes/make-certs.sh). Re-running adds what is missing and keeps
# what exists (the CA above all: it signs every agent).
#
# Usage: make-site-certs.sh DIR COLLECTOR_DNS[,DNS...] [COLLECTOR_IP[,IP...]] -- NODE...
#   e.g. make-site-certs.sh /etc/conntrack-watch/pki ctw.example.org 10.0.0.5 -- node-1 node-2
# Writes DIR/ca.pem, DIR/ca-key.pem, DIR/collector.pem, DIR/collector-key.pem
# and DIR/NODE.pem, DIR/NODE-key.pem (keys mode 0600). The binary is taken
# from $CTW_COLLECTOR, else from PATH. Days of validity: $DAYS (default 365).
set -eu
bin=${CTW_COLLECTOR:-ctw-collector}
days=${DAYS:-365}
[ $# -ge 3 ] || { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
dir=$1; dns=$2; shift 2
ips=""
if [ "$1" != "--" ]; then ips=$1; shift; fi
[ "${1:-}" = "--" ] || { echo "expected -- before the node names" >&2; exit 2; }
shift
[ -f "$dir/ca.pem" ] || "$bin" certs init-ca --dir "$dir"
if [ ! -f "$dir/collector.pem" ]; then
  if [ -n "$ips" ]; then
    "$bin" certs issue --dir "$dir" --name collector --kind server --dns "$dns" --ip "$ips" --days "$days"
  else
    "$bin" certs issue --dir "$dir" --name collector --kind server --dns "$dns" --days "$days"
  fi
fi
for node in "$@"; do
  [ -f "$dir/$node.pem" ] || "$bin" certs issue --dir "$dir" --name "$node" --kind client --days "$days"
done
