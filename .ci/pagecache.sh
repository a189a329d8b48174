#!/usr/bin/env bash
# CI steps for precopy-pagecache (issue 3), beyond `cargo test --workspace`.
# Needs the shared QEMU vectors (page-trace.txt) beside the repository, or
# PRECOPY_VECTORS pointing at the qemu-vectors folder. About 3-4 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== pagecache: %s ===\n' "$*"; }

. .ci/lib.sh
require_vectors pagecache.sh page-trace.txt "cache-hits checks the real page trace"

step "model tests with more proptest cases (release)"
PROPTEST_CASES="${PROPTEST_CASES:-4096}" cargo test -p precopy-pagecache --release

step "cache-hits: hit-rate table; fails if the default policy loses to direct-mapped"
rows="$(cargo run --release -p precopy-benches --bin cache-hits -- --check)"
n="$(printf '%s\n' "$rows" | grep -c '"hit_rate"')"
test "$n" -ge 72 || { echo "cache-hits printed $n rows, expected 72" >&2; exit 1; }

step "criterion bench in test mode (each benchmark once)"
cargo bench -p precopy-benches --bench pagecache -- --test
