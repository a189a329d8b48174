//! Arbitrary bytes into the loader, with a 2 MiB RAM limit: no panic, no
//! allocation beyond the limit, errors carry an offset inside the input.
//! Checked record by record (Decoder + Loader::apply): a refused record
//! leaves its page untouched; an applied ZERO/PAGE/XBZRLE record leaves
//! exactly the zero page, the raw page, or `xbzrle::decode` of the previous
//! content. And `precopy_stream::load` over a reader that returns small
//! chunks reaches the same outcome and the same RAM.
//!
//! Input: `[chunk u8] stream...`; reads return at most `chunk * 61 + 1` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::{ChunkedReader, stream_limits};
use precopy_stream::{Control, Decoder, Item, Loader, RamImage, RamRecord};
use xbzrle::Page;

fn page_of(rec: &RamRecord<'_>) -> Option<(usize, u64)> {
    match *rec {
        RamRecord::Zero { block, offset, .. }
        | RamRecord::Page { block, offset, .. }
        | RamRecord::Xbzrle { block, offset, .. } => Some((block, offset)),
        _ => None,
    }
}

fn same_ram(a: &RamImage, b: &RamImage) -> bool {
    a.blocks().len() == b.blocks().len()
        && a.blocks()
            .iter()
            .zip(b.blocks())
            .all(|(x, y)| x.name() == y.name() && x.data() == y.data())
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let limits = stream_limits();

    // Record by record.
    let mut dec = Decoder::new(limits);
    let mut loader = Loader::new(limits);
    let mut pos = 0usize;
    let by_hand: Result<(), u64> = loop {
        let off = dec.position();
        match dec.decode(&input[pos..]) {
            Err(e) => break Err(e.offset()),
            Ok(None) => match dec.finish(&input[pos..]) {
                Err(e) => break Err(e.offset()),
                Ok(()) => break Ok(()),
            },
            Ok(Some((item, n))) => {
                let target = match &item {
                    Item::Ram(rec) => page_of(rec),
                    _ => None,
                };
                let before: Option<Box<Page>> =
                    target.and_then(|(b, o)| loader.image().page(b, o).map(|p| Box::new(*p)));
                let r = loader.apply(off, &item, n);
                assert!(
                    loader.image().total_bytes() <= limits.max_ram_bytes,
                    "RAM image over the limit"
                );
                let after = target.and_then(|(b, o)| loader.image().page(b, o));
                match r {
                    Err(e) => {
                        assert_eq!(e.offset(), off, "apply error offset is not the item's");
                        if let (Some(b), Some(a)) = (&before, after) {
                            assert!(b[..] == a[..], "refused record changed its page: {e}");
                        }
                        break Err(e.offset());
                    }
                    Ok(ctl) => {
                        if let Item::Ram(rec) = &item {
                            let a = after.map(|p| &p[..]);
                            match rec {
                                RamRecord::Zero { fill, .. } => {
                                    assert!(
                                        a.is_some_and(|p| p.iter().all(|x| x == fill)),
                                        "ZERO not applied"
                                    )
                                }
                                RamRecord::Page { data, .. } => {
                                    assert!(a == Some(&data[..]), "PAGE not applied")
                                }
                                RamRecord::Xbzrle { delta, .. } => {
                                    let mut want = before.expect("applied XBZRLE had a page");
                                    xbzrle::decode(delta, &mut want)
                                        .expect("loader accepted a delta decode refuses");
                                    assert!(
                                        a == Some(&want[..]),
                                        "XBZRLE applied differently from xbzrle::decode"
                                    );
                                }
                                _ => {}
                            }
                        }
                        pos += n;
                        if ctl == Control::Stop {
                            break Ok(());
                        }
                    }
                }
            }
        }
    };
    let by_hand = by_hand.and_then(|()| loader.finish().map_err(|e| e.offset()));
    if let Err(off) = &by_hand {
        assert!(
            *off <= input.len() as u64,
            "error offset {off} past the input ({} bytes)",
            input.len()
        );
    }

    // Through the io::Read front door, in small reads.
    let reader = ChunkedReader {
        rest: input,
        chunk: usize::from(chunk) * 61 + 1,
    };
    let loaded = precopy_stream::load(reader, limits);
    match (&by_hand, &loaded) {
        (Ok(l), Ok(m)) => {
            assert!(
                same_ram(&l.image, &m.image),
                "load() RAM differs from Decoder+Loader"
            );
            assert_eq!(l.stats, m.stats);
            assert_eq!(l.stop, m.stop);
            assert_eq!(l.vm_description, m.vm_description);
        }
        (Err(a), Err(e)) => assert_eq!(*a, e.offset(), "error offsets differ: load() says {e}"),
        (a, b) => panic!(
            "load() and Decoder+Loader disagree: {:?} vs {:?}",
            a.as_ref().map(|_| ()),
            b.as_ref().map(|_| ()).map_err(|e| e.to_string())
        ),
    }
});
