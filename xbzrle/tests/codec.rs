//! Known answers, block-boundary runs, guard bytes and output-length sweeps,
//! on every available backend against the reference encoder.

mod common;

use common::{changed, check_pair, check_roundtrip, codecs, noise_page, reference_delta};
use xbzrle::{EncodeError, PAGE_SIZE, Page};

const ZERO: Page = [0; PAGE_SIZE];

/// old/new of the first known answer (bytes 1001..=1021).
fn known_pair() -> (Page, Page) {
    let mut old = ZERO;
    let mut new = ZERO;
    let new_bytes: Vec<u8> = (1..=0x0f).chain([0x68, 0, 0, 0x67, 0, 0x69]).collect();
    let old_bytes: Vec<u8> = (5..=0x13).chain([0x68, 0, 0, 0x6b, 0, 0x6d]).collect();
    assert_eq!(new_bytes.len(), 21);
    new[1001..1022].copy_from_slice(&new_bytes);
    old[1001..1022].copy_from_slice(&old_bytes);
    (old, new)
}

#[test]
fn reference_known_answers() {
    let (old, new) = known_pair();
    let mut want: Vec<u8> = vec![0xe9, 0x07, 0x0f];
    want.extend(1..=0x0f);
    want.extend([0x03, 0x01, 0x67, 0x01, 0x01, 0x69]);
    assert_eq!(reference_delta(&old, &new), want);

    let mut last = ZERO;
    last[4095] = 0x42;
    assert_eq!(reference_delta(&ZERO, &last), [0xff, 0x1f, 0x01, 0x42]);

    let mut tail = ZERO;
    tail[3..].fill(0xff);
    let mut out = [0u8; PAGE_SIZE];
    let n = xbzrle::reference::encode(&ZERO, &tail, &mut out).unwrap();
    assert_eq!(n, PAGE_SIZE);
    assert_eq!(&out[..3], &[0x03, 0xfd, 0x1f]);
    assert!(out[3..].iter().all(|&b| b == 0xff));

    let mut comb = ZERO;
    comb.iter_mut().step_by(2).for_each(|b| *b = 1);
    assert_eq!(
        xbzrle::reference::encode(&ZERO, &comb, &mut out),
        Err(EncodeError::Overflow)
    );

    assert_eq!(xbzrle::reference::encode(&ZERO, &ZERO, &mut out), Ok(0));
    assert_eq!(xbzrle::reference::encode(&ZERO, &ZERO, &mut []), Ok(0));
}

#[test]
fn known_answers_every_backend() {
    let (old, new) = known_pair();
    let mut last = ZERO;
    last[4095] = 0x42;
    let mut tail = ZERO;
    tail[3..].fill(0xff);
    let mut comb = ZERO;
    comb.iter_mut().step_by(2).for_each(|b| *b = 1);
    for c in codecs("known_answers_every_backend") {
        let name = c.backend().name();
        let mut out = [0u8; PAGE_SIZE];
        let n = c.encode(&old, &new, &mut out).unwrap();
        assert_eq!(&out[..n], &reference_delta(&old, &new)[..], "{name}");
        let n = c.encode(&ZERO, &last, &mut out).unwrap();
        assert_eq!(&out[..n], &[0xff, 0x1f, 0x01, 0x42], "{name}");
        let n = c.encode(&ZERO, &tail, &mut out).unwrap();
        assert_eq!(n, PAGE_SIZE, "{name}");
        assert_eq!(&out[..3], &[0x03, 0xfd, 0x1f], "{name}");
        assert_eq!(
            c.encode(&ZERO, &comb, &mut out),
            Err(EncodeError::Overflow),
            "{name}"
        );
        assert_eq!(c.encode(&ZERO, &ZERO, &mut out), Ok(0), "{name}");
        assert_eq!(c.encode(&new, &new, &mut []), Ok(0), "{name}");
        for (o, n) in [(&old, &new), (&ZERO, &last), (&ZERO, &tail), (&ZERO, &comb)] {
            check_pair(&c, o, n, PAGE_SIZE).ok();
        }
    }
}

#[test]
fn free_functions_use_an_available_backend() {
    let best = xbzrle::Codec::new().backend();
    assert!(best.is_available());
    assert_eq!(xbzrle::Backend::best(), best);
    println!("best backend: {}", best.name());
    let (old, new) = known_pair();
    let mut out = [0u8; PAGE_SIZE];
    let n = xbzrle::encode(&old, &new, &mut out).unwrap();
    assert_eq!(&out[..n], &reference_delta(&old, &new)[..]);
    let mut cached = old;
    let n2 = xbzrle::encode_and_update(&mut cached, &new, &mut out).unwrap();
    assert_eq!(n, n2);
    assert!(cached == new);
    assert!(xbzrle::is_zero(&ZERO));
    assert!(!xbzrle::is_zero(&new));
}

#[test]
fn names_are_distinct_and_unavailable_backends_are_refused() {
    use xbzrle::{Backend, Codec};
    let all = [
        Backend::Scalar,
        Backend::Sse2,
        Backend::Avx2,
        Backend::Avx512Bw,
        Backend::Neon,
    ];
    let names: std::collections::HashSet<_> = all.iter().map(|b| b.name()).collect();
    assert_eq!(names.len(), all.len());
    for b in all {
        assert_eq!(Codec::with_backend(b).is_some(), b.is_available(), "{b}");
        assert_eq!(Backend::available().any(|a| a == b), b.is_available());
    }
    assert!(Backend::Scalar.is_available());
    #[cfg(target_arch = "x86_64")]
    assert!(!Backend::Neon.is_available());
    #[cfg(target_arch = "aarch64")]
    assert!(!Backend::Avx2.is_available());
}

