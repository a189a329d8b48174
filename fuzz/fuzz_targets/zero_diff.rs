//! `is_zero` agrees with a byte loop at every length and alignment, on the
//! front door and on every backend.
//!
//! Input: the zero-buffer layout of `precopy_fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::{codecs, naive_is_zero, zero_buf};

fuzz_target!(|data: &[u8]| {
    let (storage, start, len) = zero_buf(data);
    let buf = &storage[start..start + len];
    let check = |what: &dyn Fn() -> String, b: &[u8]| {
        let want = naive_is_zero(b);
        assert_eq!(xbzrle::is_zero(b), want, "xbzrle::is_zero: {}", what());
        for codec in codecs() {
            assert_eq!(
                codec.is_zero(b),
                want,
                "{}: {}",
                codec.backend().name(),
                what()
            );
        }
    };
    check(&|| format!("len {len} align {}", start % 64), buf);
    // Every head and tail trim within the first/last 72 bytes: all
    // alignments of both ends relative to 8/16/32/64-byte blocks.
    for cut in 1..=len.min(72) {
        check(&|| format!("len {len} trimmed head {cut}"), &buf[cut..]);
        check(
            &|| format!("len {len} trimmed tail {cut}"),
            &buf[..len - cut],
        );
    }
});
