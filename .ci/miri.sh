#!/usr/bin/env bash
# Miri: the tests of xbzrle, precopy-pagecache and precopy-stream under
# `cargo +nightly miri test` (undefined behaviour, out-of-bounds access,
# alignment, provenance and leaks in everything Miri can execute). xbzrle's
# SIMD backends are compiled out of dispatch under cfg(miri) by
# xbzrle/src/dispatch.rs (SIMD_ALLOWED), so only Backend::Scalar runs here;
# the SIMD kernels are covered by .ci/asan.sh and .ci/fuzz.sh instead.
#
# Runs from the repository root on a fresh machine: installs nightly and the
# miri and rust-src components when missing. Budget: about 10 minutes.
#
# Env: PROPTEST_CASES (default 4 under Miri), MIRI_PACKAGES (subset).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== miri: %s ===\n' "$*"; }
start_all=$SECONDS

# Tests Miri does not run, in one place, each with its reason. Names are
# substring filters passed to the test harness as `--skip NAME`, applied to
# every test binary of the package (lib, tests/*.rs, doctests).
#   package|name|reason
SKIPS=(
    "xbzrle|qemu_vectors_decode_and_reencode_on_every_backend|reads xbzrle-vectors.bin.xz through liblzma (C, FFI): Miri cannot call it; 77 MB"
    "xbzrle|is_zero_every_length_alignment_and_position|64 alignments x 310 lengths x every position: hours under Miri; zero_diff fuzz and props cover it"
    "xbzrle|many_runs_periodic|thousands of whole-page encodes: 4 min under Miri; covered natively by cargo test and the fuzz targets"
    "xbzrle|block_boundary_runs|15 boundary cases x 2 bases x whole-page encodes: about 4 min under Miri; runs natively, under ASan and in the fuzz targets"
    "xbzrle|output_length_sweeps|~100 page pairs x 16 output lengths: over 5 min under Miri; runs natively, under ASan and in xbzrle_encode_diff"
    "precopy-pagecache|matches_model|proptest model runs of up to 300 page inserts per case: minutes per case under Miri"
    "precopy-pagecache|matches_qemu_and_model|as matches_model"
    "precopy-pagecache|huge_budgets_are_errors_not_aborts|asks for terabyte-sized allocations to check they fail cleanly; Miri aborts with resource exhaustion instead of returning the allocation error"
    "precopy-pagecache|set_associative_grow_keeps_all|fills and regrows a multi-MiB cache page by page: about 1 min under Miri; set_associative_shrink_keeps_most_recent covers resize"
    "precopy-pagecache|set_associative_shrink_to_odd_size_keeps_data_and_regrows|as set_associative_grow_keeps_all"
    "precopy-pagecache|trace_matches_the_stream_record_counts|replays the 45k-record QEMU page trace: far too slow under Miri"
    "precopy-pagecache|direct_mapped_at_qemus_size_reproduces_qemus_misses|replays the QEMU page trace"
    "precopy-pagecache|default_policy_beats_direct_mapped_on_the_real_trace|replays the QEMU page trace"
    "precopy-pagecache|replay_follows_qemus_engine|replays the QEMU page trace"
    "precopy-stream|every_flag_combination_is_understood_or_refused_by_name|4096 flag words, each a whole stream decode: over 4 min under Miri; runs natively"
    "precopy-stream|truncated_records_are_truncation_errors_at_their_offset|decodes a stream cut at every byte: over 2 min under Miri; runs natively, and stream_records fuzzes truncation"
    "precopy-stream|reader_gives_the_same_result_for_any_chunking|re-reads a stream once per chunk size: over 3 min under Miri; the stream_records fuzz target checks pieces == whole"
    "precopy-stream|writer_output_reads_back_and_counts_every_byte|writes and re-reads hundreds of pages: 2.5 min under Miri; runs natively"
    "precopy-stream|xbzrle_stream_matches_expected|reads the QEMU stream through liblzma (FFI); 72 MB"
    "precopy-stream|plain_stream_matches_expected|reads the QEMU stream through liblzma (FFI); 62 MB"
    "precopy-stream|xbzrle_ram_equals_plain_ram|reads both QEMU streams through liblzma (FFI)"
    "precopy-stream|rewriting_xbzrle_stream_is_byte_identical|reads the QEMU stream through liblzma (FFI)"
    "precopy-stream|rewriting_plain_stream_is_byte_identical|reads the QEMU stream through liblzma (FFI)"
    "precopy-stream|tiny_cases_are_where_the_readme_says|reads the QEMU stream through liblzma (FFI)"
    "precopy-stream|vm_description_is_found_past_qemu_device_state|reads the QEMU stream through liblzma (FFI)"
    "precopy-stream|device_state_is_read_to_the_end_and_split_along_the_vm_description|reads both QEMU streams through liblzma (FFI)"
    "precopy-stream|qemu10_fixture_parses_to_the_expected_ram|reads the QEMU 10 mapped-ram fixture through libzstd (FFI)"
    "precopy-stream|fresh_qemu10_file_parses_to_the_expected_ram|runs QEMU 10 and python3: Miri cannot spawn processes"
    "precopy-stream|precopy_written_ram_with_qemus_device_state_loads_in_qemu10|runs QEMU 10 and python3: Miri cannot spawn processes"
    "precopy-stream|zstd_and_zlib_pages_load_to_the_page|tests/compressed.rs: zstd is C (FFI through precopy-compress), which Miri cannot run; runs natively and in the stream_compressed fuzz target"
    "precopy-stream|the_record_is_laid_out_as_documented|tests/compressed.rs: zstd is C (FFI through precopy-compress), which Miri cannot run; runs natively and in the stream_compressed fuzz target"
    "precopy-stream|the_encoder_refuses_methods_without_a_record_and_bad_lengths|tests/compressed.rs: zstd is C (FFI through precopy-compress), which Miri cannot run; runs natively and in the stream_compressed fuzz target"
    "precopy-stream|an_unknown_method_is_refused_at_the_record|tests/compressed.rs: zstd is C (FFI through precopy-compress), which Miri cannot run; runs natively and in the stream_compressed fuzz target"
    "precopy-stream|a_corrupt_zstd_frame_is_refused_page_untouched|tests/compressed.rs: zstd is C (FFI through precopy-compress), which Miri cannot run; runs natively and in the stream_compressed fuzz target"
    "precopy-stream|a_frame_that_inflates_past_a_page_is_refused|tests/compressed.rs: zstd is C (FFI through precopy-compress), which Miri cannot run; runs natively and in the stream_compressed fuzz target"
    "precopy-stream|an_oversized_or_empty_frame_length_is_refused_by_the_decoder|tests/compressed.rs: zstd is C (FFI through precopy-compress), which Miri cannot run; runs natively and in the stream_compressed fuzz target"
    "precopy-stream|a_cut_record_is_incomplete_not_an_error|tests/compressed.rs: zstd is C (FFI through precopy-compress), which Miri cannot run; runs natively and in the stream_compressed fuzz target"
    "precopy-stream|write_pages_runs_skip_zero_pages_and_leave_holes|writes mapped-ram files of several MiB: over 10 min under Miri; runs natively"
    "precopy-stream|round_trip|mapped-ram files of several MiB (1 MiB-aligned page regions) per case, 48 proptest cases: over 6 min under Miri; runs natively, and mapped_ram_parse fuzzes the reader"
)

