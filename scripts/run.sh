#!/usr/bin/env bash
# Runs conntrack-watch on this host with one command (as root):
#
#   sudo ./scripts/run.sh            collector + an agent for this host
#   sudo ./scripts/run.sh --demo     ... plus a demo cluster in network
#                                    namespaces: pods behind NAT, nginx,
#                                    traffic, nginx lines resolved to pods
#
# Installs missing Debian packages, builds the release binaries, creates a
# local CA, certificates and an API token under the state directory (once;
# re-runs reuse them), writes the configs, starts everything in the
# background, waits until it works and stays in the foreground until Ctrl-C.
# Then (and on any failure) it stops what it started, by pid, and deletes the
# demo's namespaces. `--help` lists the options and environment variables.
# Functions run from traps look unreachable to shellcheck:
# shellcheck disable=SC2317
set -euo pipefail
# The whole script is one block, read before it runs: editing the file (a
# git pull) while it runs cannot change what it does midway.
{

usage() {
  cat <<'EOF'
Usage: sudo ./scripts/run.sh [--demo] [--exit-after SECONDS] [--help]

Starts a conntrack-watch collector (gRPC with mTLS, HTTP API and web UI) and
an agent for this host, connected to it, and stays in the foreground until
Ctrl-C, which stops both.

  --demo                also build a small cluster in network namespaces
                        (ctwdemo-*): two nodes with two pods each behind
                        nftables masquerade, an ingress running nginx, one
                        agent per node, traffic from random pods to nginx;
                        then resolve real nginx access lines to their pods
  --exit-after SECONDS  for tests and CI: check that everything came up,
                        keep running until SECONDS after the start of the
                        services, check again, stop, exit 0 (1 on failure)
  -h, --help            this text

Environment:
  CTW_STATE_DIR        state directory: CA, certificates, token, configs,
                       logs, index, demo files (default: ./run)
  CTW_LISTEN           collector listen address (default 127.0.0.1;
                       0.0.0.0 to serve other hosts)
  CTW_PORTS            ports the host agent watches
                       (default 22,80,443,3306,5432,6379,27017)
  CTW_BIN_DIR          use the binaries in this directory, skip the build
                       (e.g. target/debug)
  CTW_GRPC_PORT        collector gRPC port (default 9359)
  CTW_HTTP_PORT        collector HTTP port: API, UI, /metrics (default 9360)
  CTW_AGENT_HTTP_PORT  the host agent's HTTP port (default 9358)
EOF
}

demo=0
exit_after=""
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) demo=1 ;;
    --exit-after)
      [ $# -ge 2 ] || { echo "error: --exit-after needs a number of seconds" >&2; exit 2; }
      exit_after=$2
      shift
      ;;
    --exit-after=*) exit_after=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$exit_after" ] && ! [[ $exit_after =~ ^[0-9]+$ ]]; then
  echo "error: --exit-after needs a whole number of seconds, got '$exit_after'" >&2
  exit 2
fi

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

