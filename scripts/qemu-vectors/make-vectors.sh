#!/usr/bin/env bash
# Regenerate the QEMU 7.2 test vectors (the set the tests find through
# PRECOPY_VECTORS or ../shared/qemu-vectors) with Debian's qemu-system-x86.
#
#   scripts/qemu-vectors/make-vectors.sh OUTDIR
#   PRECOPY_VECTORS=OUTDIR cargo test --workspace
#
# Steps: install what it needs with apt-get (Debian 12: QEMU 7.2), build the
# tiny guest (build_guest.sh), boot it under TCG and migrate it with XBZRLE to
# exec:cat > xbzrle-stream.bin with the shared set's schedule, load that stream
# in a second QEMU and migrate it again without XBZRLE (run_migration.py), then
# derive the vectors, the index, the page trace, the tiny cases and
# expected.json (extract.py) and compress the large files with xz.
#
# A live guest is not deterministic: the result has the shared set's layout and
# kinds of records but not its bytes or counts. See README.md in this folder
# for which tests need the exact shared set.
#
# Needs root (or sudo) for apt-get, about 1 GB of disk in OUTDIR/work, and
# some minutes on 2 cores (a 20-40 s TCG boot, 300 workload steps, then the
# two migrations). WORK=DIR puts the intermediate files elsewhere; KEEP_WORK=1
# keeps them (guest, raw streams, pmemsave, QMP transcript); a WORK=
# folder is always kept.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
OWN_WORK=0
[ -n "${WORK:-}" ] || { WORK="$OUT/work"; OWN_WORK=1; }
mkdir -p "$WORK"
say() { printf 'make-vectors: %s\n' "$*"; }

# 1. Tools. Debian 12 (bookworm) ships QEMU 7.2, which made the shared set.
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  # A backports qemu-utils (10.x) Breaks 7.2's qemu-system-common: take bookworm's.
  if dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
    need+=(qemu-utils/bookworm)
  fi
  $SUDO apt-get install -y --no-install-recommends --allow-downgrades "${need[@]}"
fi
qver="$(qemu-system-x86_64 --version | head -1)"
say "$qver"
case "$qver" in
  *"version 7.2."*) ;;
  *) say "warning: not QEMU 7.2; the streams may differ in format from the shared set" ;;
esac

# 2. The guest: Debian cloud kernel + busybox initramfs running workload.c.
say "building the guest in $WORK/guest"
bash "$HERE/build_guest.sh" "$WORK/guest"

# 3. The two migrations (the shared set's schedule is run_migration.py's
# defaults: 128 MiB, seed 1, 8 MiB workload, 20 ms steps, 300 warm-up steps,
# xbzrle=on events=on, cache 16 MiB, downtime-limit 1 ms, 8 MiB/s, then
# 512 KiB/s from dirty-sync-count 3, downtime-limit 600 s from 12).
say "migrating (TCG boot, warm-up, XBZRLE migration, reload, plain migration)"
python3 "$HERE/run_migration.py" --guest "$WORK/guest" --out "$WORK/run"
RUN="$WORK/run"

# 4. Derived files.
say "extracting vectors, index, page trace, tiny cases, expected.json"
python3 "$HERE/extract.py" --xbzrle "$RUN/xbzrle-stream.bin" --plain "$RUN/plain-stream.bin" \
  --query-migrate "$RUN/query-migrate-xbzrle.json" --run-info "$RUN/run-info.json" \
  --pmem "$RUN/source-ram.pmem" --guest-log "$RUN/guest.log" \
  --label "regenerated $(date -u +%Y-%m-%d)" --out "$OUT"
cp "$RUN/query-migrate-xbzrle.json" "$RUN/info-ramblock.txt" "$OUT/"
# run-settings.json: the settings part of run-info.json, with local paths
# replaced by GUEST and OUT as in the shared set.
python3 - "$RUN/run-info.json" "$OUT/run-settings.json" "$WORK/guest" "$RUN" <<'PY'
import json, sys
src, dst, guest, run = sys.argv[1:]
info = json.load(open(src))
keys = ["args", "source_cmd", "qemu_version_text", "src-capabilities", "src-parameters",
        "forced_completion", "xbzrle_migration_wall_s", "src-second-migrate-attempt",
        "dst-parameters"]
text = json.dumps({k: info[k] for k in keys if k in info}, indent=2)
text = text.replace(guest, "GUEST").replace(run, "OUT")
open(dst, "w").write(text + "\n")
PY

# 5. Compress like the shared set, and say what this is.
say "compressing"
cp "$RUN/xbzrle-stream.bin" "$RUN/plain-stream.bin" "$OUT/"
for f in xbzrle-stream.bin plain-stream.bin xbzrle-vectors.bin xbzrle-vectors-index.tsv; do
  xz -9 -T0 -f "$OUT/$f"
done
cat > "$OUT/README.md" <<MD
# QEMU 7.2 test vectors (regenerated)

Made by \`scripts/qemu-vectors/make-vectors.sh\` on $(date -u +%Y-%m-%d) with
$qver.
Same layout as the project's shared set (see scripts/qemu-vectors/README.md);
different bytes and counts, because a live guest is not deterministic.
expected.json holds this run's own counts and SHA-256 values.
MD
# Only the default work folder is removed (never one given through WORK=).
if [ "$OWN_WORK" = 1 ] && [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
say "done: $OUT"
ls -la "$OUT"
