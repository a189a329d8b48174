//! decode(encode(old, new)) onto old gives new, for every encoder backend,
//! with both decoders; an identical pair encodes to the empty delta.
//!
//! Input: the page-pair layout of `precopy_fuzz` (the output length field
//! is ignored: the buffer always fits).
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::{for_each_encoder, page_pair};
use xbzrle::PAGE_SIZE;

fuzz_target!(|data: &[u8]| {
    let pair = page_pair(data);
    for_each_encoder(|name, encode| {
        let mut out = vec![0u8; 2 * PAGE_SIZE];
        let n = encode(&pair.old, &pair.new, &mut out).expect("two pages hold any delta");
        assert_eq!(
            n == 0,
            pair.old[..] == pair.new[..],
            "{name}: empty delta iff identical"
        );
        let mut page = pair.old.clone();
        xbzrle::decode(&out[..n], &mut page)
            .unwrap_or_else(|e| panic!("{name}: own delta refused: {e}"));
        assert!(
            page[..] == pair.new[..],
            "{name}: roundtrip gives a different page"
        );
        let mut page = pair.old.clone();
        xbzrle::reference::decode(&out[..n], &mut page)
            .unwrap_or_else(|e| panic!("{name}: reference refused delta: {e}"));
        assert!(
            page[..] == pair.new[..],
            "{name}: reference roundtrip differs"
        );
        if n <= PAGE_SIZE {
            // What QEMU does: a page-sized buffer fits the delta exactly.
            let mut small = vec![0u8; PAGE_SIZE];
            assert_eq!(
                encode(&pair.old, &pair.new, &mut small),
                Ok(n),
                "{name}: page-sized buffer"
            );
        }
    });
});
