#!/usr/bin/env bash
# CI steps for the xbzrle codec and its benches (called from .ci/run).
# Runnable from the repo root on a fresh machine; installs what it uses.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== xbzrle: %s ===\n' "$*"; }

step "CPU features and backends"
grep -o -w -E 'sse2|avx2|avx512f|avx512bw|asimd' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ' || true
echo

# Every SIMD backend this CPU has (from /proc/cpuinfo) must run: a silently
# skipped backend fails the tests (XBZRLE_REQUIRE_BACKENDS) and this script.
. .ci/lib.sh
export XBZRLE_REQUIRE_BACKENDS="${XBZRLE_REQUIRE_BACKENDS:-$(required_backends)}"
echo "XBZRLE_REQUIRE_BACKENDS=$XBZRLE_REQUIRE_BACKENDS"

step "release tests with more proptest cases (backends printed with --nocapture)"
log=$(mktemp)
PROPTEST_CASES="${PROPTEST_CASES:-2000}" cargo test -p xbzrle --release -- --nocapture >"$log" 2>&1 \
    || { tail -n 80 "$log"; echo "xbzrle: release tests FAILED" >&2; exit 1; }
grep -E 'backends run|QEMU records|test result|FAILED|panicked|error' "$log" | sort | uniq -c
check_backends_ran "$log" "$XBZRLE_REQUIRE_BACKENDS"

step "no_std build, compile-time selection (+avx2,+bmi1,+bmi2,+popcnt, no run-time detection)"
# The AVX2 backend needs bmi1, bmi2 and popcnt besides avx2 (Backend::Avx2).
if has_avx2_backend_flags "$(grep -m1 '^flags' /proc/cpuinfo || true)"; then
    XBZRLE_REQUIRE_BACKENDS=avx2 RUSTFLAGS="-C target-feature=+avx2,+bmi1,+bmi2,+popcnt" cargo test -p xbzrle --no-default-features --release \
        --target-dir target/xbzrle-avx2 -- --skip every_offset --skip all_short_deltas 2>&1 | grep -E 'test result|FAILED|panicked'
else
    echo "skipped: this CPU lacks one of avx2, bmi1, bmi2, popcnt, so that build cannot run here"
fi

step "clippy: no default features"
cargo clippy -p xbzrle --no-default-features -- -D warnings

step "clippy: aarch64 (NEON backend type-checked and linted)"
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
    || rustup target add aarch64-unknown-linux-gnu
cargo clippy -p xbzrle --target aarch64-unknown-linux-gnu -- -D warnings

step "benches in test mode"
cargo test -p precopy-benches --lib
cargo test -p precopy-benches --bench xbzrle

step "limits (quick mode)"
cargo run --release -p precopy-benches --bin limits -- --quick
