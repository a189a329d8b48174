//! A multifd connection with arbitrary bytes (our layout, `precopy_stream::multifd`): the
//! hello parser, then the page channel's records decoded against a fixed two-block
//! MEM_SIZE and applied with `PageApplier` onto RAM that holds known bytes. No panic, no
//! allocation beyond the fuzz limits; a refused record is refused at its own offset and
//! leaves every page as it was; after an error the decoder refuses everything; a channel
//! is complete only after its EOS, and then any further byte is refused.
//!
//! Input: the connection's bytes (hello first).
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_stream::multifd::{HELLO_LEN, Hello, MULTIFD_MAGIC};
use precopy_stream::{
    Decoder, Item, LoadStats, PageApplier, RamBlockInfo, RamImage, RamRecord, RamTarget,
};

const FILL: u8 = 0x3c;

fuzz_target!(|data: &[u8]| {
    let hello = Hello::parse(data);
    if let Ok(h) = &hello {
        assert_eq!(Hello::parse(&h.to_bytes()), Ok(*h), "hello round trip");
        assert!(h.index <= h.channels && h.channels >= 1);
    }
    if data.len() >= 4 && u32::from_be_bytes([data[0], data[1], data[2], data[3]]) != MULTIFD_MAGIC
    {
        assert!(hello.is_err(), "a wrong magic is refused");
    }
    let body = data.get(HELLO_LEN..).unwrap_or(&[]);

    let blocks = vec![
        RamBlockInfo::new("pc.ram", 8 * 4096),
        RamBlockInfo::new("vga", 2 * 4096),
    ];
    let mut ram = RamImage::default();
    ram.set_blocks(&blocks, 1 << 20).unwrap();
    for b in 0..2 {
        let (_, len) = ram.block_info(b).unwrap();
        for off in (0..len).step_by(4096) {
            ram.page_mut(b, off).unwrap().fill(FILL);
        }
    }
    let mut dec = Decoder::multifd_channel(precopy_fuzz::stream_limits(), blocks);
    let mut ap = PageApplier::new();
    let mut stats = LoadStats::default();
    let mut rest = body;
    loop {
        let at = dec.position();
        match dec.decode(rest) {
            Ok(Some((item, n))) => {
                assert!(n > 0 && n <= rest.len());
                match &item {
                    Item::Ram(RamRecord::Eos) => assert!(dec.is_complete()),
                    Item::Ram(RamRecord::MultifdFlush { .. }) => {}
                    Item::Ram(rec) => {
                        let before = ram.clone();
                        if let Err(e) = ap.apply(&mut ram, at, rec, n, &mut stats) {
                            assert_eq!(e.offset(), at, "refused at its own offset");
                            assert!(ram == before, "a refused record changes nothing");
                        }
                    }
                    other => panic!("a channel yields only ram records: {other:?}"),
                }
                rest = &rest[n..];
            }
            Ok(None) => {
                // Ends here: complete only after EOS with nothing left.
                let fin = dec.finish(rest);
                assert_eq!(fin.is_ok(), dec.is_complete() && rest.is_empty());
                break;
            }
            Err(e) => {
                assert_eq!(e.offset(), at);
                assert!(dec.decode(rest).is_err(), "stays refused");
                break;
            }
        }
    }
});
