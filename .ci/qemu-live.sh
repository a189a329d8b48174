#!/usr/bin/env bash
# Live checks against a real QEMU (issue 14): boots the tiny real guest of
# scripts/qemu-vectors under QEMU 7.2 (Debian's qemu-system-x86, TCG) and runs,
# over loopback, QEMU -> precopy incoming (with QEMU 10 too), QEMU -> precopy
# relay -> QEMU, 10 runs of agreement and bad input. One line per check
# (.ci/qemu-live.py says what each checks); exit 1 if any check fails.
# Installs what it uses (as root, or with sudo): python3, and through
# build_guest.sh qemu-system-x86 busybox-static cpio xz-utils zstd gcc; QEMU 10
# is unpacked beside 7.2 by scripts/qemu-newer.sh (never installed over it).
# About 3-5 minutes on 2 cores, once the guest and QEMU 10 are cached.
#   QEMU_LIVE_OUT=DIR    where logs go (default target/qemu-live, emptied first)
#   QEMU_LIVE_CACHE=DIR  guest kernel/initrd and QEMU 10 (default target/qemu-cache)
#   QEMU_LIVE_CHECKS=... a subset, e.g. 1,3 (default: all)
#   QEMU_LIVE_EXTRA_APPEND=" nokaslr"  more guest kernel arguments (diagnosis)
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
out="${QEMU_LIVE_OUT:-$CARGO_TARGET_DIR/qemu-live}"
cache="${QEMU_LIVE_CACHE:-$CARGO_TARGET_DIR/qemu-cache}"
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo

need=()
command -v python3 >/dev/null || need+=(python3)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v pgrep >/dev/null || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}"
fi

echo "== qemu-live: guest (scripts/qemu-vectors/build_guest.sh $cache/guest)"
if [ ! -s "$cache/guest/vmlinuz" ] || [ ! -s "$cache/guest/initrd.gz" ] \
    || [ scripts/qemu-vectors/workload.c -nt "$cache/guest/initrd.gz" ] \
    || [ scripts/qemu-vectors/build_guest.sh -nt "$cache/guest/initrd.gz" ]; then
    bash scripts/qemu-vectors/build_guest.sh "$cache/guest"
fi
qemu-system-x86_64 --version | head -1

echo "== qemu-live: QEMU 10 (scripts/qemu-newer.sh $cache/qemu-newer)"
qemu_new_args=()
if qnew=$(bash scripts/qemu-newer.sh "$cache/qemu-newer" | tail -1) && [ -x "$qnew" ]; then
    "$qnew" --version | head -1
    qemu_new_args=(--qemu-new "$qnew" --qemu-new-firmware "$cache/qemu-newer/usr/share/qemu")
else
    echo "no QEMU 10 here: the QEMU 10 check reports FAIL"
fi

echo "== qemu-live: cargo build --release -p precopy"
cargo build --release -p precopy

rm -rf "$out"
mkdir -p "$out"
echo "== qemu-live: checks (logs in $out)"
set +e
python3 .ci/qemu-live.py --precopy "$CARGO_TARGET_DIR/release/precopy" --guest "$cache/guest" \
    --out "$out" "${qemu_new_args[@]}" ${QEMU_LIVE_CHECKS:+--checks "$QEMU_LIVE_CHECKS"} \
    2> "$out/harness.stderr"
rc=$?
set -e
echo "qemu-live: logs in $out (summary.txt, harness.log, results.json, one folder per run)"
echo "qemu-live: $((SECONDS - t0)) s in all, exit $rc"
exit $rc
