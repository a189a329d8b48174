#!/usr/bin/env bash
# CI steps for the engine (issue 5): tests, lints, the main job and a two-process migration.
# Runnable from the repository root on a fresh machine (needs only cargo). A few minutes.
set -euo pipefail

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$CARGO_TARGET_DIR/release/precopy"

echo "== engine: tests"
cargo test -p precopy-engine
cargo test -p precopy --bins

echo "== engine: clippy and rustfmt"
cargo clippy -p precopy-engine -p precopy --no-deps --all-targets -- -D warnings
# Every file of the engine and the CLI (a list of files went stale when destination.rs
# became destination/{mod,multifd}.rs).
cargo fmt -p precopy-engine -p precopy -- --check

echo "== engine: precopy migrate (the README's first command), then --json"
cargo build --release -p precopy
"$BIN" migrate
"$BIN" migrate --mem 256M --json | tee /tmp/precopy-migrate.json
grep -q '"verified":true' /tmp/precopy-migrate.json
grep -q '"status":"completed"' /tmp/precopy-migrate.json

echo "== engine: two processes over loopback TCP (precopy incoming + precopy migrate --to)"
PORT=$((20000 + RANDOM % 20000))
"$BIN" incoming "tcp:127.0.0.1:$PORT" --json > /tmp/precopy-incoming.json 2> /tmp/precopy-incoming.err &
DEST=$!
for _ in $(seq 100); do
  grep -q "waiting on" /tmp/precopy-incoming.err 2>/dev/null && break
  sleep 0.1
done
"$BIN" migrate --mem 128M --workload mix --dirty-rate 20000 --to "tcp:127.0.0.1:$PORT" --json
wait "$DEST"
cat /tmp/precopy-incoming.json
grep -q '"verified":true' /tmp/precopy-incoming.json

echo "== engine: a failure exits non-zero (nobody listening)"
if "$BIN" migrate --mem 16M --to tcp:127.0.0.1:1 --json; then
  echo "expected failure" >&2
  exit 1
fi

echo "== engine: throughput figures (noisy on a shared machine; ratios vs memcpy in the same run)"
cargo run --release -p precopy-benches --bin engine-throughput -- --passes 5 --mib 32
