//! `is_zero` agrees with a byte loop at every length and alignment, on the
//! front door (any slice) and on every backend's page test.
//!
//! Input: the zero-buffer layout of `precopy_fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::{for_each_page_zero, naive_is_zero, zero_buf};
use xbzrle::{PAGE_SIZE, Page};

fuzz_target!(|data: &[u8]| {
    let (storage, start, len) = zero_buf(data);
    let buf = &storage[start..start + len];
    assert_eq!(
        xbzrle::is_zero(buf),
        naive_is_zero(buf),
        "len {len} start {start}"
    );
    // Every head and tail trim within the first/last 72 bytes: all
    // alignments of both ends relative to 8/16/32/64-byte blocks.
    for cut in 1..=len.min(72) {
        let head = &buf[cut..];
        let tail = &buf[..len - cut];
        assert_eq!(
            xbzrle::is_zero(head),
            naive_is_zero(head),
            "len {len} trimmed head {cut}"
        );
        assert_eq!(
            xbzrle::is_zero(tail),
            naive_is_zero(tail),
            "len {len} trimmed tail {cut}"
        );
    }
    if len >= PAGE_SIZE {
        for off in [0, len - PAGE_SIZE] {
            let page: &Page = buf[off..off + PAGE_SIZE]
                .try_into()
                .expect("PAGE_SIZE bytes");
            let want = naive_is_zero(page);
            for_each_page_zero(|name, is_zero| {
                assert_eq!(is_zero(page), want, "{name}: page at buffer offset {off}");
            });
        }
    }
});
