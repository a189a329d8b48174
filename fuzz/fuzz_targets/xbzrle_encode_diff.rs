//! Arbitrary (old, new, output length): every encoder backend, and the
//! front door, give the bytes of `xbzrle::reference::encode` and the same
//! overflow decision, and never write past the output length (guard bytes
//! after the buffer stay intact; ASan flags writes past the allocation).
//! `encode_and_update` agrees too and leaves the cache copy equal to `new`
//! on `Ok` and on overflow.
//!
//! Input: the page-pair layout of `precopy_fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::{GUARD, GUARD_BYTE, codecs, page_pair};
use xbzrle::{EncodeError, PAGE_SIZE};

fn guard_ok(buf: &[u8], out_len: usize) -> bool {
    buf[out_len..].iter().all(|&b| b == GUARD_BYTE)
}

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
    match want {
        Ok(n) => assert!(
            n == canonical && want_buf[..n] == big[..n],
            "reference not deterministic"
        ),
        Err(e) => assert_eq!(e, EncodeError::Overflow),
    }
    assert!(guard_ok(&want_buf, out_len), "reference wrote past out_len");

    let check = |name: &str, got: Result<usize, EncodeError>, buf: &[u8]| {
        assert_eq!(
            got, want,
            "{name}: result differs from reference (out_len {out_len}, canonical {canonical})"
        );
        if let Ok(n) = got {
            assert!(
                buf[..n] == want_buf[..n],
                "{name}: delta bytes differ from reference"
            );
        }
        assert!(
            guard_ok(buf, out_len),
            "{name}: wrote past out_len {out_len}"
        );
    };

    let mut buf = vec![GUARD_BYTE; out_len + GUARD];
    check(
        "xbzrle::encode",
        xbzrle::encode(&pair.old, &pair.new, &mut buf[..out_len]),
        &buf,
    );

    for codec in codecs() {
        let name = codec.backend().name();
        let mut buf = vec![GUARD_BYTE; out_len + GUARD];
        check(
            name,
            codec.encode(&pair.old, &pair.new, &mut buf[..out_len]),
            &buf,
        );

        // The cache copy holds `new` in every case, overflow included
        // (QEMU then sends the page whole, and the cache must match it).
        let mut cached = pair.old.clone();
        let mut buf = vec![GUARD_BYTE; out_len + GUARD];
        let got = codec.encode_and_update(&mut cached, &pair.new, &mut buf[..out_len]);
        check(&format!("{name} encode_and_update"), got, &buf);
        assert!(
            cached[..] == pair.new[..],
            "{name}: encode_and_update left the cache != new"
        );
    }
});
