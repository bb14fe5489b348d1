#!/usr/bin/env bash
# RustSec advisories for every crate in Cargo.lock (`cargo deny check advisories`).
#
#   scripts/advisories.sh            check: against GitHub's advisory-db when it
#                                    is reachable, else against the snapshot in
#                                    deny/advisory-db/ (these build machines
#                                    cannot reach GitHub)
#   scripts/advisories.sh refresh DIR
#                                    rewrite the snapshot from a checkout of
#                                    https://github.com/RustSec/advisory-db:
#                                    the advisories of the crates in Cargo.lock
#
# The snapshot names the advisory-db commit and date it was taken from and
# the crates it covers; a crate in Cargo.lock that it does not cover fails the
# check (refresh the snapshot) instead of passing unchecked.
set -euo pipefail
cd "$(dirname "$0")/.."

SNAP=deny/advisory-db
UPSTREAM=https://github.com/RustSec/advisory-db

lock_crates() {
  sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | sort -u
}

refresh() {
  local src=$1
  [ -d "$src/crates" ] || { echo "advisories: $src is not an advisory-db checkout (no crates/)" >&2; exit 2; }
  local commit date
  commit=$(git -C "$src" rev-parse HEAD)
  date=$(git -C "$src" show -s --format=%cI HEAD)
  rm -rf "$SNAP"
  mkdir -p "$SNAP/crates"
  cp "$src/LICENSE.txt" "$SNAP/LICENSE.txt"
  local n=0
  for c in $(lock_crates); do
    if [ -d "$src/crates/$c" ]; then
      cp -r "$src/crates/$c" "$SNAP/crates/$c"
      n=$((n + 1))
    fi
  done
  {
    echo "# Subset of $UPSTREAM (CC0-1.0, LICENSE.txt): the advisories of the"
    echo "# crates in Cargo.lock when it was taken. Written by scripts/advisories.sh refresh."
    echo "commit $commit"
    echo "date $date"
    lock_crates | sed 's/^/covers /'
  } >"$SNAP/SNAPSHOT"
  echo "advisories: snapshot of $commit ($date): $n of $(lock_crates | wc -l) crates have advisories"
}

check_snapshot() {
  local missing
  missing=$(comm -23 <(lock_crates) <(sed -n 's/^covers //p' "$SNAP/SNAPSHOT" | sort -u))
  if [ -n "$missing" ]; then
    echo "advisories: Cargo.lock has crates the snapshot in $SNAP does not cover:" >&2
    echo "$missing" | sed 's/^/  /' >&2
    echo "advisories: refresh it: scripts/advisories.sh refresh <advisory-db checkout>" >&2
    exit 1
  fi
  local commit date home db
  commit=$(sed -n 's/^commit //p' "$SNAP/SNAPSHOT")
  date=$(sed -n 's/^date //p' "$SNAP/SNAPSHOT")
  # cargo-deny reads the default database from this directory (named after
  # the URL) and, offline, takes it as it is. A git repository whose one
  # commit carries the snapshot's date, so cargo-deny reports its true age.
  home=$(mktemp -d)
  trap 'rm -rf "$home"' RETURN
  db="$home/advisory-db-3157b0e258782691"
  mkdir -p "$db"
  cp -r "$SNAP/crates" "$db/crates"
  git -C "$db" init -q
  git -C "$db" add -A
  GIT_AUTHOR_DATE=$date GIT_COMMITTER_DATE=$date \
    git -C "$db" -c user.name=snapshot -c user.email=snapshot@localhost \
    commit -q -m "advisory-db $commit"
  sed "s|^\[advisories\]$|[advisories]\ndb-path = \"$home\"|" deny.toml >"$home/deny.toml"
  echo "advisories: GitHub unreachable; checking against the snapshot of $commit ($date)"
  cargo deny --offline --log-level error --config "$home/deny.toml" check advisories
}

case "${1:-check}" in
  refresh) refresh "${2:?usage: scripts/advisories.sh refresh DIR}" ;;
  check)
    if timeout 15 git ls-remote -q "$UPSTREAM" HEAD >/dev/null 2>&1; then
      cargo deny --log-level error check advisories
    else
      check_snapshot
    fi
    ;;
  *) echo "usage: scripts/advisories.sh [check | refresh DIR]" >&2; exit 2 ;;
esac
