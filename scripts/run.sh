#!/usr/bin/env bash
# Builds and runs conntrack-watch on this host: today the node agent
# (ctw-agent) with config/agent-local.yaml, its JSON log under ./run/ and its
# HTTP listener on :9358. Needs root (CAP_NET_ADMIN). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "run as root: the agent needs CAP_NET_ADMIN to read conntrack events" >&2
  exit 1
fi
if ! command -v conntrack >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq conntrack >/dev/null
fi
modprobe nf_conntrack 2>/dev/null || true
modprobe nf_conntrack_netlink 2>/dev/null || true
cargo build --release --locked -p ctw-agent
mkdir -p run
cfg=${CTW_AGENT_CONFIG:-config/agent-local.yaml}
echo "ctw-agent: config $cfg, log run/nat.log, http://127.0.0.1:9358/ (query page), /metrics, /api/conntrack/query"
exec target/release/ctw-agent --config "$cfg"
