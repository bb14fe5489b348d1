#!/usr/bin/env bash
# Runs every check and test of conntrack-watch. Installs what a fresh Debian
# machine lacks. Integration tests need root (network namespaces); as another
# user they print "skipping: needs root" and check nothing.
#
#   sudo ./scripts/test.sh            (FUZZ_SECONDS=30 per fuzz target; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."

# command:package pairs the tests use.
need=(nft:nftables ip:iproute2 conntrack:conntrack nginx:nginx-light curl:curl python3:python3
      setpriv:util-linux promtool:prometheus systemd-analyze:systemd
      chromium:chromium node:nodejs npm:npm clickhouse-server:clickhouse-server)
missing=()
for pair in "${need[@]}"; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing ${missing[*]}; run as root to install them" >&2
  fi
fi
# ZooKeeper for the ClickHouse cluster tests (replication, ON CLUSTER DDL);
# those tests skip themselves when it cannot be installed.
if [ ! -e /usr/share/java/zookeeper.jar ] && [ "$(id -u)" = 0 ]; then
  echo "== installing zookeeperd"
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends zookeeperd >/dev/null \
    || echo "zookeeperd not installable: the ClickHouse cluster tests will skip" >&2
fi
# chdb (PyPI: ClickHouse 26.9's engine in-process) for the test that runs the
# collector's DDL for servers with column codecs (Debian has only 18.16); that
# test skips itself when chdb cannot be installed.
CHDB_VENV="$HOME/.cache/ctw/chdb-venv"
if ! "$CHDB_VENV/bin/python" -c 'import chdb' >/dev/null 2>&1; then
  echo "== installing chdb (pip, into $CHDB_VENV)"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null || true
  fi
  { python3 -m venv "$CHDB_VENV" && "$CHDB_VENV/bin/pip" install -q chdb==4.4.0; } \
    || echo "chdb not installable: the ClickHouse codec test will skip" >&2
fi
export CTW_CHDB_PYTHON="$CHDB_VENV/bin/python"
# Debian's nginx, prometheus, clickhouse-server and zookeeperd start themselves
# on install; tests run their own.
for svc in nginx prometheus clickhouse-server zookeeper; do systemctl disable --now "$svc" >/dev/null 2>&1 || true; done
pkill -x prometheus >/dev/null 2>&1 || true

# Browser tests drive Debian's chromium with playwright-core (no browser download).
if command -v npm >/dev/null 2>&1 && [ ! -d ui-tests/node_modules/playwright-core ]; then
  echo "== npm ci (ui-tests)"
  (cd ui-tests && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# Licenses, banned crates (one TLS stack), sources and RustSec advisories:
# deny.toml. Advisories come from GitHub when it is reachable, else from the
# dated snapshot in deny/advisory-db/ (scripts/advisories.sh).
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "== installing cargo-deny"
  cargo install cargo-deny --locked --quiet
fi
echo "== cargo deny"
cargo deny --log-level error check bans licenses sources
scripts/advisories.sh
echo "== cargo test"
mkdir -p target
status=0
# Tests that return early (not root, a tool missing) record themselves here
# (ctw_testkit::skip) and count as skipped, not passed.
export CTW_SKIP_LOG="$PWD/target/skipped-tests.txt"
: > "$CTW_SKIP_LOG"
# --no-fail-fast: one failing test binary does not hide the others' results.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee target/test-output.txt || status=$?
if [ "$status" = 0 ] && [ "${FUZZ_SECONDS:-30}" != 0 ]; then
  echo "== fuzz (bounded)"
  fuzz/run.sh "${FUZZ_SECONDS:-30}" || status=$?
fi
# One summary line over every test binary; a test that skipped itself ran
# and "passed" as far as libtest knows: count it as skipped instead.
if [ -s "$CTW_SKIP_LOG" ]; then
  echo "== skipped tests"
  sort "$CTW_SKIP_LOG"
fi
skipped_early=$(wc -l < "$CTW_SKIP_LOG")
awk -v s="$skipped_early" '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p - s, f, i + s }' target/test-output.txt
exit "$status"
