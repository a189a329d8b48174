#!/usr/bin/env bash
# Fuzz smoke: builds every cargo-fuzz target in fuzz/ (AddressSanitizer and
# debug assertions on, cargo-fuzz's defaults) and runs each one for
# FUZZ_SECONDS (default 60) from the committed seeds plus the local corpus.
# Prints executions and exec/s per target; any crash, leak, timeout or
# oversized allocation fails the script, after printing the crashing input
# in hex so it can become a regression test (xbzrle/tests/regressions.rs,
# stream/tests/regressions.rs).
#
# Runs from the repository root on a fresh machine: installs nightly and
# cargo-fuzz when missing. Budget: about 60 s per target plus one build.
#
# Env: FUZZ_SECONDS (per target), FUZZ_TARGETS (space-separated subset).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== fuzz: %s ===\n' "$*"; }
secs=${FUZZ_SECONDS:-60}
start_all=$SECONDS

step "toolchain"
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
cargo +nightly --version
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cargo fuzz --version

# Fail, rather than pass, when a SIMD backend this CPU has did not run.
if [ -z "${XBZRLE_REQUIRE_BACKENDS:-}" ] && [ "$(uname -m)" = x86_64 ]; then
    . .ci/lib.sh
    req=$(required_backends)
    export XBZRLE_REQUIRE_BACKENDS=$req
fi
echo "XBZRLE_REQUIRE_BACKENDS=${XBZRLE_REQUIRE_BACKENDS:-}"

step "seed checks (stable cargo test of fuzz/src/lib.rs)"
cargo test --manifest-path fuzz/Cargo.toml

# Every [[bin]] of fuzz/Cargo.toml: xbzrle_decode xbzrle_encode_diff
# xbzrle_roundtrip zero_diff stream_records stream_load stream_compressed
# stream_device_state mapped_ram_parse multifd_channel.
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
echo "targets: $(echo $targets)"

step "build (release, ASan, debug assertions)"
t0=$SECONDS
cargo +nightly fuzz build
echo "build took $((SECONDS - t0)) s"

# Per-target input size cap (bytes). Page-pair inputs need room for a whole
# page of xor bytes plus op headers; stream inputs for several records.
max_len() {
    case "$1" in
        xbzrle_*) echo 8192 ;;
        zero_diff) echo 4096 ;;
        stream_compressed) echo 9000 ;;
        stream_*) echo 65536 ;;
        mapped_ram_*) echo 65536 ;;
        multifd_*) echo 65536 ;;
        *) echo 4096 ;;
    esac
}

logdir=$(mktemp -d)
summary=()
failed=()
for t in $targets; do
    step "run $t for ${secs}s"
    corpus=fuzz/corpus/$t
    seeds=fuzz/seeds/$t
    mkdir -p "$corpus" "$seeds" "fuzz/artifacts/$t"
    log=$logdir/$t.log
    t0=$SECONDS
    # -rss_limit_mb / -malloc_limit_mb: an input that makes a decoder
    # allocate more than that is a crash ("no unbounded allocation").
    set +e
    cargo +nightly fuzz run "$t" "$corpus" "$seeds" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    set -e
    took=$((SECONDS - t0))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+' || true)
    corp=$(find "$corpus" -type f | wc -l)
    if [ "$rc" -eq 0 ]; then
        res=ok
    else
        res="FAILED (exit $rc)"
        failed+=("$t")
        tail -n 60 "$log"
        for a in $(grep -Eo 'fuzz/artifacts/[^ ]+' "$log" | sort -u); do
            [ -f "$a" ] || continue
            echo "--- crashing input $a ($(wc -c <"$a") bytes), hex:"
            od -An -tx1 -v "$a" | head -n 64
        done
    fi
    grep -m1 'xbzrle backends fuzzed' "$log" || true
    line=$(printf '%-20s %-16s executions=%-10s exec/s=%-8s cov=%-6s corpus=%-6s %ss' \
        "$t" "$res" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$corp" "$took")
    echo "$line"
    summary+=("$line")
done

step "summary ($((SECONDS - start_all)) s in all)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: FAILED targets: ${failed[*]} (inputs under fuzz/artifacts/, logs in $logdir)"
    exit 1
fi
echo "fuzz: all ${#summary[@]} targets ran ${secs}s each without a crash"
