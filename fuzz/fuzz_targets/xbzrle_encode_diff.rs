//! Arbitrary (old, new, output length): every encoder backend gives the
//! bytes of `xbzrle::reference::encode` and the same overflow decision, and
//! never writes past the output length (guard bytes after the buffer stay
//! intact; ASan flags writes past the allocation).
//!
//! Input: the page-pair layout of `precopy_fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::{GUARD, GUARD_BYTE, for_each_encoder, page_pair};
use xbzrle::PAGE_SIZE;

fuzz_target!(|data: &[u8]| {
    let pair = page_pair(data);
    let mut big = vec![0u8; 2 * PAGE_SIZE];
    let canonical = xbzrle::reference::encode(&pair.old, &pair.new, &mut big)
        .expect("two pages hold any delta");
    let out_len = pair.out_len.resolve(canonical);

    let mut want_buf = vec![GUARD_BYTE; out_len + GUARD];
    let want = xbzrle::reference::encode(&pair.old, &pair.new, &mut want_buf[..out_len]);
    assert_eq!(
        want.is_ok(),
        canonical <= out_len,
        "reference overflow decision"
    );
    if let Ok(n) = want {
        assert_eq!(n, canonical);
        assert_eq!(&want_buf[..n], &big[..n]);
    }
    assert!(
        want_buf[out_len..].iter().all(|&b| b == GUARD_BYTE),
        "reference wrote past out_len"
    );

    for_each_encoder(|name, encode| {
        let mut buf = vec![GUARD_BYTE; out_len + GUARD];
        let got = encode(&pair.old, &pair.new, &mut buf[..out_len]);
        assert_eq!(
            got, want,
            "{name}: result differs from reference (out_len {out_len}, canonical {canonical})"
        );
        if let Ok(n) = got {
            assert_eq!(
                &buf[..n],
                &want_buf[..n],
                "{name}: delta bytes differ from reference"
            );
        }
        assert!(
            buf[out_len..].iter().all(|&b| b == GUARD_BYTE),
            "{name}: wrote past out_len {out_len}"
        );
    });
});
