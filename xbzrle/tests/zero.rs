//! `is_zero` on every backend against the plain definition, for every short
//! length and alignment and a single non-zero byte at every position.

mod common;

use common::codecs;

#[test]
fn is_zero_every_length_alignment_and_position() {
    let mut buf = vec![0u8; 4096 + 64 + 64];
    for c in codecs("is_zero_every_length_alignment_and_position") {
        let name = c.backend().name();
        // Miri interprets every byte: a lighter sweep there.
        let (aligns, short) = if cfg!(miri) { (3, 70) } else { (64, 300) };
        for align in 0..aligns {
            for len in (0..=short).chain([511, 512, 513, 1000, 4095, 4096, 4097, 4159]) {
                let s = &mut buf[align..align + len];
                assert!(c.is_zero(s), "{name}: zero, align {align} len {len}");
                let step = if len > 300 { 61 } else { 1 };
                for pos in (0..len).step_by(step).chain(len.checked_sub(1)) {
                    s[pos] = 0x10;
                    assert!(!c.is_zero(s), "{name}: align {align} len {len} pos {pos}");
                    s[pos] = 0;
                }
            }
        }
        assert!(c.is_zero(&[]));
        let page = [0u8; xbzrle::PAGE_SIZE];
        assert!(c.is_zero(&page));
    }
}
