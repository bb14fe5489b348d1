#!/usr/bin/env bash
# Runs every check and test of conntrack-watch. Installs what a fresh Debian
# machine lacks. Integration tests need root (network namespaces); as another
# user they print "skipping: needs root" and pass without checking anything.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for pair in nft:nftables ip:iproute2 conntrack:conntrack nginx:nginx-light curl:curl python3:python3; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "missing ${need_pkgs[*]}; run as root to install them" >&2
  fi
fi
# nginx from Debian starts itself on install; the tests run their own.
systemctl disable --now nginx >/dev/null 2>&1 || true

rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked 2>&1 | tee target/test-output.txt
if [ -x fuzz/run.sh ]; then
  echo "== fuzz (bounded)"
  fuzz/run.sh "${FUZZ_SECONDS:-30}"
fi
# One summary line over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' target/test-output.txt
