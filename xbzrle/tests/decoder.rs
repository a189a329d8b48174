//! Decoder acceptance and refusal: QEMU's rules, the error's kind and
//! offset, and the page untouched on every refusal.

use xbzrle::{DecodeErrorKind as K, PAGE_SIZE, Page};

fn base() -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    p
}

fn refused(delta: &[u8], kind: K, offset: usize) {
    let mut page = base();
    let err = xbzrle::decode(delta, &mut page).unwrap_err();
    assert_eq!(
        (err.kind(), err.offset()),
        (kind, offset),
        "delta {delta:02x?}: {err}"
    );
    assert!(page == base(), "page touched by refused delta {delta:02x?}");
    let mut page = base();
    let rerr = xbzrle::reference::decode(delta, &mut page).unwrap_err();
    assert_eq!(rerr, err, "reference disagrees on {delta:02x?}");
    assert!(page == base());
    assert!(!err.to_string().is_empty());
}

#[test]
fn issue_refusals() {
    refused(&[0x05, 0x00, 0x00], K::EmptyLiteralRun, 1);
    refused(&[0x05], K::Truncated, 0);
    refused(&[0x80, 0x20, 0x01, 0x01], K::PastEndOfPage, 2);
    refused(&[0x00, 0x00], K::Truncated, 1);
    refused(&[0x00, 0x05, 0x01, 0x02], K::LiteralPastEndOfInput, 1);
}

#[test]
fn more_refusals() {
    // a zero run of 0 after the first pair
    refused(&[0x00, 0x01, 0xaa, 0x00, 0x01, 0xbb], K::EmptyZeroRun, 3);
    // three-byte lengths
    refused(&[0x80, 0x80, 0x01, 0x01, 0xaa], K::LengthTooLong, 0);
    refused(&[0x00, 0x81, 0x80, 0x01], K::LengthTooLong, 1);
    // a zero run passing the end of the page
    refused(&[0x81, 0x20, 0x01, 0x01], K::PastEndOfPage, 0);
    // a literal passing the end of the page
    refused(&[0xff, 0x1f, 0x02, 0xaa, 0xbb], K::PastEndOfPage, 2);
    // one trailing byte after a good pair
    refused(&[0x00, 0x01, 0xaa, 0x05], K::Truncated, 3);
    // a good pair then a bad one: the good one must not be applied either
    refused(
        &[0x00, 0x01, 0xaa, 0x05, 0x04, 0x01],
        K::LiteralPastEndOfInput,
        4,
    );
}

#[test]
fn acceptances() {
    let mut page = base();
    xbzrle::decode(&[], &mut page).unwrap();
    assert!(page == base());

    xbzrle::decode(&[0x00, 0x01, 0xab], &mut page).unwrap();
    let mut want = base();
    want[0] = 0xab;
    assert!(page == want);

    // non-minimal zero run of 0
    let mut page = base();
    xbzrle::decode(&[0x80, 0x00, 0x01, 0x7e], &mut page).unwrap();
    want[0] = 0x7e;
    assert!(page == want);

    // a literal up to the very last byte; a whole-page literal
    let mut page = base();
    xbzrle::decode(&[0xff, 0x1f, 0x01, 0x55], &mut page).unwrap();
    assert_eq!(page[4095], 0x55);
    let mut whole = vec![0x00, 0x80, 0x20];
    whole.extend(std::iter::repeat_n(0x33u8, PAGE_SIZE));
    xbzrle::decode(&whole, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0x33));
    // literal bytes may equal the old ones (non-canonical but valid)
    let mut page = base();
    let b0 = page[0];
    xbzrle::decode(&[0x00, 0x01, b0], &mut page).unwrap();
    assert!(page == base());
}

/// Every delta of up to 2 bytes, every 3-byte delta over a 64-value
/// alphabet and every 5-byte delta over an 11-value one: the decoder never panics, agrees with the reference, and
/// leaves the page untouched on refusal.
#[test]
#[cfg_attr(miri, ignore = "a million decodes; far too slow under Miri")]
fn all_short_deltas_agree_with_reference() {
    let alphabet = [
        0x00u8, 0x01, 0x02, 0x7f, 0x80, 0x81, 0x9f, 0xa0, 0xff, 0x20, 0x1f,
    ];
    let check = |delta: &[u8]| {
        let mut a = base();
        let mut b = base();
        let ra = xbzrle::decode(delta, &mut a);
        let rb = xbzrle::reference::decode(delta, &mut b);
        assert_eq!(ra, rb, "{delta:02x?}");
        assert!(a == b, "{delta:02x?}");
        if ra.is_err() {
            assert!(a == base());
        }
    };
    for x in 0..=0xffffu32 {
        let [a, b, _, _] = x.to_le_bytes();
        check(&[a]);
        check(&[a, b]);
    }
    let wide: Vec<u8> = (0..=255u8)
        .filter(|v| v % 4 == 0 || v % 0x20 <= 2)
        .take(64)
        .collect();
    for &a in &wide {
        for &b in &wide {
            for &c in &wide {
                check(&[a, b, c]);
            }
        }
    }
    for &a in &alphabet {
        for &b in &alphabet {
            for &c in &alphabet {
                for &d in &alphabet {
                    for &e in &alphabet {
                        check(&[a, b, c, d, e]);
                    }
                }
            }
        }
    }
}

