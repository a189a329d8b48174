#!/usr/bin/env bash
# Extra CI for precopy-stream and `precopy inspect` (issue 4). The unit,
# hardening and QEMU-vector tests run in `cargo test --workspace`; this script
# runs `precopy inspect` on every vector file the way a new user would, checks
# an error exit, and runs the stream benches once in test mode (which includes
# a short rate-limit check). A few minutes on 2 cores, mostly the release build.
set -euo pipefail
cd "$(dirname "$0")/.."

. .ci/lib.sh
require_vectors stream.sh README.md "the shared set: it checks its pc.ram SHA-256"
VEC=$PRECOPY_VECTORS

cargo build --release -p precopy
BIN="${CARGO_TARGET_DIR:-target}/release/precopy"

PC_RAM_SHA=9ed1ad8818e6f0fe9282ee515342049918b7c992fb763aefdc1e8ae12bc9cdae
for f in xbzrle-stream plain-stream; do
  echo "--- precopy inspect $f.bin.xz"
  out=$("$BIN" inspect "$VEC/$f.bin.xz")
  echo "$out"
  grep -q "$PC_RAM_SHA" <<<"$out"
  json=$("$BIN" inspect --json "$VEC/$f.bin.xz")
  grep -q "\"sha256\": \"$PC_RAM_SHA\"" <<<"$json"
done

echo "--- precopy inspect on a truncated stream must fail with the byte offset"
tmp=$(mktemp)
trap 'rm -f "$tmp" "$tmp.err"' EXIT
{ xz -dc "$VEC/plain-stream.bin.xz" || true; } | head -c 1000000 >"$tmp"
test "$(stat -c %s "$tmp")" -eq 1000000
if "$BIN" inspect "$tmp" 2>"$tmp.err"; then
  echo "stream.sh: truncated stream was accepted" >&2
  exit 1
fi
cat "$tmp.err"
grep -q "at byte [0-9]" "$tmp.err"
rm -f "$tmp.err"

echo "--- stream benches, test mode"
cargo bench -p precopy-benches --bench stream -- --test