/// Runs ending exactly at 64- and 32-byte boundaries, and starting at them.
#[test]
fn block_boundary_runs() {
    let mut p = ZERO;
    p[10..64].fill(0x11);
    let mut want = vec![0x0a, 0x36];
    want.extend([0x11; 54]);
    assert_eq!(reference_delta(&ZERO, &p), want);

    let cases: &[(usize, usize)] = &[
        (10, 64),
        (10, 32),
        (32, 64),
        (0, 64),
        (63, 64),
        (63, 65),
        (64, 128),
        (31, 33),
        (0, 4096),
        (4032, 4096),
        (4064, 4096),
        (4095, 4096),
        (1, 4095),
        (100, 4000),
    ];
    // Miri interprets every byte: three cases on one base there.
    let (cases, bases) = if cfg!(miri) {
        (&cases[3..6], &[ZERO][..])
    } else {
        (cases, &[ZERO, noise_page(7)][..])
    };
    for c in codecs("block_boundary_runs") {
        for &(s, e) in cases {
            for base in bases {
                let new = changed(base, s..e);
                check_roundtrip(&c, base, &new);
            }
        }
        let mut out = [0u8; 64];
        let n = c.encode(&ZERO, &p, &mut out[..56]).unwrap();
        assert_eq!(&out[..n], &want[..], "{}", c.backend().name());
        assert_eq!(
            c.encode(&ZERO, &p, &mut out[..55]),
            Err(EncodeError::Overflow)
        );
    }
}

/// Output buffers from canonical length − 3 to + 2: same bytes and same
/// overflow decision as the reference, nothing written past the end.
#[test]
fn output_length_sweeps() {
    let mut pairs: Vec<(Page, Page)> = Vec::new();
    let (o, n) = known_pair();
    pairs.push((o, n));
    let base = noise_page(3);
    for (s, e) in [
        (0, 1),
        (4095, 4096),
        (0, 4096),
        (5, 200),
        (60, 70),
        (3, 4096),
    ] {
        pairs.push((base, changed(&base, s..e)));
    }
    // many short runs, several with two-byte lengths
    let mut many = base;
    for i in (0..4096).step_by(37) {
        many[i] ^= 0x80;
    }
    pairs.push((base, many));
    let mut long_gaps = base;
    for i in [0, 300, 301, 302, 2000, 4095] {
        long_gaps[i] ^= 1;
    }
    pairs.push((base, long_gaps));
    // dense pages near the 4096 limit (overflow around a 4 KiB buffer)
    let mut dense = base;
    for i in (0..4096).step_by(150) {
        let e = (i + 140).min(4096);
        for b in &mut dense[i..e] {
            *b ^= 0x5a;
        }
    }
    pairs.push((base, dense));

    if cfg!(miri) {
        pairs.truncate(2); // Miri interprets every byte
    }
    for c in codecs("output_length_sweeps") {
        for (old, new) in &pairs {
            let canon = reference_delta(old, new).len();
            for cap in canon.saturating_sub(3)..=canon + 2 {
                let r = check_pair(&c, old, new, cap);
                assert_eq!(r.is_ok(), cap >= canon);
            }
            for cap in [0, 1, 2, 3, 4, 5, 35, 36, 37, 68, PAGE_SIZE] {
                check_pair(&c, old, new, cap).ok();
            }
        }
    }
}

/// Every short buffer length for a handful of pairs (the overflow decision at
/// every possible cut).
#[test]
#[cfg_attr(miri, ignore = "thousands of encodes; too slow under Miri")]
fn every_output_length() {
    let base = noise_page(11);
    let mut sparse = base;
    for i in [
        0usize, 1, 2, 63, 64, 127, 128, 129, 200, 1000, 1001, 4000, 4095,
    ] {
        sparse[i] ^= 0xff;
    }
    let pairs = [
        (base, sparse),
        (base, changed(&base, 100..300)),
        known_pair(),
    ];
    for c in codecs("every_output_length") {
        for (old, new) in &pairs {
            let canon = reference_delta(old, new).len();
            for cap in 0..=canon + 70 {
                check_pair(&c, old, new, cap).ok();
            }
        }
    }
}

/// Exhaustive ULEB128 round trip over every run length the format carries.
#[test]
fn uleb128_round_trip() {
    use xbzrle::format::{MAX_RUN, uleb128_decode_small, uleb128_encode_small, uleb128_len};
    for v in 0..=MAX_RUN {
        let mut buf = [0xeeu8; 3];
        let n = uleb128_encode_small(v, &mut buf).unwrap();
        assert_eq!(n, uleb128_len(v));
        assert_eq!(n, if v < 0x80 { 1 } else { 2 });
        assert_eq!(buf[2], 0xee);
        assert_eq!(uleb128_decode_small(&buf[..n]), Some((v, n)));
        assert_eq!(uleb128_encode_small(v, &mut buf[..n - 1]), None);
    }
    // non-minimal two-byte forms are read; three-byte forms are refused
    assert_eq!(uleb128_decode_small(&[0x80, 0x00]), Some((0, 2)));
    assert_eq!(uleb128_decode_small(&[0x81, 0x80, 0x01]), None);
    assert_eq!(uleb128_decode_small(&[0x81]), None);
    assert_eq!(uleb128_decode_small(&[]), None);
}
