//! Our COMPRESSED `ram` record (flag 0x800) with an arbitrary body, loaded
//! onto a page that holds known bytes: no panic, no allocation beyond the
//! fuzz limits; a refused record is refused at its own offset and leaves
//! the page untouched; an applied one leaves exactly what
//! `PageDecompressor::decompress` makes of the frame. Also the decompressor
//! alone: a frame that decodes, re-compressed with the same method, decodes
//! to the same page.
//!
//! Input: `[method u8] [level u8] frame...`; the record body on the wire is
//! `method, be16 len(frame) (clamped to 0xffff), frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_compress::{Levels, Method, PAGE_SIZE, Page, PageCompressor, PageDecompressor};
use precopy_stream::{Decoder, Encoder, Limits, Loader, RamBlockInfo};

const FILL: u8 = 0x3c;

fuzz_target!(|data: &[u8]| {
    let Some((&[method, level], frame)) = data.split_first_chunk::<2>() else {
        return;
    };
    let frame = &frame[..frame.len().min(0xffff)];

    // The decompressor alone.
    let mut d = PageDecompressor::new();
    if let Ok(m) = Method::from_wire_id(method) {
        let mut page: Box<Page> = Box::new([FILL; PAGE_SIZE]);
        match d.decompress(m, frame, &mut page) {
            Err(_) => assert!(page.iter().all(|&b| b == FILL), "page touched on error"),
            Ok(()) => {
                let levels = Levels {
                    zstd: i32::from(level % 4),
                    zlib: u32::from(level % 10),
                };
                let mut c = PageCompressor::new(levels).unwrap();
                let mut out = vec![0u8; 2 * PAGE_SIZE];
                let n = c.compress(m, &page, None, &mut out).unwrap();
                let mut again: Box<Page> = Box::new([0; PAGE_SIZE]);
                d.decompress(m, &out[..n], &mut again).unwrap();
                assert!(again[..] == page[..], "{m} round trip differs");
            }
        }
    }

    // The record in a stream, after a PAGE of FILL at the same address.
    let mut enc = Encoder::new();
    let mut s = Vec::new();
    enc.file_header(&mut s, "pc-i440fx-7.2").unwrap();
    enc.ram_setup(&mut s, &[RamBlockInfo::new("pc.ram", 2 * PAGE_SIZE as u64)])
        .unwrap();
    enc.begin_ram_iteration(&mut s).unwrap();
    enc.page(&mut s, 0, 0x1000, &[FILL; PAGE_SIZE]).unwrap();
    let at = s.len();
    s.extend_from_slice(&(0x1000u64 | 0x800 | 0x20).to_be_bytes());
    s.push(method);
    s.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    s.extend_from_slice(frame);

    let mut dec = Decoder::new(Limits {
        max_ram_bytes: 1 << 20,
        ..Limits::default()
    });
    let mut loader = Loader::new(*dec.limits());
    let mut input = &s[..];
    loop {
        let pos = dec.position();
        let item = match dec.decode(input) {
            Ok(Some(x)) => x,
            Ok(None) => {
                panic!("complete input reported incomplete at {pos}");
            }
            Err(e) => {
                assert_eq!(e.offset() as usize, at, "decoder error not at the record");
                break;
            }
        };
        let (item, n) = item;
        match loader.apply(pos, &item, n) {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.offset() as usize, at, "loader error not at the record");
                break;
            }
        }
        input = &input[n..];
        if pos as usize == at {
            // Applied: the page is what the decompressor makes of the frame.
            let m = Method::from_wire_id(method).expect("unknown method applied");
            let mut want: Box<Page> = Box::new([FILL; PAGE_SIZE]);
            d.decompress(m, frame, &mut want)
                .expect("loader accepted a bad frame");
            assert!(loader.image().page(0, 0x1000).unwrap()[..] == want[..]);
            return;
        }
    }
    let page = loader.image().page(0, 0x1000).unwrap();
    assert!(
        page.iter().all(|&b| b == FILL),
        "refused record touched the page"
    );
});
