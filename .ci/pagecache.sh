#!/usr/bin/env bash
# CI steps for precopy-pagecache (issue 3), beyond `cargo test --workspace`.
# Needs the shared QEMU vectors (page-trace.txt) beside the repository, or
# PRECOPY_VECTORS pointing at the qemu-vectors folder. About 3-4 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== pagecache: %s ===\n' "$*"; }

VEC="${PRECOPY_VECTORS:-$PWD/../shared/qemu-vectors}"
if [ ! -f "$VEC/page-trace.txt" ]; then
  echo "pagecache.sh: QEMU page trace not found at $VEC/page-trace.txt; this script needs the" \
       "vectors (cache-hits checks the real trace). Put shared/ beside the clone or set" \
       "PRECOPY_VECTORS=DIR (scripts/qemu-vectors/make-vectors.sh regenerates a set)." >&2
  exit 1
fi
export PRECOPY_VECTORS="$VEC" PRECOPY_REQUIRE_VECTORS=1

step "model tests with more proptest cases (release)"
PROPTEST_CASES="${PROPTEST_CASES:-4096}" cargo test -p precopy-pagecache --release

step "cache-hits: hit-rate table; fails if the default policy loses to direct-mapped"
rows="$(cargo run --release -p precopy-benches --bin cache-hits -- --check)"
n="$(printf '%s\n' "$rows" | grep -c '"hit_rate"')"
test "$n" -ge 72 || { echo "cache-hits printed $n rows, expected 72" >&2; exit 1; }

step "criterion bench in test mode (each benchmark once)"
cargo bench -p precopy-benches --bench pagecache -- --test
