#!/usr/bin/env bash
# conntrack-watch benchmark: how many conntrack NEW events does each listener
# capture, and at what CPU / memory cost, when a burst of new UDP flows goes
# through a masquerading "node" namespace.
#
#   sudo bench/run.sh [flows]          (default 200000)
#
# Topology (all created here, deleted on exit, addresses only from
# 198.18.0.0/15):
#
#   pod ns  p0 198.18.1.2/24 (+ .99 for probes)
#     |  veth
#   node ns n0 198.18.1.1/24, n1 198.18.2.1/24, nft masquerade out of n1,
#     |  veth        nf_conntrack_events=1, listeners run here
#   sink ns s0 198.18.2.2/24 + 198.19.0.1..K/32 (+ 198.19.0.200 for probes),
#              nft input policy drop (no ICMP back)
#
# Listeners, one at a time, each fed the same flow set per scenario:
#   conntrack  conntrack -E -e NEW --buffer-size 67108864  (stdout -> file)
#   ulogd      ulogd2 NFCT -> JSON file, 128 MiB netlink buffer (bench/ulogd.conf)
#   agent      ctw-agent --config FILE (skipped with a message if not usable)
# Scenarios: every flow on a watched port (80,443); 10% on watched ports.
#
# Per run: expected = watched flows the generator sent; captured = output
# records for watched ports from the generator's source address; CPU =
# utime+stime of the listener (/proc/PID/stat) between "subscribed + probe
# drained" and "drained after the burst"; peak RSS = VmHWM; netlink drops =
# Drops column of /proc/net/netlink for the listener's sockets; kernel side:
# conntrack -C delta (entries created) and conntrack -S deltas.
#
# Environment knobs (all optional):
#   CTW_LISTENERS="conntrack ulogd agent"   CTW_SCENARIOS="all10 all100"...
#   CTW_SKIP_BUILD=1  CTW_LOADGEN_BIN=path  CTW_AGENT_BIN=path  CTW_RATE=0
#   CTW_HTTP_PORT=19358  CTW_KEEP_TMP=1 (keep raw outputs)
#   CTW_AGENT_NETLINK_EXTRA="kernel_filter: false"  (extra lines under netlink:)
set -euo pipefail

FLOWS=${1:-200000}
if ! [[ $FLOWS =~ ^[0-9]+$ ]] || (( FLOWS < 1 )); then
    echo "usage: $0 [flows]" >&2
    exit 2
fi
if (( EUID != 0 )); then
    echo "run as root: sudo $0 [flows]" >&2
    exit 2
fi

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
LISTENERS=${CTW_LISTENERS:-"conntrack ulogd agent"}
SCENARIOS=${CTW_SCENARIOS:-"watched100 watched10"}
RATE=${CTW_RATE:-0}
HTTP_PORT=${CTW_HTTP_PORT:-19358}
WATCHED_PORTS=80,443
OTHER_BASE=20000
OTHER_COUNT=10
SPORT_SLOTS=64512 # ports 1024..65535 per (src, dst) pair

SUFFIX="$$-$RANDOM"
NS_POD="ctwb-pod-$SUFFIX"
NS_NODE="ctwb-node-$SUFFIX"
NS_SINK="ctwb-sink-$SUFFIX"
POD_IP=198.18.1.2
PROBE_SRC=198.18.1.99
PROBE_DST=198.19.0.200
NODE_POD_IP=198.18.1.1
NODE_SINK_IP=198.18.2.1
SINK_IP=198.18.2.2
TMP=$(mktemp -d /tmp/ctw-bench.XXXXXX)
CLK_TCK=$(getconf CLK_TCK)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
RESULT_FILE="$RESULTS_DIR/$STAMP.md"

