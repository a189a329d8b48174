//! decode(encode(old, new)) onto old gives new, for every encoder backend,
//! with both decoders; an identical pair encodes to the empty delta; a
//! page-sized buffer holds every delta up to a page; `encode_and_update`
//! gives the same delta and leaves the cache copy equal to new.
//!
//! Input: the page-pair layout of `precopy_fuzz` (the output length field
//! is ignored: the buffer always fits).
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::{codecs, page_pair};
use xbzrle::PAGE_SIZE;

fuzz_target!(|data: &[u8]| {
    let pair = page_pair(data);
    let identical = pair.old[..] == pair.new[..];
    for codec in codecs() {
        let name = codec.backend().name();
        let mut out = vec![0u8; 2 * PAGE_SIZE];
        let n = codec
            .encode(&pair.old, &pair.new, &mut out)
            .expect("two pages hold any delta");
        assert_eq!(n == 0, identical, "{name}: empty delta iff identical");

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
            // QEMU's policy: a page-sized buffer holds the delta exactly.
            let mut small = vec![0u8; PAGE_SIZE];
            assert_eq!(
                codec.encode(&pair.old, &pair.new, &mut small),
                Ok(n),
                "{name}: page-sized buffer"
            );
        }

        let mut cached = pair.old.clone();
        let mut out2 = vec![0u8; 2 * PAGE_SIZE];
        assert_eq!(
            codec.encode_and_update(&mut cached, &pair.new, &mut out2),
            Ok(n),
            "{name}: encode_and_update"
        );
        assert!(
            out2[..n] == out[..n],
            "{name}: encode_and_update delta differs"
        );
        assert!(
            cached[..] == pair.new[..],
            "{name}: encode_and_update left cache != new"
        );
    }
});
