//! Inputs found by the fuzz targets in `fuzz/` (cargo-fuzz), replayed on
//! stable by `cargo test` forever: one `#[test]` per finding, the bytes
//! inline, named after the target that found it. A finding is either a bug
//! that was fixed (the test pins the fix) or a harness assumption that was
//! wrong (the test pins the crate's documented behaviour the harness now
//! checks).
//!
//! To add one: `cargo +nightly fuzz run TARGET` stops with
//! `fuzz/artifacts/TARGET/crash-...`; `.ci/fuzz.sh` prints its bytes in hex.
//! The fuzz input layouts are documented in `fuzz/src/lib.rs`.

use xbzrle::{DecodeErrorKind, PAGE_SIZE, Page, reference};

/// `pattern_page(seed)` of `fuzz/src/lib.rs`, so inputs replay exactly.
fn pattern_page(seed: u8) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    if seed != 0 {
        for (i, b) in p.iter_mut().enumerate() {
            let lo = (i as u8).wrapping_mul(seed | 1).wrapping_add(seed);
            *b = lo.rotate_left((i >> 8) as u32 % 8);
        }
    }
    p
}

/// Replays an `xbzrle_decode` input: `[page seed] delta...`. Checks what the
/// target checks: production and reference decoders agree on result, kind
/// and offset; the page is untouched on error; the offset is within the
/// delta (at most its length, for "ended where a length was due").
fn replay_decode(input: &[u8]) -> Result<(), xbzrle::DecodeError> {
    let (seed, delta) = input.split_first().expect("seed byte");
    let old = pattern_page(*seed);
    let mut page = old.clone();
    let got = xbzrle::decode(delta, &mut page);
    let mut ref_page = old.clone();
    assert_eq!(got, reference::decode(delta, &mut ref_page));
    assert!(page[..] == ref_page[..]);
    if let Err(e) = got {
        assert!(page[..] == old[..], "page changed on error");
        assert!(e.offset() <= delta.len());
    }
    got
}

/// xbzrle_decode, first run: a delta that ends right after a two-byte
/// zero-run length (0x80 0x01 = 128). The literal length is missing, and the
/// error is `Truncated` at offset 2, which is the delta's length, not an
/// offset inside it. The harness had assumed `offset < len`; the decoder's
/// behaviour (report where the missing length was due) is right, and is
/// pinned here.
#[test]
fn fuzz_xbzrle_decode_truncated_at_end_reports_end_offset() {
    let e = replay_decode(&[0x4e, 0x80, 0x01]).unwrap_err();
    assert_eq!((e.kind(), e.offset()), (DecodeErrorKind::Truncated, 2));
    // and the one-byte variant: a zero run of 5, nothing after it
    let e = replay_decode(&[0x4e, 0x05, 0x01]).unwrap_err();
    assert_eq!((e.kind(), e.offset()), (DecodeErrorKind::Truncated, 1));
}
