#!/usr/bin/env bash
# AddressSanitizer over the xbzrle tests, SIMD backends included: every
# out-of-bounds read or write by a kernel (the bug class of QEMU's AVX-512
# encoder), use of uninitialised stack/heap outside the guards the tests put
# after each output buffer, and leaks fail the run. The standard library is
# rebuilt with the sanitizer (-Zbuild-std) so slices handed across it are
# instrumented too.
#
# XBZRLE_REQUIRE_BACKENDS is set to every SIMD backend this CPU reports, so a
# backend silently not running fails the tests instead of passing them.
#
# Runs from the repository root on a fresh machine: installs nightly and
# rust-src when missing. Budget: about 5 minutes.
#
# Env: PROPTEST_CASES (default 64), ASAN_SKIP (extra test-name filters).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== asan: %s ===\n' "$*"; }
start_all=$SECONDS
target=x86_64-unknown-linux-gnu

# Tests skipped under ASan, with their reason (name substrings, `--skip`).
#   name|reason
SKIPS=(
)

step "toolchain"
if [ "$(uname -m)" != x86_64 ]; then
    echo "asan: this script instruments $target; host is $(uname -m)" >&2
    exit 1
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! rustup +nightly component list --installed | grep -q '^rust-src'; then
    rustup +nightly component add rust-src
fi
cargo +nightly --version

. .ci/lib.sh
req=$(required_backends)
export XBZRLE_REQUIRE_BACKENDS=$req
export PROPTEST_CASES=${PROPTEST_CASES:-64}
export RUSTFLAGS="-Zsanitizer=address -Cdebug-assertions"
export RUSTDOCFLAGS="-Zsanitizer=address"
export ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_string_checks=1"
echo "XBZRLE_REQUIRE_BACKENDS=$XBZRLE_REQUIRE_BACKENDS PROPTEST_CASES=$PROPTEST_CASES"
echo "RUSTFLAGS=$RUSTFLAGS ASAN_OPTIONS=$ASAN_OPTIONS"

collect_skips "${ASAN_SKIP:-}" ${SKIPS[@]+"${SKIPS[@]}"}

step "cargo +nightly test -Zbuild-std -p xbzrle --target $target"
# Own target dir suffix: sanitizer flags would otherwise invalidate the
# normal build cache.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/asan
run_backend_tests asan "$req" "$start_all" \
    cargo +nightly test -Zbuild-std -p xbzrle --target "$target" --lib --tests \
    -- --nocapture ${skip_args[@]+"${skip_args[@]}"}