/// `delta` decodes onto `base()` exactly as the reference does (result,
/// kind, offset, page), and a refusal leaves the page untouched.
fn agrees(delta: &[u8]) {
    let mut a = base();
    let mut b = base();
    let ra = xbzrle::decode(delta, &mut a);
    let rb = xbzrle::reference::decode(delta, &mut b);
    assert_eq!(ra, rb, "{delta:02x?}");
    assert!(a == b, "pages differ for {delta:02x?}");
    if ra.is_err() {
        assert!(a == base(), "page touched by refused {delta:02x?}");
    }
}

/// Appends one pair (lengths as ULEB128, one or two bytes) with a literal
/// of `n` bytes.
fn push_pair(delta: &mut Vec<u8>, z: usize, n: usize) {
    for v in [z, n] {
        if v < 0x80 {
            delta.push(v as u8);
        } else {
            delta.extend([(v as u8 & 0x7f) | 0x80, (v >> 7) as u8]);
        }
    }
    delta.extend((0..n).map(|k| (k * 13 + z) as u8 | 1));
}

/// The decoder takes pairs with one-byte lengths in one step. Around every
/// place where that step hands over to the exact rules (the end of the
/// delta, the end of the page, zero and two-byte lengths): deltas whose
/// last pair ends the page at 4090..=4100 with literals of 1 to 127 bytes,
/// every prefix of each, and each with one of its last 6 bytes replaced,
/// decode exactly as the reference.
#[test]
#[cfg_attr(miri, ignore = "tens of thousands of decodes; slow under Miri")]
fn one_step_pairs_near_the_ends_agree_with_reference() {
    let mut checked = 0;
    // (first zero run of 0?, largest last zero run: 127 gives a one-byte
    // one in 8..=127, 254 a two-byte one in 135..=254)
    for (first_zero, z_max) in [(false, 127), (true, 127), (false, 254), (true, 254)] {
        for page_end in 4090..=4100usize {
            for last_n in [1usize, 2, 7, 8, 9, 31, 32, 33, 126, 127] {
                let mut delta = Vec::new();
                let mut d = 0;
                if first_zero {
                    push_pair(&mut delta, 0, 5);
                    d = 5;
                }
                // Short pairs up to the last one, which ends at `page_end`.
                while d + z_max + last_n < page_end {
                    push_pair(&mut delta, 100, 20);
                    d += 120;
                }
                let z = page_end - last_n - d;
                assert!(z + 120 > z_max && z <= z_max);
                push_pair(&mut delta, z, last_n);
                for cut in 0..=delta.len() {
                    agrees(&delta[..cut]);
                    checked += 1;
                }
                for back in 1..=6.min(delta.len()) {
                    for v in [0x00u8, 0x01, 0x02, 0x7e, 0x7f, 0x80, 0x81, 0xff] {
                        let mut m = delta.clone();
                        let at = m.len() - back;
                        m[at] = v;
                        agrees(&m);
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 10_000, "{checked} deltas checked");
}

/// Long deltas: the decoder validates a delta before applying it and
/// remembers the first 256 pairs, validating and applying the ones past
/// them separately. Deltas of 2 to 2048 pairs whose literals total up to
/// 4 KiB, cut at every pair boundary and every byte around it, and with a
/// refusal planted in every pair, decode exactly as the reference (the
/// page untouched on every refusal).
#[test]
#[cfg_attr(miri, ignore = "thousands of whole-page decodes; slow under Miri")]
fn long_deltas_with_refusals_leave_the_page_untouched() {
    let mut checked = 0;
    for (z, n) in [
        (1usize, 100usize),
        (3, 31),
        (1, 127),
        (7, 200),
        (2, 1000),
        (1, 7),
        (1, 1),
    ] {
        let mut delta = Vec::new();
        let mut starts = Vec::new();
        let mut d = 0;
        while d + z + n <= PAGE_SIZE {
            starts.push(delta.len());
            push_pair(&mut delta, z, n);
            d += z + n;
        }
        agrees(&delta);
        for &s in &starts {
            for cut in s.saturating_sub(2)..=(s + 3).min(delta.len()) {
                agrees(&delta[..cut]);
                checked += 1;
            }
            // a zero run of 0, a three-byte length, a literal past the
            // page, planted in this pair
            for (k, v) in [(0, 0x00u8), (0, 0x80), (1, 0x00), (1, 0xff)] {
                if s + k < delta.len() {
                    let mut m = delta.clone();
                    m[s + k] = v;
                    agrees(&m);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 500, "{checked} deltas checked");
}
