# Sourced by the .ci scripts: what this CPU is, and which XBZRLE backends a
# test run must therefore have exercised. Nothing here assumes one machine:
# CI runs on whatever x86_64 (or aarch64) CPU the next machine has.

# The comma-separated XBZRLE SIMD backends this CPU can run, from
# /proc/cpuinfo: sse2 on every x86_64, avx2 where the CPU reports avx2, bmi1,
# bmi2 and popcnt (the AVX2 backend uses all four), avx512bw only where it
# reports both avx512f and avx512bw; neon on aarch64
# (asimd). Prints nothing on a CPU with none of them.
has_avx2_backend_flags() {
    local f
    for f in avx2 bmi1 bmi2 popcnt; do grep -qw "$f" <<<"$1" || return 1; done
}

required_backends() {
    local flags req=""
    flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || true)
    case "$(uname -m)" in
        x86_64)
            req=sse2
            if has_avx2_backend_flags "$flags"; then req+=,avx2; fi
            if grep -qw avx512f <<<"$flags" && grep -qw avx512bw <<<"$flags"; then
                req+=,avx512bw
            fi
            ;;
        aarch64)
            if grep -qw asimd <<<"$flags"; then req=neon; fi
            ;;
    esac
    printf '%s\n' "$req"
}

# check_backends_ran LOG REQ: every backend named in REQ (comma-separated)
# appears in at least one "backends run:" line of LOG (the xbzrle tests print
# one per test that loops over backends). Prints what was required and what
# ran; returns 1 if a required backend never ran.
check_backends_ran() {
    local log=$1 req=$2 ran missing="" b
    ran=$(grep -o 'backends run: *[a-z0-9, ]*' "$log" | sed 's/backends run: *//' \
        | tr ', ' '\n\n' | grep -v '^$' | sort -u | tr '\n' ',' | sed 's/,$//')
    echo "backends required: ${req:-none}; backends that ran: ${ran:-none}"
    for b in ${req//,/ }; do
        if ! tr ',' '\n' <<<"$ran" | grep -qx "$b"; then missing+=" $b"; fi
    done
    if [ -n "$missing" ]; then
        echo "FAILED: required backend(s) did not run:$missing" >&2
        return 1
    fi
}

# collect_skips EXTRA ENTRY...: fills the array skip_args with `--skip NAME`
# for every "name|reason" ENTRY, plus EXTRA (a name from the caller's env, if
# non-empty), and prints each skip with its reason.
collect_skips() {
    local extra=$1 s name reason
    shift
    skip_args=()
    for s in "$@" ${extra:+"$extra|from the environment"}; do
        IFS='|' read -r name reason <<<"$s"
        skip_args+=(--skip "$name")
        echo "skipping '$name': $reason"
    done
}

# run_backend_tests TAG REQ START CMD...: runs the test command CMD (its
# output shown and kept), then prints a summary (test result lines, backends
# run, seconds since START) and fails if CMD failed or if a backend named in
# REQ did not run.
run_backend_tests() {
    local tag=$1 req=$2 start=$3 log rc t0=$SECONDS took
    shift 3
    log=$(mktemp)
    set +e
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    took=$((SECONDS - t0))
    printf '\n=== %s: summary (%s s in all) ===\n' "$tag" "$((SECONDS - start))"
    grep -E '^test result:|backends run:' "$log" | sort | uniq -c | sed 's/^ *//' || true
    if [ "$rc" -ne 0 ]; then
        echo "$tag: FAILED (exit $rc, ${took}s)"
        return 1
    fi
    check_backends_ran "$log" "$req" || { echo "$tag: FAILED: a required backend did not run"; return 1; }
    echo "$tag: passed (${took}s), backends required: $req"
}

# require_vectors SCRIPT FILE WHY: sets and exports PRECOPY_VECTORS (the
# caller's value, else ../shared/qemu-vectors beside the clone) and
# PRECOPY_REQUIRE_VECTORS=1, or exits 1 saying that SCRIPT needs FILE of the
# QEMU vectors because WHY, and how to get them.
require_vectors() {
    local script=$1 file=$2 why=$3 vec="${PRECOPY_VECTORS:-$PWD/../shared/qemu-vectors}"
    if [ ! -f "$vec/$file" ]; then
        echo "$script: QEMU vectors not found ($vec/$file); this script needs them ($why)." \
             "Put shared/ beside the clone or set PRECOPY_VECTORS=DIR" \
             "(scripts/qemu-vectors/make-vectors.sh regenerates a set)." >&2
        exit 1
    fi
    export PRECOPY_VECTORS="$vec" PRECOPY_REQUIRE_VECTORS=1
}
