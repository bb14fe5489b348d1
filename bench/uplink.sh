#!/usr/bin/env bash
# One agent streaming RATE records/s to the collector over a link with a
# 50 ms round trip (a delaying proxy: this kernel has no netem), into the
# tantivy store. Reports what was acked, the tail after sending stopped, and
# the collector's CPU per record (gRPC ingest + WAL + index).
#
#   bench/uplink.sh [RATE=100000] [SECONDS=20] [DELAY_MS=25] [SPREAD=node]
#
# SPREAD is the record mix (agent/examples/uplink_bench.rs): `node` is one
# node's traffic (110 pods, NEW and DESTROY), `wide` a stress mix of 65,536
# pod addresses, NEW only (the only mix of earlier versions: pass an empty
# SPREAD to run an older build's uplink_bench, which takes no such argument).
# CTW_BENCH_PROBE=1 also measures time to searchable end to end (from the
# agent's uplink to a search through the collector's HTTP API that finds
# the record; 10 records a second, each searched every 20 ms until found):
# the searches cost the collector CPU, so take CPU numbers from runs
# without it.
# CTW_BENCH_BIN=DIR runs the binaries in DIR (e.g. an older build, for an
# A/B comparison in the same session) instead of building target/release.
# CTW_BENCH_STORE=clickhouse stores into ClickHouse instead (section 5 of
# BENCHMARKS.md): a private clickhouse-server (Debian's, its config, data
# and logs in the run's temp directory, loopback ports 19361/19362, like
# testkit's) is started first; its CPU over the same span is reported too.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-100000}; SECS=${2:-20}; DELAY=${3:-25}; SPREAD=${4-node}
STORE=${CTW_BENCH_STORE:-tantivy}
case $STORE in tantivy|clickhouse) ;; *) echo "CTW_BENCH_STORE: tantivy or clickhouse, got $STORE" >&2; exit 2;; esac
BIN=${CTW_BENCH_BIN:-target/release}
if [ -z "${CTW_BENCH_BIN:-}" ]; then
  cargo build --release --locked -q -p ctw-collector -p ctw-loadgen
  cargo build --release --locked -q -p ctw-agent --example uplink_bench
fi
W=$(mktemp -d /tmp/ctw-uplink-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
$BIN/ctw-collector certs init-ca --dir "$W/tls" >/dev/null
$BIN/ctw-collector certs issue --dir "$W/tls" --name collector --kind server --dns localhost --ip 127.0.0.1 >/dev/null
$BIN/ctw-collector certs issue --dir "$W/tls" --name bench-node --kind client >/dev/null
head -c 32 /dev/urandom | base64 > "$W/token"
if [ "$STORE" = clickhouse ]; then
  mkdir -p "$W/ch"
  cat > "$W/ch/config.xml" <<EOX
<?xml version="1.0"?>
<yandex>
  <logger><level>information</level><log>$W/ch/server.log</log><errorlog>$W/ch/server.err.log</errorlog><size>100M</size><count>1</count></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>19361</http_port>
  <tcp_port>19362</tcp_port>
  <path>$W/ch/data/</path>
  <tmp_path>$W/ch/tmp/</tmp_path>
  <user_files_path>$W/ch/user_files/</user_files_path>
  <format_schema_path>$W/ch/format_schemas/</format_schema_path>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <profiles><default></default></profiles>
  <quotas><default></default></quotas>
</yandex>
EOX
  (cd "$W/ch" && exec /usr/sbin/clickhouse-server --config-file="$W/ch/config.xml" >"$W/ch/stdout.log" 2>&1) & chpid=$!; pids+=("$chpid")
  for _ in $(seq 300); do [ "$(curl -sf 'http://127.0.0.1:19361/?query=SELECT%201' 2>/dev/null)" = 1 ] && break; sleep 0.1; done
  [ "$(curl -sf 'http://127.0.0.1:19361/?query=SELECT%201')" = 1 ] || { echo "clickhouse-server did not start:"; tail -n 20 "$W/ch/stdout.log" "$W/ch/server.err.log"; exit 1; }
  storage="  backend: clickhouse
  url: http://127.0.0.1:19361
  database: ctw_bench"
else
  storage="  path: $W/index"
fi
cat > "$W/collector.yaml" <<EOC
grpc:
  listen_addr: "127.0.0.1:19359"
  tls: {ca_file: $W/tls/ca.pem, cert_file: $W/tls/collector.pem, key_file: $W/tls/collector-key.pem}
http:
  listen_addr: "127.0.0.1:19360"
  token_file: $W/token
storage:
$storage
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
chcpu() { if [ -n "${chpid:-}" ]; then cpu "$chpid"; else echo 0; fi; }
h0=$(chcpu)
# Machine-wide CPU and the share the hypervisor stole (a VM's noise).
stat() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $9}' /proc/stat; }
s0=$(stat)
c0=$(cpu "$cpid")
probe=()
[ -n "${CTW_BENCH_PROBE:-}" ] && probe=(env CTW_PROBE_HTTP=127.0.0.1:19360 CTW_PROBE_TOKEN_FILE="$W/token")
out=$("${probe[@]}" $BIN/examples/uplink_bench "$W/agent.yaml" "$RATE" "$SECS" ${SPREAD:+"$SPREAD"} 2> "$W/uplink.log") || { cat "$W/uplink.log"; exit 1; }
[ -n "${CTW_BENCH_VERBOSE:-}" ] && cat "$W/uplink.log" "$W/collector.log" "$W/proxy.log"
c1=$(cpu "$cpid")
h1=$(chcpu)
s1=$(stat)
# Merges the stream started finish after it: count the collector's CPU
# until it is idle (under 5 ticks per second), at most 120 s more.
c2=$c1
for _ in $(seq 120); do
  sleep 1; c=$(cpu "$cpid")
  if [ $((c - c2)) -lt 5 ]; then c2=$c; break; fi
  c2=$c
