#!/usr/bin/env bash
# Regenerates the golden ctnetlink datagrams in this directory from the real
# kernel. Needs root, iproute2, nftables, conntrack-tools, python3, curl.
#
#   cargo build -p ctw-agent --example capture_golden
#   sudo agent/src/netlink/testdata/capture.sh [path/to/capture_golden] [SET]
#
# SET: `seed` (default) writes the files of the first capture (tcp4, udp4,
# tcp6 with and without timestamps, icmp4); `issue11` writes zone7_tcp4,
# tcp4_expire and nat_clash_udp4, each with the `conntrack -E -o
# extended,id` lines the kernel gave for it in NAME.events.txt.
#
# Topology (namespaces get a per-run suffix and are deleted on exit):
#
#   pod  198.18.0.2/24  fd00:198:18:1::2/64
#    | veth
#   node 198.18.0.1/24  fd00:198:18:1::1/64   (forwarding, nft masquerade
#        198.19.0.1/24  fd00:198:18:2::1/64    out of the srv-side veth)
#    | veth
#   srv  198.19.0.2/24  fd00:198:18:2::2/64   (python3 http.server :8080)
#
# The capture tool runs inside node and records NEW and DESTROY events. Each
# flow's DESTROY is forced with `conntrack -D` in node so no test waits for a
# timeout. "*_ts_acct" files were captured with nf_conntrack_timestamp=1 and
# nf_conntrack_acct=1 in node, the others with both 0.
#
# Fixed client ports (curl --local-port, bind()) keep the tuples stable;
# masquerade keeps the source port when it is free, so the SNAT tuple is
# 198.19.0.1 (fd00:198:18:2::1) with the client's port.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../../../../target/debug/examples/capture_golden}"
bin="$(realpath "$bin")"
set_name="${2:-seed}"
sfx="ctwg$$"
pod="pod-$sfx" node="node-$sfx" srv="srv-$sfx"
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for ns in "$pod" "$node" "$srv"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

for ns in "$pod" "$node" "$srv"; do ip netns add "$ns"; done
ip link add vp0 netns "$pod" type veth peer name vn0 netns "$node"
ip link add vn1 netns "$node" type veth peer name vs0 netns "$srv"

ip -n "$pod" addr add 198.18.0.2/24 dev vp0
ip -n "$pod" addr add fd00:198:18:1::2/64 dev vp0 nodad
ip -n "$node" addr add 198.18.0.1/24 dev vn0
ip -n "$node" addr add fd00:198:18:1::1/64 dev vn0 nodad
ip -n "$node" addr add 198.19.0.1/24 dev vn1
ip -n "$node" addr add fd00:198:18:2::1/64 dev vn1 nodad
ip -n "$srv" addr add 198.19.0.2/24 dev vs0
ip -n "$srv" addr add fd00:198:18:2::2/64 dev vs0 nodad
for ns in "$pod" "$node" "$srv"; do
    ip -n "$ns" link set lo up
    for l in $(ip -n "$ns" -o link show type veth | awk -F': ' '{print $2}' | cut -d@ -f1); do
        ip -n "$ns" link set "$l" up
    done
done
ip -n "$pod" route add default via 198.18.0.1
ip -n "$pod" -6 route add default via fd00:198:18:1::1
ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
ip netns exec "$node" nft -f - <<'EOF'
table inet ctw_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "vn1" masquerade
    }
}
EOF

ip netns exec "$srv" python3 -m http.server 8080 --bind 198.19.0.2 >/dev/null 2>&1 &
pids+=($!)
ip netns exec "$srv" python3 -m http.server 8080 --bind fd00:198:18:2::2 >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    if ip netns exec "$srv" ss -Htln | grep -q '198.19.0.2:8080' &&
        ip netns exec "$srv" ss -Htln | grep -q '\[fd00:198:18:2::2\]:8080'; then
        break
    fi
    sleep 0.1
done

# capture NAME COUNT DELETE-ARGS -- TRAFFIC-COMMAND...
# (KEEP and TIMEOUT in the environment are passed to the capture tool.)
capture() {
    local name="$1" count="$2" del="$3"
    shift 4
    local out="$here/$name.hex" fifo ev=""
    fifo="$(mktemp -u)"
    mkfifo "$fifo"
    ip netns exec "$node" "$bin" "$out.tmp" "$count" "${TIMEOUT:-20}" "${KEEP:-all}" >"$fifo" &
    local cap=$!
    if [ "$set_name" = issue11 ]; then
        ip netns exec "$node" conntrack -E -e NEW,DESTROY -o extended,id >"$here/$name.events.txt" 2>/dev/null &
        ev=$!
        pids+=("$ev")
    fi
    read -r line <"$fifo"   # "ready": subscribed before the flow starts
    [ "$line" = ready ]
    ip netns exec "$pod" "$@"
    if [ -n "$del" ]; then
        # shellcheck disable=SC2086
        ip netns exec "$node" conntrack -D $del >/dev/null 2>&1 || true
    fi
    wait "$cap"
    if [ -n "$ev" ]; then kill "$ev" 2>/dev/null || true; fi
    rm -f "$fifo"
    mv "$out.tmp" "$out"
}