listen=${CTW_LISTEN:-127.0.0.1}
ports=${CTW_PORTS:-22,80,443,3306,5432,6379,27017}
grpc_port=${CTW_GRPC_PORT:-9359}
http_port=${CTW_HTTP_PORT:-9360}
agent_http_port=${CTW_AGENT_HTTP_PORT:-9358}
if ! [[ $ports =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "error: CTW_PORTS must be a comma-separated list of ports, got '$ports'" >&2
  exit 2
fi
for p in "$grpc_port" "$http_port" "$agent_http_port"; do
  if ! [[ $p =~ ^[0-9]+$ ]] || [ "$p" -lt 1 ] || [ "$p" -gt 65535 ]; then
    echo "error: bad port '$p' in CTW_GRPC_PORT/CTW_HTTP_PORT/CTW_AGENT_HTTP_PORT" >&2
    exit 2
  fi
done
if ! [[ $listen =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "error: CTW_LISTEN must be an IPv4 address (127.0.0.1 or 0.0.0.0), got '$listen'" >&2
  exit 2
fi

if [ "$(id -u)" != 0 ]; then
  echo "run as root (sudo $0): the agent needs CAP_NET_ADMIN to read conntrack events" >&2
  exit 1
fi

# A port already taken would only show after the build (minutes on a fresh
# machine) as a collector or agent failing to bind: check first.
port_busy() {
  if command -v ss >/dev/null 2>&1; then
    ss -Htln "sport = :$1" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
for pair in "CTW_GRPC_PORT:$grpc_port" "CTW_HTTP_PORT:$http_port" "CTW_AGENT_HTTP_PORT:$agent_http_port"; do
  if port_busy "${pair#*:}"; then
    echo "error: port ${pair#*:} (${pair%%:*}) is already in use (another conntrack-watch? ss -tlnp shows which process); stop it or set ${pair%%:*}" >&2
    exit 1
  fi
done

t_start=$SECONDS
say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- state, processes and cleanup -----------------------------------------

state=${CTW_STATE_DIR:-$root/run}
mkdir -p "$state"
state=$(cd "$state" && pwd)
# Keys, token, logs and index: never to be committed.
[ "$state" != "$root/run" ] || [ -e "$state/.gitignore" ] || echo '*' >"$state/.gitignore"

pids=()        # processes we started, in start order
names=()       # their names (pid files: $state/NAME.pid)
logs=()        # their logs
demo_ns=()     # namespaces we created, in creation order
demo_veth=""   # host side of the demo veth, once created

# Is $1 a live process that this script (or an earlier run of it) started?
ours_alive() {
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE 'ctw|nginx'
}

# Start a background process: name, log file, command...
# setsid: Ctrl-C in the terminal reaches only this script, which then stops
# the processes itself, agents before the collector. (setsid and
# `ip netns exec` both exec, so $! is the program's own pid.)
start_bg() {
  local name=$1 log=$2
  shift 2
  NO_COLOR=1 setsid "$@" >"$log" 2>&1 </dev/null &
  pids+=("$!")
  names+=("$name")
  logs+=("$log")
  echo "$!" >"$state/$name.pid"
}

# SIGTERM, then wait up to 10 s, then SIGKILL.
stop_pid() {
  local pid=$1 name=$2 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    warn "$name (pid $pid) did not stop within 10 s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? i ns pid
  trap - EXIT INT TERM
  [ ${#pids[@]} -gt 0 ] || [ ${#demo_ns[@]} -gt 0 ] || exit "$rc"
  say "stopping"
  # Newest first: traffic, agents, nginx, then the collector.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    stop_pid "${pids[i]}" "${names[i]}"
    rm -f "$state/${names[i]}.pid"
  done
  # Anything still running inside our namespaces (a curl of the traffic loop)
  # was started by us.
  for ns in "${demo_ns[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
  for ((i = ${#demo_ns[@]} - 1; i >= 0; i--)); do
    ip netns del "${demo_ns[i]}" 2>/dev/null || warn "cannot delete namespace ${demo_ns[i]}"
  done
  if [ -n "$demo_veth" ] && ip link show "$demo_veth" >/dev/null 2>&1; then
    ip link del "$demo_veth" 2>/dev/null || warn "cannot delete $demo_veth"
  fi
  [ ${#demo_ns[@]} -eq 0 ] || say "deleted the demo namespaces and $demo_veth"
  if [ "$rc" = 0 ]; then say "stopped"; else say "stopped (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Refuse to run twice on one state directory.
for f in "$state"/*.pid; do
  [ -e "$f" ] || continue
  pid=$(cat "$f" 2>/dev/null || true)
  if ours_alive "$pid"; then
    die "$(basename "$f" .pid) (pid $pid) from another run.sh is still running on $state; stop that run first (Ctrl-C in its terminal, or kill $pid)"
  fi
  rm -f "$f"
done

# Print the last lines of a process's log and fail.
died() {
  local i=$1
  printf 'error: %s (pid %s) exited; last lines of %s:\n' "${names[i]}" "${pids[i]}" "${logs[i]}" >&2
  tail -n 25 "${logs[i]}" >&2 || true
  exit 1
}

# Fail if any process we started has exited.
check_alive() {
  local i
  for ((i = 0; i < ${#pids[@]}; i++)); do
    kill -0 "${pids[i]}" 2>/dev/null || died "$i"
  done
}

# --- packages ----------------------------------------------------------------

need=()
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v jq >/dev/null 2>&1 || need+=(jq)
command -v setsid >/dev/null 2>&1 || need+=(util-linux)
if [ "$demo" = 1 ] && ! command -v nginx >/dev/null 2>&1 && ! [ -x /usr/sbin/nginx ]; then
  need+=(nginx-light)
fi
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
modprobe nf_conntrack 2>/dev/null || true
modprobe nf_conntrack_netlink 2>/dev/null || true

# --- build -------------------------------------------------------------------

find_cargo() {
  local home
  if command -v cargo >/dev/null 2>&1; then command -v cargo; return; fi
  for home in "${HOME:-/root}" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)"}; do
    if [ -x "$home/.cargo/bin/cargo" ]; then
      # rustup's proxies find the toolchain through these.
      export CARGO_HOME=${CARGO_HOME:-$home/.cargo} RUSTUP_HOME=${RUSTUP_HOME:-$home/.rustup}
      echo "$home/.cargo/bin/cargo"
      return
    fi
  done
  return 1
}

have_ctw=0
if [ -n "${CTW_BIN_DIR:-}" ]; then
  bin=$(cd "$CTW_BIN_DIR" && pwd)
  say "using the binaries in $bin (CTW_BIN_DIR; no build)"
else
  cargo=$(find_cargo) || die "cargo not found: install Rust with rustup (https://rustup.rs)"
  pkgs=(-p ctw-agent -p ctw-collector)
  if "$cargo" metadata --no-deps --format-version 1 --locked 2>/dev/null |
      jq -e '.packages[] | select(.name == "ctw-cli")' >/dev/null; then
    pkgs+=(-p ctw-cli)
  else
    say "note: package ctw-cli is not in the workspace yet; building without the ctw client"
  fi
  say "building (cargo build --release --locked ${pkgs[*]}); the first build takes several minutes"
  t0=$SECONDS
  "$cargo" build --release --locked "${pkgs[@]}"
  say "build done in $((SECONDS - t0)) s"
  target=${CARGO_TARGET_DIR:-$root/target}
  bin=$(cd "$target/release" && pwd)
fi
for b in ctw-agent ctw-collector; do
  [ -x "$bin/$b" ] || die "$bin/$b is missing"
done
[ -x "$bin/ctw" ] && have_ctw=1

# --- certificates, token -----------------------------------------------------

tls=$state/tls
mkdir -p "$tls"
hostname=$(cat /proc/sys/kernel/hostname)
certs() { "$bin/ctw-collector" certs "$@" --dir "$tls" >/dev/null; }
force=()
if [ ! -s "$tls/ca.pem" ] || [ ! -s "$tls/ca-key.pem" ]; then
  say "creating a local CA in $tls"
  rm -f "$tls/ca.pem" "$tls/ca-key.pem"
  certs init-ca
  force=(--force)   # certificates of an earlier CA are useless now
fi
# issue NAME KIND [options]: only when missing (or the CA is new).
issue() {
  local name=$1 kind=$2
  shift 2
  if [ ${#force[@]} -gt 0 ] || [ ! -s "$tls/$name.pem" ] || [ ! -s "$tls/$name-key.pem" ]; then
    say "issuing the $kind certificate $name"
    certs issue --name "$name" --kind "$kind" "$@" "${force[@]}"
  fi
}
issue collector server --dns localhost --ip 127.0.0.1
issue "$hostname" client
if [ "$demo" = 1 ]; then
  issue demo-node-1 client
  issue demo-node-2 client
fi
if [ ! -s "$state/token" ]; then
  say "creating the API token $state/token"
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$state/token")
fi
token=$(cat "$state/token")

# --- demo network (before the collector: it listens on the demo's veth) ------

# Address plan, IPv4 in 198.18.0.0/15 only:
#   pods of node i (1, 2)    198.18.i.11, 198.18.i.12 /24, gateway 198.18.i.1 (node br0)
#   node i <-> ingress       198.19.i.1 (node s0: its SNAT address) / 198.19.i.2
#   nginx (ingress lo)       198.19.0.80
#   host <-> ingress         198.19.H.1 (host veth ctwdXXXX) / 198.19.H.2 (ingress h0),
#                            H free on this host; the ingress masquerades
#                            towards the host, so the host needs no route.
ipn() { ip -n "$@"; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
new_ns() {
  ip netns add "$1"
  demo_ns+=("$1")
  ipn "$1" link set lo up
}
nginx_ip=198.19.0.80
demo_pods=()
demo_pod_ips=()
if [ "$demo" = 1 ]; then
  t0=$SECONDS
  for _ in $(seq 50); do
    id=$(printf '%04x' $((RANDOM % 65536)))
    ls /run/netns/ctwdemo-"$id"-* >/dev/null 2>&1 && continue
    ip link show "ctwd$id" >/dev/null 2>&1 && continue
    break
  done
  for _ in $(seq 200); do
    h=$((200 + RANDOM % 55))
    [ -z "$(ip -4 -o addr show to "198.19.$h.0/24")" ] &&
      ! ip -4 route show to match "198.19.$h.1" | grep -v '^default' >/dev/null && break
  done
  pfx=ctwdemo-$id
  host_ip=198.19.$h.1
  say "building the demo network (namespaces $pfx-*, host veth ctwd$id $host_ip/24)"
  others=$(ip netns list | awk '{print $1}' | grep '^ctwdemo-' | grep -v "^$pfx-" || true)
  [ -z "$others" ] || warn "other demo namespaces exist (another run, or one killed with SIGKILL): $(echo "$others" | tr '\n' ' ')"
  demo_dir=$state/demo
  mkdir -p "$demo_dir"
  ing=$pfx-ingress
  new_ns "$ing"
  ipn "$ing" addr add "$nginx_ip/32" dev lo
  nsx "$ing" sysctl -qw net.ipv4.ip_forward=1
  # The host side. Deleting the ingress namespace deletes the pair too.
  ip link add "ctwd$id" type veth peer name h0 netns "$ing"
  demo_veth=ctwd$id
  ip addr add "$host_ip/24" dev "ctwd$id"
  ip link set "ctwd$id" up
  ipn "$ing" addr add "198.19.$h.2/24" dev h0
  ipn "$ing" link set h0 up
  printf 'table ip ctwdemo {\n  chain post {\n    type nat hook postrouting priority 100;\n    oifname "h0" masquerade\n  }\n}\n' >"$demo_dir/ingress.nft"
  nsx "$ing" nft -f "$demo_dir/ingress.nft"
  for i in 1 2; do
    node=$pfx-node$i
    new_ns "$node"
    ipn "$node" link add br0 type bridge stp_state 0 forward_delay 0
    ipn "$node" addr add "198.18.$i.1/24" dev br0
    ipn "$node" link set br0 up
    for j in 1 2; do
      pod=$pfx-node$i-pod$j
      new_ns "$pod"
      ipn "$node" link add "p$j" type veth peer name eth0 netns "$pod"
      ipn "$node" link set "p$j" master br0
      ipn "$node" link set "p$j" up
      ipn "$pod" addr add "198.18.$i.$((10 + j))/24" dev eth0
      ipn "$pod" link set eth0 up
      ipn "$pod" route add default via "198.18.$i.1"
      demo_pods+=("$pod")
      demo_pod_ips+=("198.18.$i.$((10 + j))")
    done
    ipn "$node" link add s0 type veth peer name "n$i" netns "$ing"
    ipn "$node" addr add "198.19.$i.1/24" dev s0
    ipn "$ing" addr add "198.19.$i.2/24" dev "n$i"
    ipn "$node" link set s0 up
    ipn "$ing" link set "n$i" up
    ipn "$node" route add default via "198.19.$i.2"
    nsx "$node" sysctl -qw net.ipv4.ip_forward=1
    printf 'table ip ctwdemo {\n  chain post {\n    type nat hook postrouting priority 100;\n    oifname "s0" masquerade\n  }\n}\n' >"$demo_dir/node.nft"
    nsx "$node" nft -f "$demo_dir/node.nft"
    # Exist once the NAT table has loaded conntrack in this namespace.
    nsx "$node" sysctl -qw net.netfilter.nf_conntrack_timestamp=1 net.netfilter.nf_conntrack_acct=1
  done
  say "demo network ready in $((SECONDS - t0)) s: 2 nodes x 2 pods ${demo_pod_ips[*]}, nginx on $nginx_ip"
fi

# --- configs -----------------------------------------------------------------

grpc_ip=$listen
if [ "$demo" = 1 ] && [ "$listen" = 127.0.0.1 ]; then
  # The demo nodes cannot reach the host's loopback: listen on the veth.
  grpc_ip=$host_ip
fi
dial_ip=$grpc_ip
[ "$grpc_ip" != 0.0.0.0 ] || dial_ip=127.0.0.1
http_ip=$listen
[ "$listen" != 0.0.0.0 ] || http_ip=127.0.0.1
api=http://$http_ip:$http_port

cat >"$state/collector.yaml" <<EOF
# Written by scripts/run.sh (rewritten on every run).
grpc:
  listen_addr: "$grpc_ip:$grpc_port"
  tls:
    ca_file: $tls/ca.pem
    cert_file: $tls/collector.pem
    key_file: $tls/collector-key.pem
http:
  listen_addr: "$listen:$http_port"
  token_file: $state/token
storage:
  path: $state/index
EOF

# agent_yaml NODE PORTS LOGDIR HTTP_LISTEN DIAL_IP
agent_yaml() {
  cat <<EOF
# Written by scripts/run.sh (rewritten on every run).
ports: [${2//,/, }]
node_name: $1
log:
  path: $3/nat.log
  max_size_mb: 100
  max_backups: 5
http:
  listen_addr: "$4"
web_ui:
  enabled: true
collector:
  address: "https://$5:$grpc_port"
  server_name: localhost
  tls:
    ca_file: $tls/ca.pem
    cert_file: $tls/$1.pem
    key_file: $tls/$1-key.pem
  spool_dir: $3/spool
EOF
}
agent_yaml "$hostname" "$ports" "$state" "127.0.0.1:$agent_http_port" "$dial_ip" >"$state/agent.yaml"
"$bin/ctw-collector" --check --config "$state/collector.yaml" >/dev/null
"$bin/ctw-agent" --check --config "$state/agent.yaml" >/dev/null

# --- start -------------------------------------------------------------------

t_services=$SECONDS
say "starting the collector (gRPC $grpc_ip:$grpc_port, HTTP $listen:$http_port, log $state/collector.log)"
start_bg collector "$state/collector.log" "$bin/ctw-collector" --config "$state/collector.yaml"

# poll SECONDS WHAT COMMAND...: run COMMAND every 0.25 s until it succeeds,
# failing if SECONDS pass or one of our processes exits.
poll() {
  local secs=$1 what=$2 end=$((SECONDS + $1))
  shift 2
  until "$@"; do
    check_alive
    [ "$SECONDS" -lt "$end" ] || die "timed out after $secs s waiting for $what"
    sleep 0.25
  done
}
api_get() { curl -fsS --max-time 5 -H "Authorization: Bearer $token" "$api$1"; }
ready() { curl -fsS --max-time 2 "$api/readyz" >/dev/null 2>&1; }
poll 30 "the collector to be ready ($api/readyz)" ready

say "starting the agent for $hostname (ports $ports, log $state/nat.log, http://127.0.0.1:$agent_http_port/)"
start_bg agent "$state/agent.log" "$bin/ctw-agent" --config "$state/agent.yaml"
nodes=("$hostname")

if [ "$demo" = 1 ]; then
  for i in 1 2; do
    n=demo-node-$i
    mkdir -p "$demo_dir/$n"
    agent_yaml "$n" 80 "$demo_dir/$n" "127.0.0.1:9358" "$host_ip" >"$demo_dir/$n/agent.yaml"
    say "starting the agent for $n in $pfx-node$i"
    start_bg "agent-$n" "$demo_dir/$n/agent.log" ip netns exec "$pfx-node$i" "$bin/ctw-agent" --config "$demo_dir/$n/agent.yaml"
    nodes+=("$n")
  done
  # nginx: Debian's binary, foreground, one process (so its pid is all of it).
  nd=$demo_dir/nginx
  mkdir -p "$nd"
  : >"$demo_dir/access.log"
  cat >"$demo_dir/nginx.conf" <<EOF
# Written by scripts/run.sh for the demo.
master_process off;
user root root;
pid $nd/nginx.pid;
error_log $nd/error.log warn;
events { worker_connections 256; }
http {
    client_body_temp_path $nd/body;
    proxy_temp_path $nd/proxy;
    fastcgi_temp_path $nd/fastcgi;
    uwsgi_temp_path $nd/uwsgi;
    scgi_temp_path $nd/scgi;
    # The default "combined" format plus the client's port.
    log_format combined_port '\$remote_addr - \$remote_user [\$time_local] '
                             '"\$request" \$status \$body_bytes_sent '
                             '"\$http_referer" "\$http_user_agent" \$remote_port';
    access_log $demo_dir/access.log combined_port;
    server {
        listen $nginx_ip:80;
        location / { default_type text/plain; return 200 "hello from the demo ingress\n"; }
    }
}
EOF
  say "starting nginx in $ing (http://$nginx_ip/, log $demo_dir/access.log)"
  start_bg nginx "$demo_dir/nginx.log" ip netns exec "$ing" "$nginx_bin" -e "$nd/error.log" -g "daemon off;" -c "$demo_dir/nginx.conf" -p "$nd/"
fi

connected() {
  local json n
  json=$(api_get /api/v1/agents 2>/dev/null) || return 1
  for n in "${nodes[@]}"; do
    jq -e --arg n "$n" '.agents[] | select(.node == $n and .connected == true)' <<<"$json" >/dev/null || return 1
  done
}
poll 30 "the agents (${nodes[*]}) to show as connected in GET /api/v1/agents" connected
say "collector ready, agents connected: ${nodes[*]} ($((SECONDS - t_services)) s after start)"

# --- demo traffic and resolution ---------------------------------------------

# resolve_line LINE: sets res="SNAT_IP SNAT_PORT POD_IP POD_PORT NODE" or fails.
# POST /api/v1/resolve when the collector has it, else a search by SNAT
# address, port and the line's time.
resolve_api=unknown
res=""
resolve_line() {
  local line=$1 out code body re a t p epoch
  if [ "$resolve_api" != no ]; then
    out=$(jq -cn --arg l "$line" '{lines: [$l]}' |
      curl -sS --max-time 5 -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        --data-binary @- -w '\n%{http_code}' "$api/api/v1/resolve") || return 1
    code=${out##*$'\n'}
    body=${out%$'\n'*}
    if [ "$code" = 404 ] || [ "$code" = 405 ]; then
      resolve_api=no
    elif [ "$code" = 200 ]; then
      resolve_api=yes
      res=$(jq -er '.results[0] | select(.status == "resolved" and .pod_ip != null)
        | "\(.remote_addr // "-") \(.remote_port // "-") \(.pod_ip) \(.pod_port // "-") \(.node)"' <<<"$body")
      return
    else
      return 1
    fi
  fi
  re='^([0-9.]+) - [^[]*\[([^]]+)\] "[^"]*" [0-9]+ [0-9]+ "[^"]*" "[^"]*" ([0-9]+)$'
  [[ $line =~ $re ]] || return 1
  a=${BASH_REMATCH[1]} t=${BASH_REMATCH[2]} p=${BASH_REMATCH[3]}
  # 27/Jun/2025:10:11:12 +0000 -> 27 Jun 2025 10:11:12 +0000
  t=${t/:/ }
  epoch=$(date -d "${t//\// }" +%s) || return 1
  res=$(api_get "/api/v1/connections?snat_ip=$a&snat_port=$p&at=$epoch&limit=5" 2>/dev/null |
    jq -er --arg a "$a" --arg p "$p" '.records[0] | select(.src_ip != null)
      | "\($a) \($p) \(.src_ip) \(.src_port) \(.node)"')
}

if [ "$demo" = 1 ]; then
  # A bounded loop: one request every ~0.5 s from a random pod; it is one of
  # our processes, stopped with the rest. traffic.log records each request's
  # pod address and source port (before NAT), to check the answers against.
  : >"$demo_dir/traffic.log"
  traffic() {
    local k
    while :; do
      k=$((RANDOM % ${#demo_pods[@]}))
      ip netns exec "${demo_pods[k]}" curl -s -o /dev/null --max-time 2 \
        -w '%{local_ip} %{local_port} %{http_code}\n' "http://$nginx_ip/" >>"$demo_dir/traffic.log" 2>/dev/null || true
      sleep 0.5
    done
  }
  start_bg traffic /dev/null bash -c "$(declare -p demo_pods demo_dir nginx_ip); $(declare -f traffic); traffic"
  say "traffic: a request from a random pod to http://$nginx_ip/ every ~0.5 s"

  say "resolving nginx access lines to pods (POST /api/v1/resolve, else GET /api/v1/connections)"
  t0=$SECONDS
  end=$((SECONDS + 60))
  resolved=0
  done_lines=()   # done_lines[N]=1: line N of access.log is resolved
  while [ "$resolved" -lt 3 ]; do
    check_alive
    [ "$SECONDS" -lt "$end" ] || die "fewer than 3 nginx lines resolved to pods within 60 s; see $state/collector.log and $demo_dir/*/agent.log"
    mapfile -t lines < <(head -n 40 "$demo_dir/access.log")
    for k in "${!lines[@]}"; do
      [ "$resolved" -lt 3 ] || break
      [ -z "${done_lines[k]:-}" ] || continue
      line=${lines[k]}
      if resolve_line "$line"; then
        done_lines[k]=1
        read -r s_ip s_port pod_ip pod_port node <<<"$res"
        t=$(sed -E 's/.*\[([^]]+)\].*/\1/' <<<"$line")
        check=""
        if [ "$pod_port" != - ] && grep -q "^$pod_ip $pod_port " "$demo_dir/traffic.log"; then
          check="  (the traffic log confirms: $pod_ip:$pod_port sent it)"
        fi
        printf '   %s\n   resolved: %s:%s at %s -> pod %s on %s%s\n' "$line" "$s_ip" "$s_port" "$t" "$pod_ip" "$node" "$check"
        resolved=$((resolved + 1))
      fi
    done
    [ "$resolved" -ge 3 ] || sleep 0.5
  done
  how="POST /api/v1/resolve"
  [ "$resolve_api" = yes ] || how="GET /api/v1/connections"
  say "$resolved nginx lines resolved to pods in $((SECONDS - t0)) s (via $how)"
fi

# --- what to do now ----------------------------------------------------------

ui_host=$http_ip
cat <<EOF

conntrack-watch is running (state in $state; $((SECONDS - t_start)) s since start).

  Web UI     http://$ui_host:$http_port/   (sign in with the token below)
EOF
if [ "$listen" = 0.0.0.0 ]; then
  echo "             (listening on every address: also http://$(hostname -I 2>/dev/null | awk '{print $1}'):$http_port/ from other hosts)"
fi
cat <<EOF
  API token  $token   (file $state/token)
  Collector  gRPC $grpc_ip:$grpc_port (mTLS, CA $tls/ca.pem), log $state/collector.log
  Agent      $hostname: http://127.0.0.1:$agent_http_port/ (live lookup page), JSON log $state/nat.log, log $state/agent.log

Try:
  curl -H "Authorization: Bearer \$(cat $state/token)" $api/api/v1/agents
  curl -H "Authorization: Bearer \$(cat $state/token)" '$api/api/v1/connections?dst_port=443&limit=10'
  curl -H "Authorization: Bearer \$(cat $state/token)" '$api/api/v1/connections?snat_ip=ADDR&snat_port=PORT&at=2024-12-09T15:05:00Z'
  curl $api/metrics
EOF
if [ "$have_ctw" = 1 ]; then
  cat <<EOF

The command-line client (ctw --help):
  export CTW_SERVER=$api CTW_TOKEN_FILE=$state/token
  $bin/ctw agents
  $bin/ctw search --dst-port 443 --limit 10
  $bin/ctw search ADDR:PORT 2024-12-09T15:05:00Z      # who was ADDR:PORT (as a server logged it) then?
EOF
  if [ "$demo" = 1 ]; then
    echo "  tail -n 5 $demo_dir/access.log | $bin/ctw resolve   # nginx lines with pod= and node= appended"
  fi
else
  echo "  (the ctw command-line client is not built yet: package ctw-cli is missing)"
fi
if [ "$demo" = 1 ]; then
  cat <<EOF

Demo: nodes demo-node-1 (SNAT 198.19.1.1, pods 198.18.1.11-12) and demo-node-2
(SNAT 198.19.2.1, pods 198.18.2.11-12) send requests to nginx; its access log is
  $demo_dir/access.log
Open the UI and paste a few of its lines to see the pod behind each one, e.g.:
  tail -n 5 $demo_dir/access.log
EOF
fi
echo
if [ -n "$exit_after" ]; then
  say "--exit-after $exit_after: stopping $exit_after s after the services started"
else
  say "press Ctrl-C to stop"
fi

# --- foreground ---------------------------------------------------------------

interrupted=0
trap 'interrupted=1' INT TERM
while [ "$interrupted" = 0 ]; do
  check_alive
  if [ -n "$exit_after" ] && [ $((SECONDS - t_services)) -ge "$exit_after" ]; then
    break
  fi
  sleep 1 &
  wait $! 2>/dev/null || true
done
trap 'exit 130' INT
trap 'exit 143' TERM
if [ -n "$exit_after" ] && [ "$interrupted" = 0 ]; then
  check_alive
  connected || die "the agents are no longer all connected at the end"
  if [ "$demo" = 1 ]; then
    n=$(wc -l <"$demo_dir/access.log")
    say "final check passed: all processes alive, agents connected, $n nginx requests served"
  else
    say "final check passed: all processes alive, agents connected"
  fi
fi
exit 0
}