PIDS=()          # every background process this script started
NAMESPACES=()    # every namespace this script created

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    local p ns
    for p in "${PIDS[@]}"; do
        if kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null
        fi
    done
    for p in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    done
    # anything else still running inside our own namespaces (by pid)
    for ns in "${NAMESPACES[@]}"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$p" 2>/dev/null
        done
    done
    for ns in "${NAMESPACES[@]}"; do
        ip netns del "$ns" 2>/dev/null
    done
    if [[ ${CTW_KEEP_TMP:-0} == 1 || $rc -ne 0 ]]; then
        log "raw outputs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_node() { ip netns exec "$NS_NODE" "$@"; }
in_pod() { ip netns exec "$NS_POD" "$@"; }
in_sink() { ip netns exec "$NS_SINK" "$@"; }

# ---------------------------------------------------------------- build
AGENT_OK=1
AGENT_SKIP_REASON=""
LOADGEN=${CTW_LOADGEN_BIN:-$ROOT/target/release/ctw-loadgen}
AGENT=${CTW_AGENT_BIN:-$ROOT/target/release/ctw-agent}
if [[ ${CTW_SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries (cargo build --release -p ctw-agent -p ctw-loadgen)"
    if ! (cd "$ROOT" && cargo build --release -p ctw-agent -p ctw-loadgen); then
        log "joint build failed; building ctw-loadgen alone and skipping the agent"
        (cd "$ROOT" && cargo build --release -p ctw-loadgen) || die "ctw-loadgen does not build"
        AGENT_OK=0
        AGENT_SKIP_REASON="ctw-agent did not build"
    fi
fi
[[ -x $LOADGEN ]] || die "no generator binary at $LOADGEN"
if [[ $AGENT_OK == 1 && ! -x $AGENT ]]; then
    AGENT_OK=0
    AGENT_SKIP_REASON="no binary at $AGENT"
fi

# ---------------------------------------------------------------- topology
NDST=$(( (FLOWS + SPORT_SLOTS - 1) / SPORT_SLOTS ))
(( NDST <= 150 )) || die "too many flows for the address plan"
DSTS=""
for ((k = 1; k <= NDST; k++)); do DSTS+="${DSTS:+,}198.19.0.$k"; done
CT_MAX=$(cat /proc/sys/net/netfilter/nf_conntrack_max 2>/dev/null || echo 262144)
if (( FLOWS + 16 > CT_MAX )); then
    log "WARNING: $FLOWS flows exceed nf_conntrack_max=$CT_MAX; expect early drops"
fi

log "creating namespaces $NS_POD / $NS_NODE / $NS_SINK"
for ns in "$NS_POD" "$NS_NODE" "$NS_SINK"; do
    ip netns add "$ns"
    NAMESPACES+=("$ns")
    ip -n "$ns" link set lo up
done
ip -n "$NS_POD" link add p0 type veth peer name n0 netns "$NS_NODE"
ip -n "$NS_NODE" link add n1 type veth peer name s0 netns "$NS_SINK"

ip -n "$NS_POD" addr add "$POD_IP/24" dev p0
ip -n "$NS_POD" addr add "$PROBE_SRC/24" dev p0
ip -n "$NS_POD" link set p0 up
ip -n "$NS_POD" route add 198.19.0.0/24 via "$NODE_POD_IP"

ip -n "$NS_NODE" addr add "$NODE_POD_IP/24" dev n0
ip -n "$NS_NODE" addr add "$NODE_SINK_IP/24" dev n1
ip -n "$NS_NODE" link set n0 up
ip -n "$NS_NODE" link set n1 up
ip -n "$NS_NODE" route add 198.19.0.0/24 via "$SINK_IP"

ip -n "$NS_SINK" addr add "$SINK_IP/24" dev s0
for ((k = 1; k <= NDST; k++)); do ip -n "$NS_SINK" addr add "198.19.0.$k/32" dev s0; done
ip -n "$NS_SINK" addr add "$PROBE_DST/32" dev s0
ip -n "$NS_SINK" link set s0 up

in_node sysctl -qw net.ipv4.ip_forward=1
in_node nft -f - <<'EOF'
table ip ctwbench {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "n1" masquerade
    }
}
EOF
in_sink nft -f - <<'EOF'
table inet ctwsink {
    chain input {
        type filter hook input priority filter; policy drop;
    }
}
EOF
# The NAT chain makes the node namespace track; events always generated;
# long UDP timeout so that no entry expires during a run (the table is
# flushed between runs instead).
in_node sysctl -qw net.netfilter.nf_conntrack_events=1
in_node sysctl -qw net.netfilter.nf_conntrack_udp_timeout=300
in_node sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream=300

# ---------------------------------------------------------------- helpers
PROBE_SEQ=0
send_probe() { # one watched flow from PROBE_SRC to PROBE_DST, new src port each time
    local sp=$(( 30000 + PROBE_SEQ ))
    PROBE_SEQ=$(( PROBE_SEQ + 1 ))
    in_pod "$LOADGEN" --src "$PROBE_SRC" --dst "$PROBE_DST" --flows 1 \
        --watched-ports 80 --watched-fraction 1 \
        --src-port-min "$sp" --src-port-max "$sp" >/dev/null
}

thread_ticks() { # "comm=ticks ..." per thread of pid (utime+stime), summed by thread name
    local t
    for t in /proc/"$1"/task/*; do
        awk '{ c = $0; sub(/^[^(]*\(/, "", c); sub(/\).*$/, "", c); gsub(/ /, "_", c); sub(/^.*\) /, ""); print c, $12 + $13 }' "$t/stat" 2>/dev/null
    done | awk '{ s[$1] += $2 } END { for (k in s) printf "%s=%d ", k, s[k] }'
}

cpu_ticks() { # utime+stime (all threads) of pid
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

vm_hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

socket_inodes() { # socket inodes of pid, one per line
    local f t
    for f in /proc/"$1"/fd/*; do
        t=$(readlink "$f" 2>/dev/null) || continue
        [[ $t == socket:\[*\] ]] && { t=${t#socket:[}; echo "${t%]}"; }
    done
    return 0
}

# prints "<subscribed-to-NEW 0|1> <sum Rmem> <sum Drops>" over the pid's
# NETLINK_NETFILTER sockets, from /proc/net/netlink of the node namespace
nl_state() {
    local inodes
    inodes=$(socket_inodes "$1" | tr '\n' ' ')
    in_node cat /proc/net/netlink | awk -v inodes="$inodes" '
        BEGIN { n = split(inodes, a, " "); for (i = 1; i <= n; i++) want[a[i]] = 1; sub_new = 0; rmem = 0; drops = 0 }
        NR > 1 && $2 == 12 && ($10 in want) {
            if (substr($4, length($4), 1) ~ /[13579bdfBDF]/) sub_new = 1   # group 1 = NFNLGRP_CONNTRACK_NEW
            rmem += $5; drops += $9
        }
        END { print sub_new, rmem, drops }'
}

wait_subscribed() { # pid name timeout_s
    local pid=$1 name=$2 t=$3 i st
    for ((i = 0; i < t * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || { log "$name exited during startup"; return 1; }
        st=$(nl_state "$pid")
        [[ ${st%% *} == 1 ]] && return 0
        sleep 0.1
    done
    log "$name did not subscribe to conntrack NEW events within ${t}s"
    return 1
}

# wait until the listener's netlink queue is empty and its CPU time has not
# moved for 1 s (it has processed everything it received)
wait_drained() {
    local pid=$1 i st rmem last=-1 now still=0
    for ((i = 0; i < 1200; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        st=$(nl_state "$pid")
        rmem=$(awk '{ print $2 }' <<<"$st")
        now=$(cpu_ticks "$pid")
        if [[ $rmem == 0 && $now == "$last" ]]; then
            still=$(( still + 1 ))
            (( still >= 4 )) && return 0
        else
            still=0
        fi
        last=$now
        sleep 0.25
    done
    log "WARNING: listener $pid still busy after 300 s"
}

ct_stats() { # summed conntrack -S counters of the node namespace
    in_node conntrack -S 2>/dev/null | awk '
        { for (i = 1; i <= NF; i++) if (split($i, kv, "=") == 2 && kv[1] != "cpu") s[kv[1]] += kv[2] }
        END { printf "insert_failed=%d drop=%d early_drop=%d invalid=%d error=%d\n", s["insert_failed"], s["drop"], s["early_drop"], s["invalid"], s["error"] }'
}
ct_count() { in_node conntrack -C 2>/dev/null || in_node cat /proc/sys/net/netfilter/nf_conntrack_count; }
ct_flush() {
    in_node conntrack -F >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 100; i++)); do
        [[ $(ct_count) == 0 ]] && return 0
        sleep 0.1
    done
    log "WARNING: conntrack table of the node namespace not empty after flush"
}
stat_delta() { # before after -> "k=v ..." deltas
    awk -v b="$1" -v a="$2" 'BEGIN {
        n = split(b, bb, " "); for (i = 1; i <= n; i++) { split(bb[i], kv, "="); B[kv[1]] = kv[2] }
        n = split(a, aa, " "); out = ""
        for (i = 1; i <= n; i++) { split(aa[i], kv, "="); out = out (out ? " " : "") kv[1] "=" (kv[2] - B[kv[1]]) }
        print out }'
}

# ---- listener-specific start and count
# Listeners are started as plain `ip netns exec ... &` commands (not through
# the in_node function): ip execs the listener, so $! is the listener's pid.
start_conntrack() {
    local dir=$1
    ip netns exec "$NS_NODE" conntrack -E -e NEW --buffer-size 67108864 >"$dir/events.txt" 2>"$dir/stderr.txt" &
    LPID=$!
    PIDS+=("$LPID")
}
count_conntrack() { # dir -> "captured probe_seen notes"
    local dir=$1 enobufs
    enobufs=$(grep -c ENOBUFS "$dir/stderr.txt" || true)
    awk -v src="$POD_IP" -v probe="$PROBE_SRC" -v ports="$WATCHED_PORTS" '
        BEGIN { n = split(ports, p, ","); for (i = 1; i <= n; i++) W[p[i]] = 1 }
        /NEW/ {
            s = ""; d = ""
            for (i = 1; i <= NF; i++) {
                if (s == "" && $i ~ /^src=/) s = substr($i, 5)
                if (d == "" && $i ~ /^dport=/) d = substr($i, 7)
            }
            if (s == src && (d in W)) c++
            if (s == probe) pr++
        }
        END { printf "%d %d\n", c, pr }' "$dir/events.txt" | tr -d '\n'
    echo " ENOBUFS_warnings=$enobufs"
}

ULOGD_PLUGDIR=""
for d in /usr/lib/x86_64-linux-gnu/ulogd /usr/lib/aarch64-linux-gnu/ulogd /usr/lib/ulogd /usr/lib64/ulogd; do
    [[ -f $d/ulogd_inpflow_NFCT.so ]] && { ULOGD_PLUGDIR=$d; break; }
done
start_ulogd() {
    local dir=$1
    [[ -n $ULOGD_PLUGDIR ]] || { log "ulogd NFCT plugin not found"; return 1; }
    sed -e "s|@PLUGDIR@|$ULOGD_PLUGDIR|" -e "s|@LOGFILE@|$dir/ulogd.log|" \
        -e "s|@JSONFILE@|$dir/events.json|" "$BENCH_DIR/ulogd.conf" >"$dir/ulogd.conf"
    ip netns exec "$NS_NODE" ulogd -c "$dir/ulogd.conf" -p "$dir/ulogd.pid" >"$dir/stdout.txt" 2>"$dir/stderr.txt" &
    LPID=$!
    PIDS+=("$LPID")
}
count_ulogd() {
    local dir=$1 losing
    losing=$(grep -ci 'losing events' "$dir/ulogd.log" 2>/dev/null || true)
    jq -Rr --arg src "$POD_IP" --arg probe "$PROBE_SRC" --arg ports "$WATCHED_PORTS" '
        fromjson? // empty
        | (.src_ip // ."orig.ip.saddr.str") as $s
        | if $s == $src and ((."orig.l4.dport" | tostring) as $d | ($ports | split(",") | index([$d])) != null) then "c"
          elif $s == $probe then "p" else empty end' "$dir/events.json" 2>/dev/null \
        | awk '{ n[$1]++ } END { printf "%d %d", n["c"], n["p"] }'
    echo " losing_events_msgs=$losing"
}

start_agent() {
    local dir=$1
    mkdir -p "$dir/log"
    cat >"$dir/agent.yaml" <<EOF
ports:
$(tr ',' '\n' <<<"$WATCHED_PORTS" | sed 's/^/  - /')

log:
  path: "$dir/log/ctw.log"

http:
  listen_addr: "127.0.0.1:$HTTP_PORT"

netlink:
  rcvbuf_bytes: 134217728
$(if [[ -n ${CTW_AGENT_NETLINK_EXTRA:-} ]]; then sed 's/^/  /' <<<"$CTW_AGENT_NETLINK_EXTRA"; fi)
EOF
    # validate first, so that a config the agent rejects is reported clearly
    if ! "$AGENT" --check --config "$dir/agent.yaml" >"$dir/check.txt" 2>&1; then
        log "ctw-agent --check rejected $dir/agent.yaml:"
        tail -n 5 "$dir/check.txt" >&2 || true
        LPID=""
        return 1
    fi
    ip netns exec "$NS_NODE" "$AGENT" --config "$dir/agent.yaml" >"$dir/stdout.txt" 2>"$dir/stderr.txt" &
    LPID=$!
    PIDS+=("$LPID")
}
agent_metrics() { # sum of conntrack_new_connections_total over ports
    in_node curl -s --max-time 2 "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null \
        | awk '/^conntrack_new_connections_total/ { s += $NF; ok = 1 } END { if (ok) printf "%d", s; else printf "n/a" }'
}
count_agent() {
    local dir=$1 f
    for f in "$dir"/log/ctw.log*; do
        [[ -f $f ]] || continue
        case $f in *.gz) zcat "$f" ;; *) cat "$f" ;; esac
    done | jq -Rr --arg src "$POD_IP" --arg probe "$PROBE_SRC" --arg ports "$WATCHED_PORTS" '
        fromjson? // empty
        | select(.type == "conntrack" and .msg == "new_connection")
        | if .src_ip == $src and ((.dst_port | tostring) as $d | ($ports | split(",") | index([$d])) != null) then "c"
          elif .src_ip == $probe then "p" else empty end' \
        | awk '{ n[$1]++ } END { printf "%d %d", n["c"], n["p"] }'
    echo " metrics_total=${AGENT_METRICS:-n/a}"
}

event_rcvbuf() { # largest rcvbuf among sockets subscribed to NEW in the node ns
    in_node ss -f netlink -m -e 2>/dev/null | awk '
        /groups=0x/ {
            g = $0; sub(/.*groups=0x/, "", g); g = substr(g, 8, 1)
            if (g ~ /[13579bdf]/ && match($0, /rb[0-9]+/)) { v = substr($0, RSTART + 2, RLENGTH - 2) + 0; if (v > m) m = v }
        }
        END { printf "%d", m }'
}

stop_listener() { # pid: SIGTERM, wait up to 10 s, then SIGKILL
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "WARNING: $pid ignored SIGTERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- one run
ROWS=()
GEN_JSONS=()
run_one() { # scenario fraction listener
    local scen=$1 frac=$2 lis=$3
    local dir="$TMP/$scen-$lis"
    mkdir -p "$dir"
    log "== $scen / $lis"
    if [[ $lis == agent && $AGENT_OK != 1 ]]; then
        log "SKIPPING ctw-agent: $AGENT_SKIP_REASON"
        ROWS+=("| $scen | $lis | skipped: $AGENT_SKIP_REASON | | | | | | | | | | | | | |")
        return 0
    fi
    ct_flush
    LPID=""
    if ! "start_$lis" "$dir" || ! wait_subscribed "$LPID" "$lis" 20; then
        [[ -n $LPID ]] && stop_listener "$LPID"
        local why="did not start/subscribe (see $dir)"
        if [[ $lis == agent ]]; then
            AGENT_OK=0
            AGENT_SKIP_REASON="ctw-agent not ready: exited or never subscribed to conntrack NEW"
            log "SKIPPING ctw-agent from now on: $AGENT_SKIP_REASON; stderr:"
            tail -n 5 "$dir/stderr.txt" >&2 || true
            why=$AGENT_SKIP_REASON
        else
            die "$lis $why"
        fi
        ROWS+=("| $scen | $lis | skipped: $why | | | | | | | | | | | | | |")
        return 0
    fi
    if [[ $lis == agent ]]; then # also wait for its HTTP side
        local i
        for ((i = 0; i < 100; i++)); do
            [[ $(agent_metrics) != n/a ]] && break
            sleep 0.1
        done
    fi
    send_probe
    wait_drained "$LPID"
    local rcvbuf
    rcvbuf=$(event_rcvbuf)

    local t0 st0 c0 nl0
    c0=$(ct_count)
    st0=$(ct_stats)
    nl0=$(nl_state "$LPID")
    t0=$(cpu_ticks "$LPID")
    local th0
    th0=$(thread_ticks "$LPID")

    local gen load
    load=$(cut -d' ' -f1 /proc/loadavg)
    gen=$(in_pod "$LOADGEN" --src "$POD_IP" --dst "$DSTS" --flows "$FLOWS" \
        --watched-ports "$WATCHED_PORTS" --watched-fraction "$frac" \
        --other-ports-base "$OTHER_BASE" --other-ports-count "$OTHER_COUNT" --rate "$RATE")
    GEN_JSONS+=("$scen/$lis: $gen")

    wait_drained "$LPID"
    local t1 st1 c1 nl1 hwm
    t1=$(cpu_ticks "$LPID")
    local th1 threads
    th1=$(thread_ticks "$LPID")
    # CPU us per captured event by thread name (where the time goes).
    threads=$(awk -v a="$th0" -v b="$th1" -v hz="$CLK_TCK" 'BEGIN {
        split(a, x, " "); for (i in x) { split(x[i], kv, "="); before[kv[1]] = kv[2] }
        split(b, y, " "); for (i in y) { split(y[i], kv, "="); d = kv[2] - before[kv[1]]; if (d > 0) printf "%s:%dms ", kv[1], d * 1000 / hz }
    }')
    nl1=$(nl_state "$LPID")
    hwm=$(vm_hwm_kb "$LPID")
    c1=$(ct_count)
    st1=$(ct_stats)
    AGENT_METRICS=""
    [[ $lis == agent ]] && AGENT_METRICS=$(agent_metrics)
    stop_listener "$LPID"

    local sent expected rate gen_us created drops_nl counts captured probe notes
    sent=$(jq -r .flows_sent <<<"$gen")
    expected=$(jq -r .watched_flows <<<"$gen")
    rate=$(jq -r '.rate_flows_per_s | floor' <<<"$gen")
    gen_us=$(jq -r '((.cpu_user_s // 0) + (.cpu_sys_s // 0)) * 1e6 / .flows_sent * 100 | round / 100' <<<"$gen")
    created=$(( c1 - c0 ))
    drops_nl=$(( $(awk '{ print $3 }' <<<"$nl1") - $(awk '{ print $3 }' <<<"$nl0") ))
    counts=$("count_$lis" "$dir")
    captured=$(awk '{ print $1 }' <<<"$counts")
    probe=$(awk '{ print $2 }' <<<"$counts")
    notes=$(cut -d' ' -f3- <<<"$counts")
    local cpu_us pct per_ev per_kev rss_mib
    cpu_us=$(( (t1 - t0) * 1000000 / CLK_TCK ))
    pct=$(awk -v c="$captured" -v e="$expected" 'BEGIN { if (e > 0) printf "%.2f%%", 100 * c / e; else print "n/a" }')
    per_ev=$(awk -v u="$cpu_us" -v c="$captured" 'BEGIN { if (c > 0) printf "%.1f", u / c; else print "n/a" }')
    per_kev=$(awk -v u="$cpu_us" -v c="$created" 'BEGIN { if (c > 0) printf "%.1f", u / c; else print "n/a" }')
    rss_mib=$(awk -v k="$hwm" 'BEGIN { printf "%.1f", k / 1024 }')
    local ctd
    ctd=$(stat_delta "$st0" "$st1")
    ROWS+=("| $scen | $lis | $sent | $rate | $gen_us | $expected | $captured | $pct | $drops_nl | $(awk -v u="$cpu_us" 'BEGIN { printf "%.2f", u / 1e6 }') | $per_ev | $per_kev | $rss_mib | $created | $ctd | probe_seen=$probe event_sk_rcvbuf=$rcvbuf loadavg1=$load threads_cpu=[${threads% }] $notes |")
    log "$scen/$lis: sent=$sent rate=$rate/s expected=$expected captured=$captured ($pct) nl_drops=$drops_nl cpu=${cpu_us}us (${per_ev}us/event) hwm=${rss_mib}MiB ct_created=$created $ctd probe=$probe rcvbuf=$rcvbuf $notes"
}

# ---------------------------------------------------------------- main
log "flows per run: $FLOWS (destinations: $DSTS), listeners: $LISTENERS, scenarios: $SCENARIOS"
for scen in $SCENARIOS; do
    case $scen in
        watched100) frac=1.0 ;;
        watched10) frac=0.1 ;;
        *) die "unknown scenario $scen (watched100, watched10)" ;;
    esac
    for lis in $LISTENERS; do
        case $lis in conntrack | ulogd | agent) ;; *) die "unknown listener $lis" ;; esac
        run_one "$scen" "$frac" "$lis"
    done
done

mkdir -p "$RESULTS_DIR"
{
    echo "# conntrack-watch listener benchmark, $STAMP"
    echo
    echo "Kernel $(uname -r), $(nproc) CPUs, $FLOWS new UDP flows per run (raw-socket sendmmsg generator in a pod namespace, masquerade in the node namespace, nf_conntrack_events=1), watched ports $WATCHED_PORTS."
    echo "watched100: every flow on a watched port; watched10: 10% on watched ports, 90% on $OTHER_BASE..$((OTHER_BASE + OTHER_COUNT - 1))."
    echo
    echo "| scenario | listener | flows sent | gen rate (flows/s) | gen CPU us/flow | expected (watched) | captured | captured/expected | netlink drops | listener CPU s | CPU us / captured | CPU us / kernel event | peak RSS MiB | ct entries created | conntrack -S delta | notes |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Listener CPU = utime+stime (all threads) between ready and drained; resolution $((1000000 / CLK_TCK)) us, so small runs are coarse. CPU us / kernel event divides by all NEW events the kernel generated (= ct entries created)."
    echo "conntrack -E and ulogd receive every NEW event and select in user space; ctw-agent (netlink.kernel_filter, default on) drops unwatched events with a socket filter in the kernel, which runs in the sender's context: that cost shows in gen CPU us/flow (the generator's user+sys time, which also carries the forwarding, NAT, conntrack and event-delivery work), not in the listener's CPU."
    echo "loadavg1 = 1-minute load average when the generator started: other work on the machine (2 CPUs) makes rates and CPU figures noisy; compare runs made at a quiet moment."
    echo "ct entries created = conntrack -C delta in the node namespace (should equal flows sent); netlink drops = Drops column of /proc/net/netlink for the listener's sockets."
    echo
    echo "<details><summary>generator summaries</summary>"
    echo
    printf '    %s\n' "${GEN_JSONS[@]}"
    echo
    echo "</details>"
} | tee "$RESULT_FILE"
log "results written to $RESULT_FILE"
