#!/usr/bin/env bash
# One agent streaming RATE records/s to the collector over a link with a
# 50 ms round trip (a delaying proxy: this kernel has no netem), into the
# tantivy store. Reports what was acked, the tail after sending stopped, and
# the collector's CPU per record (gRPC ingest + WAL + index).
#
#   bench/uplink.sh [RATE=100000] [SECONDS=20] [DELAY_MS=25]
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-100000}; SECS=${2:-20}; DELAY=${3:-25}
cargo build --release --locked -q -p ctw-collector -p ctw-loadgen
cargo build --release --locked -q -p ctw-agent --example uplink_bench
BIN=target/release
W=$(mktemp -d /tmp/ctw-uplink-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
$BIN/ctw-collector certs init-ca --dir "$W/tls" >/dev/null
$BIN/ctw-collector certs issue --dir "$W/tls" --name collector --kind server --dns localhost --ip 127.0.0.1 >/dev/null
$BIN/ctw-collector certs issue --dir "$W/tls" --name bench-node --kind client >/dev/null
head -c 32 /dev/urandom | base64 > "$W/token"
cat > "$W/collector.yaml" <<EOC
grpc:
  listen_addr: "127.0.0.1:19359"
  tls: {ca_file: $W/tls/ca.pem, cert_file: $W/tls/collector.pem, key_file: $W/tls/collector-key.pem}
http:
  listen_addr: "127.0.0.1:19360"
  token_file: $W/token
storage:
  path: $W/index
EOC
cat > "$W/agent.yaml" <<EOA
ports: [443]
collector:
  address: "https://127.0.0.1:19400"
  server_name: localhost
  tls: {ca_file: $W/tls/ca.pem, cert_file: $W/tls/bench-node.pem, key_file: $W/tls/bench-node-key.pem}
  spool_dir: $W/spool
EOA
$BIN/ctw-collector --config "$W/collector.yaml" 2> "$W/collector.log" & cpid=$!; pids+=("$cpid")
$BIN/rttproxy 127.0.0.1:19400 127.0.0.1:19359 "$DELAY" 2> "$W/proxy.log" & pids+=("$!")
for _ in $(seq 100); do curl -sf 127.0.0.1:19360/readyz >/dev/null && break; sleep 0.1; done
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
c0=$(cpu "$cpid")
out=$($BIN/examples/uplink_bench "$W/agent.yaml" "$RATE" "$SECS" 2> "$W/uplink.log") || { cat "$W/uplink.log"; exit 1; }
[ -n "${CTW_BENCH_VERBOSE:-}" ] && cat "$W/uplink.log" "$W/collector.log" "$W/proxy.log"
c1=$(cpu "$cpid")
tck=$(getconf CLK_TCK)
acked=$(sed 's/.*"acked":\([0-9]*\).*/\1/' <<<"$out")
# Let the last commit land, then read the store's size.
sleep 2
metrics=$(curl -s 127.0.0.1:19360/metrics)
records=$(awk '/^ctw_collector_store_records /{print $2}' <<<"$metrics")
bytes=$(awk '/^ctw_collector_store_bytes /{print $2}' <<<"$metrics")
cpu_s=$(awk -v a="$c0" -v b="$c1" -v t="$tck" 'BEGIN{printf "%.2f", (b-a)/t}')
echo "uplink: $out"
echo "rtt_ms=$((2*DELAY)) rate=$RATE seconds=$SECS"
echo "collector cpu_seconds=$cpu_s records_acked=$acked us_per_record=$(awk -v c="$cpu_s" -v n="$acked" 'BEGIN{printf "%.2f", c*1e6/n}') records_per_core_second=$(awk -v c="$cpu_s" -v n="$acked" 'BEGIN{printf "%.0f", n/c}')"
echo "store records=$records bytes=$bytes bytes_per_record=$(awk -v b="$bytes" -v n="$records" 'BEGIN{ if (n>0) printf "%.1f", b/n; else print "n/a"}')"
echo "nproc=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
