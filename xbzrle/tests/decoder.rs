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
