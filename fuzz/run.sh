#!/usr/bin/env bash
# Runs every cargo-fuzz target of this crate for a bounded time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET]      (default 30)
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=address); on the
# stable toolchain RUSTC_BOOTSTRAP=1 unlocks them. Seeds in seeds/<target>/
# are golden ctnetlink datagrams (agent/src/netlink/testdata); the working
# corpus grows in corpus/<target>/ and crashes land in artifacts/<target>/.
# Exits non-zero when a target finds a crash.
set -euo pipefail

secs="${1:-30}"
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    seeds=()
    if [ -d "seeds/$target" ]; then seeds=("seeds/$target"); fi
    echo "== fuzzing $target for ${secs}s"
    cargo fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$secs" -max_len=4096 -print_final_stats=1
done
echo "fuzz: all targets ran ${secs}s without a crash"
