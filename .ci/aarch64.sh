#!/usr/bin/env bash
# The xbzrle tests on aarch64 under Debian's qemu-user, so the NEON backend
# runs every differential test against the reference, not just compiles.
# XBZRLE_REQUIRE_BACKENDS=neon makes the tests fail if NEON did not run.
#
# Runs from the repository root on a fresh Debian machine: installs
# qemu-user and gcc-aarch64-linux-gnu (apt) and the Rust target (rustup)
# when missing. Budget: about 10 minutes.
#
# Env: PROPTEST_CASES (default 32: each case is emulated), AARCH64_SKIP
# (extra test-name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== aarch64: %s ===\n' "$*"; }
start_all=$SECONDS
target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

# Tests skipped under emulation, with their reason (name substrings).
#   name|reason
SKIPS=(
)

step "tools"
if ! command -v qemu-aarch64 >/dev/null 2>&1 || ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 \
    || [ ! -d "$sysroot/lib" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
qemu-aarch64 --version | head -1
aarch64-linux-gnu-gcc --version | head -1
cargo --version

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export XBZRLE_REQUIRE_BACKENDS=neon
export PROPTEST_CASES=${PROPTEST_CASES:-32}
echo "runner: $CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"
echo "XBZRLE_REQUIRE_BACKENDS=$XBZRLE_REQUIRE_BACKENDS PROPTEST_CASES=$PROPTEST_CASES"

. .ci/lib.sh
collect_skips "${AARCH64_SKIP:-}" ${SKIPS[@]+"${SKIPS[@]}"}

step "cargo test -p xbzrle --target $target"
run_backend_tests aarch64 neon "$start_all" \
    cargo test -p xbzrle --target "$target" -- --nocapture ${skip_args[@]+"${skip_args[@]}"}
