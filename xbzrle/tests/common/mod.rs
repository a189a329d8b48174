//! Shared helpers for the xbzrle integration tests.
#![allow(dead_code)]

use xbzrle::{Backend, Codec, PAGE_SIZE, Page};

/// The codecs of every backend this CPU runs. Prints them (so a CI log shows
/// what was exercised) and fails when `XBZRLE_REQUIRE_BACKENDS` (comma
/// separated names, e.g. `avx2,avx512bw`) names one that is not available.
pub(crate) fn codecs(test: &str) -> Vec<Codec> {
    let names: Vec<&str> = Backend::available().map(|b| b.name()).collect();
    println!("{test}: backends run: {}", names.join(","));
    if let Ok(req) = std::env::var("XBZRLE_REQUIRE_BACKENDS") {
        for want in req.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            assert!(
                names.contains(&want),
                "XBZRLE_REQUIRE_BACKENDS wants backend {want:?}, but this CPU/build only runs {names:?}"
            );
        }
    }
    let codecs: Vec<Codec> = Backend::available()
        .map(|b| Codec::with_backend(b).expect("available backend"))
        .collect();
    assert!(codecs.iter().any(|c| c.backend() == Backend::Scalar));
    codecs
}

/// A deterministic page of pseudo-random bytes (xorshift64*).
pub(crate) fn noise_page(seed: u64) -> Page {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut p = [0u8; PAGE_SIZE];
    for chunk in p.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        chunk.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    p
}

/// `base` with bytes `range` changed (each XORed with a non-zero value).
pub(crate) fn changed(base: &Page, range: std::ops::Range<usize>) -> Page {
    let mut p = *base;
    for (k, i) in range.enumerate() {
        p[i] ^= (k as u8 % 255) + 1;
    }
    p
}

/// The canonical delta from the reference encoder (`None` never: a
/// 2×PAGE_SIZE buffer holds any delta).
pub(crate) fn reference_delta(old: &Page, new: &Page) -> Vec<u8> {
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    let n = xbzrle::reference::encode(old, new, &mut out).expect("fits 8 KiB");
    out.truncate(n);
    out
}

const GUARD: u8 = 0xa5;

/// Runs `codec` on (old, new) into a buffer of exactly `cap` bytes followed by
/// guard bytes; checks the guards; compares result and bytes with the
/// reference, and checks that `encode_and_update` gives the same result and
/// leaves the cache equal to `new`. Returns the result.
pub(crate) fn check_pair(
    codec: &Codec,
    old: &Page,
    new: &Page,
    cap: usize,
) -> Result<usize, xbzrle::EncodeError> {
    let canon = reference_delta(old, new);
    let mut ref_buf = vec![GUARD; cap];
    let want = xbzrle::reference::encode(old, new, &mut ref_buf);
    assert_eq!(want.is_ok(), canon.len() <= cap, "reference overflow rule");

    let mut buf = vec![GUARD; cap + 80];
    let got = codec.encode(old, new, &mut buf[..cap]);
    let name = codec.backend().name();
    assert!(
        buf[cap..].iter().all(|&b| b == GUARD),
        "{name}: wrote past out.len() = {cap}"
    );
    assert_eq!(
        got,
        want,
        "{name}: result differs from reference (cap {cap}, canonical {})",
        canon.len()
    );
    if let Ok(n) = got {
        assert_eq!(&buf[..n], &canon[..], "{name}: bytes differ from reference");
    }

    let mut cached = *old;
    let mut buf2 = vec![GUARD; cap + 80];
    let got2 = codec.encode_and_update(&mut cached, new, &mut buf2[..cap]);
    assert!(
        buf2[cap..].iter().all(|&b| b == GUARD),
        "{name}: update wrote past out.len()"
    );
    assert_eq!(got2, want, "{name}: encode_and_update result differs");
    if let Ok(n) = got2 {
        assert_eq!(
            &buf2[..n],
            &canon[..],
            "{name}: encode_and_update bytes differ"
        );
    }
    assert!(cached == *new, "{name}: cache does not hold the new page");
    got
}

/// `check_pair` with a roomy buffer, then decode the result onto `old`.
pub(crate) fn check_roundtrip(codec: &Codec, old: &Page, new: &Page) {
    let n = check_pair(codec, old, new, 2 * PAGE_SIZE).expect("fits 8 KiB");
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    codec.encode(old, new, &mut out).unwrap();
    let mut page = *old;
    xbzrle::decode(&out[..n], &mut page).expect("own delta decodes");
    assert!(
        page == *new,
        "{}: decode(encode) differs",
        codec.backend().name()
    );
}