done
h2=$(chcpu)
tck=$(getconf CLK_TCK)
acked=$(sed 's/.*"acked":\([0-9]*\).*/\1/' <<<"$out")
# The store's size (records not committed yet are only in the WAL).
metrics=$(curl -s 127.0.0.1:19360/metrics)
records=$(awk '/^ctw_collector_store_records /{print $2}' <<<"$metrics")
bytes=$(awk '/^ctw_collector_store_bytes /{print $2}' <<<"$metrics")
cpu_s=$(awk -v a="$c0" -v b="$c1" -v t="$tck" 'BEGIN{printf "%.2f", (b-a)/t}')
echo "uplink: $out"
echo "rtt_ms=$((2*DELAY)) rate=$RATE seconds=$SECS spread=$SPREAD"
echo "collector cpu_seconds=$cpu_s records_acked=$acked us_per_record=$(awk -v c="$cpu_s" -v n="$acked" 'BEGIN{printf "%.2f", c*1e6/n}') records_per_core_second=$(awk -v c="$cpu_s" -v n="$acked" 'BEGIN{printf "%.0f", n/c}')"
cpu2_s=$(awk -v a="$c0" -v b="$c2" -v t="$tck" 'BEGIN{printf "%.2f", (b-a)/t}')
echo "collector including_merges_after cpu_seconds=$cpu2_s us_per_record=$(awk -v c="$cpu2_s" -v n="$acked" 'BEGIN{printf "%.2f", c*1e6/n}') records_per_core_second=$(awk -v c="$cpu2_s" -v n="$acked" 'BEGIN{printf "%.0f", n/c}') segments=$(ls "$W"/index/index/*/*.idx 2>/dev/null | wc -l)"
echo "store records=$records bytes=$bytes bytes_per_record=$(awk -v b="$bytes" -v n="$records" 'BEGIN{ if (n>0) printf "%.1f", b/n; else print "n/a"}')"
if [ "$STORE" = clickhouse ]; then
  ch1=$(awk -v a="$h0" -v b="$h1" -v t="$tck" 'BEGIN{printf "%.2f", (b-a)/t}')
  ch2=$(awk -v a="$h0" -v b="$h2" -v t="$tck" 'BEGIN{printf "%.2f", (b-a)/t}')
  echo "clickhouse cpu_seconds=$ch1 records_per_server_cpu_second=$(awk -v c="$ch1" -v n="$acked" 'BEGIN{printf "%.0f", n/c}') until_collector_idle cpu_seconds=$ch2 records_per_server_cpu_second=$(awk -v c="$ch2" -v n="$acked" 'BEGIN{printf "%.0f", n/c}') insert_queries=$(curl -s 'http://127.0.0.1:19361/?query=SELECT%20value%20FROM%20system.events%20WHERE%20event%3D%27InsertQuery%27')"
fi
echo "store=$STORE"
echo "steal_percent=$(awk -v a="$s0" -v b="$s1" 'BEGIN{split(a, x, " "); split(b, y, " "); printf "%.0f", 100 * (y[2] - x[2]) / (y[1] - x[1])}')"
echo "nproc=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
