#!/usr/bin/env bash
# The collector's pod history (issue 13) at PODS live pods and RATE pod
# watch events per second: heap bytes per live pod and per closed interval,
# CPU per event (Pod JSON parse + PodHistory::apply + journal), RSS.
# Drives collector/examples/pods_bench.rs; prints its report and keeps it in
# bench/results/pods-<time>.md.
#
#   bench/pods.sh [PODS=100000] [RATE=1000] [SECONDS=60] [PROFILE=release]
#
# PROFILE=dev runs the debug build (no release build needed; CPU figures are
# then several times the release ones, heap figures are the same).
set -euo pipefail
cd "$(dirname "$0")/.."
PODS=${1:-100000}; RATE=${2:-1000}; SECS=${3:-60}; PROFILE=${4:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -q -p ctw-collector --example pods_bench
  BIN=target/release/examples/pods_bench
else
  cargo build --locked -q -p ctw-collector --example pods_bench
  BIN=target/debug/examples/pods_bench
fi
W=$(mktemp -d /tmp/ctw-pods-bench.XXXXXX)
trap 'rm -rf "$W"' EXIT
mkdir -p bench/results
OUT=bench/results/pods-$(date -u +%Y%m%dT%H%M%SZ).md
{
  echo "# bench/pods.sh $PODS $RATE $SECS $PROFILE ($(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
  echo '```'
  "$BIN" "$PODS" "$RATE" "$SECS" "$W/pods"
  echo '```'
} | tee "$OUT"
