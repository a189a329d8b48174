#!/usr/bin/env bash
# Extra CI for mapped-ram files and snapshots (issue 12): unpacks QEMU 10 beside the
# system QEMU (scripts/qemu-newer.sh, bookworm-backports; never installs over 7.2), then
# runs the QEMU 10 interop tests with PRECOPY_REQUIRE_QEMU10=1, so a missing QEMU 10 fails
# here instead of printing SKIPPED: a fresh mapped-ram file written by QEMU 10 parses to
# QEMU's own RAM, and a file whose RAM precopy wrote loads in QEMU 10. About a minute
# (TCG, firmware only, two short QEMU runs) plus the test build.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v python3 >/dev/null || apt-get install -y -qq python3 >/dev/null
dir=${QEMU_NEWER_DIR:-/opt/qemu-newer}
qemu=$(bash scripts/qemu-newer.sh "$dir" | tail -1)
echo "QEMU 10: $qemu"
export PRECOPY_QEMU10=$qemu PRECOPY_REQUIRE_QEMU10=1
cargo test -p precopy-stream --test mapped_ram
