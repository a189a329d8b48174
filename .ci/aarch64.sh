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

skip_args=()
for s in "${SKIPS[@]}" ${AARCH64_SKIP:+"$AARCH64_SKIP|from AARCH64_SKIP"}; do
    IFS='|' read -r name reason <<<"$s"
    skip_args+=(--skip "$name")
    echo "skipping '$name': $reason"
done

step "cargo test -p xbzrle --target $target"
t0=$SECONDS
log=$(mktemp)
set +e
cargo test -p xbzrle --target "$target" -- --nocapture "${skip_args[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
took=$((SECONDS - t0))

step "summary ($((SECONDS - start_all)) s in all)"
grep -E '^test result:|backends run:' "$log" | sort | uniq -c | sed 's/^ *//' || true
if [ "$rc" -ne 0 ]; then
    echo "aarch64: FAILED (exit $rc, ${took}s)"
    exit 1
fi
. .ci/lib.sh
check_backends_ran "$log" neon || { echo "aarch64: FAILED: no test reported running the neon backend"; exit 1; }
echo "aarch64: xbzrle tests passed under qemu-aarch64 with NEON (${took}s)"