step "toolchain"
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
installed=$(rustup +nightly component list --installed)
for c in miri rust-src; do
    if ! grep -q "^$c" <<<"$installed"; then
        rustup +nightly component add "$c"
    fi
done
cargo +nightly miri --version
cargo +nightly miri setup >/dev/null

# Under Miri only the scalar backend runs (see above): require nothing else,
# whatever the caller exported.
export XBZRLE_REQUIRE_BACKENDS=scalar
export PROPTEST_CASES=${PROPTEST_CASES:-4}
# Isolation off: proptest reads its regression files and the clock.
export MIRIFLAGS=${MIRIFLAGS:--Zmiri-disable-isolation -Zmiri-strict-provenance}
echo "XBZRLE_REQUIRE_BACKENDS=$XBZRLE_REQUIRE_BACKENDS PROPTEST_CASES=$PROPTEST_CASES MIRIFLAGS=$MIRIFLAGS"

packages=${MIRI_PACKAGES:-xbzrle precopy-pagecache precopy-stream}
results=()
failed=()
for p in $packages; do
    skip_args=()
    for s in "${SKIPS[@]}"; do
        IFS='|' read -r sp name reason <<<"$s"
        if [ "$sp" = "$p" ]; then
            skip_args+=(--skip "$name")
            echo "$p: skipping '$name': $reason"
        fi
    done
    step "cargo +nightly miri test -p $p"
    t0=$SECONDS
    # --report-time (nightly libtest) prints each test's time under Miri.
    if cargo +nightly miri test --no-fail-fast -p "$p" -- -Zunstable-options --report-time "${skip_args[@]}"; then
        res=ok
    else
        res=FAILED
        failed+=("$p")
    fi
    results+=("$(printf '%-20s %-7s %ss (%d tests skipped by name)' "$p" "$res" "$((SECONDS - t0))" "$((${#skip_args[@]} / 2))")")
done

step "summary ($((SECONDS - start_all)) s in all)"
printf '%s\n' "${results[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "miri: FAILED: ${failed[*]}"
    exit 1
fi
echo "miri: all packages passed"