udp_send='import socket,sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.sendto(b"ctw", (sys.argv[3], int(sys.argv[4])))'

icmp_echo='import socket,struct
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xffff); t += t >> 16
    return ~t & 0xffff
body = struct.pack("!BBHHH", 8, 0, 0, 0x4321, 1) + b"ctw-golden"
body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
s.sendto(body, ("198.19.0.2", 0))
s.settimeout(5); s.recv(1500)'

mode() {
    ip netns exec "$node" sysctl -qw net.netfilter.nf_conntrack_timestamp="$1" net.netfilter.nf_conntrack_acct="$1"
}

if [ "$set_name" = issue11 ]; then
    # A zone-7 entry: both directions moved to zone 7 before conntrack.
    ip netns exec "$node" nft -f - <<'EOF'
table inet z {
    chain pre {
        type filter hook prerouting priority raw;
        ip saddr 198.18.0.0/24 ct zone set 7
        ip saddr 198.19.0.2 tcp sport 8080 ct zone set 7
    }
}
EOF
    mode 0
    capture zone7_tcp4 1 "" -- \
        curl -s -o /dev/null --local-port 40011 http://198.19.0.2:8080/
    ip netns exec "$node" nft delete table inet z
    # A TCP DESTROY the kernel sends on its own (TIME_WAIT of 1 s expired,
    # found by the garbage collector), timestamps on: the NEW has
    # CTA_TIMESTAMP_EVENT, the DESTROY start, stop and event.
    mode 1
    ip netns exec "$node" sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait=1
    TIMEOUT=60 capture tcp4_expire 2 "" -- \
        curl -s -o /dev/null --local-port 40012 http://198.19.0.2:8080/
    mode 0
    # UDP NAT clash: two threads send the first datagram of one connected
    # socket at once, DNAT to one of two backends at random; the loser's
    # shadow entry (IPS_NAT_CLASH) only sends a DESTROY.
    ip -n "$srv" addr add 198.19.0.3/24 dev vs0
    ip netns exec "$node" nft -f - <<'EOF'
table ip clash {
    chain pre {
        type nat hook prerouting priority dstnat;
        ip daddr 198.19.0.100 udp dport 5353 dnat to numgen random mod 2 map { 0 : 198.19.0.2, 1 : 198.19.0.3 }
    }
}
EOF
    ip netns exec "$node" sysctl -qw net.netfilter.nf_conntrack_udp_timeout=1
    clash='import socket, threading
for i in range(20000):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("198.18.0.2", 20000 + i % 40000))
    s.connect(("198.19.0.100", 5353))
    go = threading.Barrier(2)
    def send():
        go.wait()
        try:
            s.send(b"ctw")
        except OSError:
            pass  # ICMP port unreachable from the earlier flow
    t = threading.Thread(target=send)
    t.start()
    send()
    t.join()
    s.close()'
    KEEP=nat_clash TIMEOUT=120 capture nat_clash_udp4 1 "" -- python3 -c "$clash"
    # Keep the events of the clashing flow only: its original source port
    # is at bytes 60-61 of the datagram.
    port=$(printf '%d' "0x$(grep -v '^#' "$here/nat_clash_udp4.hex" | tr -s ' \n' ' ' |
        awk '{ print $61 $62 }')")
    grep "sport=$port " "$here/nat_clash_udp4.events.txt" >"$here/nat_clash.tmp" || true
    mv "$here/nat_clash.tmp" "$here/nat_clash_udp4.events.txt"
    echo "golden files written to $here"
    exit 0
fi

for m in plain ts_acct; do
    if [ "$m" = plain ]; then mode 0; sfx_name=""; else mode 1; sfx_name="_ts_acct"; fi
    capture "tcp4$sfx_name" 2 "-f ipv4 -p tcp --orig-port-dst 8080" -- \
        curl -s -o /dev/null --local-port 40001 http://198.19.0.2:8080/
    capture "udp4$sfx_name" 2 "-f ipv4 -p udp --orig-port-dst 5353" -- \
        python3 -c "$udp_send" 198.18.0.2 40002 198.19.0.2 5353
    capture "tcp6$sfx_name" 2 "-f ipv6 -p tcp --orig-port-dst 8080" -- \
        curl -s -o /dev/null --local-port 40003 "http://[fd00:198:18:2::2]:8080/"
done
mode 0
capture icmp4 2 "-f ipv4 -p icmp" -- python3 -c "$icmp_echo"
echo "golden files written to $here"
