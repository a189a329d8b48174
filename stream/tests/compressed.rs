//! Our COMPRESSED `ram` record (flag 0x800): written, read, loaded, and
//! refused with typed errors at the record's offset, page untouched.

use precopy_compress::{Levels, Method, PAGE_SIZE, Page, PageCompressor};
use precopy_stream::{
    Decoder, Encoder, Error, FormatError, Item, Limits, Loader, RamBlockInfo, RamRecord,
    WriteError, load,
};

const BLOCK_LEN: u64 = 4 * PAGE_SIZE as u64;

fn text_page(seed: u8) -> Box<Page> {
    let line = format!("page {seed}: the quick brown fox jumps over the lazy dog\n");
    let v: Vec<u8> = line.bytes().cycle().take(PAGE_SIZE).collect();
    Box::new(v.try_into().unwrap())
}

/// Header, MEM_SIZE, an iteration part; the caller appends records, then `close`.
fn open(enc: &mut Encoder) -> Vec<u8> {
    let mut out = Vec::new();
    enc.file_header(&mut out, "pc-i440fx-7.2").unwrap();
    enc.ram_setup(&mut out, &[RamBlockInfo::new("pc.ram", BLOCK_LEN)])
        .unwrap();
    enc.begin_ram_iteration(&mut out).unwrap();
    out
}

fn close(enc: &mut Encoder, out: &mut Vec<u8>) {
    enc.end_ram_section(out).unwrap();
    enc.begin_ram_complete(out).unwrap();
    enc.end_ram_section(out).unwrap();
    enc.eof(out).unwrap();
}

fn frame(method: Method, page: &Page) -> Vec<u8> {
    let mut c = PageCompressor::new(Levels::default()).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    let n = c.compress(method, page, None, &mut out).unwrap();
    out.truncate(n);
    out
}

#[test]
fn zstd_and_zlib_pages_load_to_the_page() {
    let mut enc = Encoder::new();
    let mut out = open(&mut enc);
    let (a, b) = (text_page(1), text_page(2));
    enc.compressed_page(&mut out, 0, 0, Method::Zstd, &frame(Method::Zstd, &a))
        .unwrap();
    enc.compressed_page(&mut out, 0, 0x3000, Method::Zlib, &frame(Method::Zlib, &b))
        .unwrap();
    close(&mut enc, &mut out);
    let loaded = load(&out[..], Limits::default()).unwrap();
    assert_eq!(loaded.image.page(0, 0).unwrap(), &*a);
    assert_eq!(loaded.image.page(0, 0x3000).unwrap(), &*b);
    assert_eq!(loaded.stats.zstd.count, 1);
    assert_eq!(loaded.stats.zlib.count, 1);
    // The second record had CONTINUE (same block), the first the name.
    assert_eq!(loaded.stats.records_with_continue, 1);
}

#[test]
fn the_record_is_laid_out_as_documented() {
    let mut enc = Encoder::new();
    let mut out = open(&mut enc);
    let start = out.len();
    enc.compressed_page(&mut out, 0, 0x2000, Method::Zlib, &[9, 8, 7])
        .unwrap();
    let mut want = (0x2000u64 | 0x800).to_be_bytes().to_vec();
    want.extend_from_slice(&[6, b'p', b'c', b'.', b'r', b'a', b'm', 0x02, 0, 3, 9, 8, 7]);
    assert_eq!(&out[start..], &want[..]);
}

#[test]
fn the_encoder_refuses_methods_without_a_record_and_bad_lengths() {
    let mut enc = Encoder::new();
    let mut out = open(&mut enc);
    for m in [Method::None, Method::Xbzrle] {
        assert!(matches!(
            enc.compressed_page(&mut out, 0, 0, m, &[1]),
            Err(WriteError::NotACompressedMethod { method }) if method == m
        ));
    }
    for len in [0, PAGE_SIZE + 1] {
        assert!(matches!(
            enc.compressed_page(&mut out, 0, 0, Method::Zstd, &vec![0; len]),
            Err(WriteError::TooLong { .. })
        ));
    }
}

/// A stream whose page 0x1000 is first sent as a PAGE of 0x11, then as the
/// COMPRESSED record `body` (method byte, length, frame) at a known offset.
fn stream_with(body: &[u8]) -> (Vec<u8>, u64) {
    let mut enc = Encoder::new();
    let mut out = open(&mut enc);
    enc.page(&mut out, 0, 0x1000, &[0x11; PAGE_SIZE]).unwrap();
    let at = out.len() as u64;
    out.extend_from_slice(&(0x1000u64 | 0x800 | 0x20).to_be_bytes());
    out.extend_from_slice(body);
    (out, at)
}

/// Loads item by item; returns the error and the page 0x1000 as it was then.
fn load_until_error(stream: &[u8]) -> (Error, Box<Page>) {
    let mut dec = Decoder::new(Limits::default());
    let mut loader = Loader::new(Limits::default());
    let mut input = stream;
    loop {
        let offset = dec.position();
        let r = dec.decode(input).and_then(|o| {
            let (item, n) = o.expect("complete stream");
            loader.apply(offset, &item, n).map(|_| n)
        });
        match r {
            Ok(n) => input = &input[n..],
            Err(e) => {
                let page = Box::new(*loader.image().page(0, 0x1000).unwrap());
                return (e, page);
            }
        }
    }
}

fn body(method_byte: u8, frame: &[u8]) -> Vec<u8> {
    let mut b = vec![method_byte];
    b.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    b.extend_from_slice(frame);
    b
}

#[test]
fn an_unknown_method_is_refused_at_the_record() {
    let (s, at) = stream_with(&body(0x03, &[1, 2, 3]));
    let (e, page) = load_until_error(&s);
    assert_eq!(e.offset(), at);
    assert_eq!(
        e.format_error(),
        Some(&FormatError::UnknownPageCompression { byte: 3 })
    );
    assert!(page.iter().all(|&b| b == 0x11));
}

#[test]
fn a_corrupt_zstd_frame_is_refused_page_untouched() {
    let mut f = frame(Method::Zstd, &text_page(3));
    let last = f.len() - 1;
    f[last] ^= 0x5a;
    f[4] ^= 0xff;
    let (s, at) = stream_with(&body(0x01, &f));
    let (e, page) = load_until_error(&s);
    assert_eq!(e.offset(), at);
    assert!(
        matches!(
            e.format_error(),
            Some(FormatError::PageCompression(
                precopy_compress::DecompressError::Corrupt {
                    method: Method::Zstd,
                    ..
                } | precopy_compress::DecompressError::TooShort {
                    method: Method::Zstd,
                    ..
                }
            ))
        ),
        "{e}"
    );
    assert!(page.iter().all(|&b| b == 0x11));
}

#[test]
fn a_frame_that_inflates_past_a_page_is_refused() {
    // 1 MiB of zeros in 4 KiB-bounded frames: both declare or reach > 4096.
    let big = vec![0u8; 1 << 20];
    let z = zstd::bulk::compress(&big, 1).unwrap();
    assert!(z.len() <= PAGE_SIZE);
    let (s, at) = stream_with(&body(0x01, &z));
    let (e, page) = load_until_error(&s);
    assert_eq!(e.offset(), at);
    assert_eq!(
        e.format_error(),
        Some(&FormatError::PageCompression(
            precopy_compress::DecompressError::TooLarge {
                method: Method::Zstd
            }
        ))
    );
    assert!(page.iter().all(|&b| b == 0x11));
}

#[test]
fn an_oversized_or_empty_frame_length_is_refused_by_the_decoder() {
    let mut b = vec![0x01];
    b.extend_from_slice(&4097u16.to_be_bytes());
    let (s, at) = stream_with(&b);
    let (e, _) = load_until_error(&s);
    assert_eq!(e.offset(), at);
    assert!(matches!(
        e.format_error(),
        Some(FormatError::TooLong {
            len: 4097,
            limit: 4096,
            ..
        })
    ));
    let (s, at) = stream_with(&body(0x02, &[]));
    let (e, _) = load_until_error(&s);
    assert_eq!(e.offset(), at);
    assert!(matches!(
        e.format_error(),
        Some(FormatError::PageCompression(_))
    ));
}

#[test]
fn a_cut_record_is_incomplete_not_an_error() {
    let mut enc = Encoder::new();
    let mut out = open(&mut enc);
    let start = out.len();
    enc.compressed_page(
        &mut out,
        0,
        0,
        Method::Zstd,
        &frame(Method::Zstd, &text_page(4)),
    )
    .unwrap();
    let mut dec = Decoder::new(Limits::default());
    let mut input = &out[..start];
    while let Some((_, n)) = dec.decode(input).unwrap() {
        input = &input[n..];
    }
    for cut in start..out.len() {
        assert_eq!(dec.decode(&out[start..cut]).unwrap(), None, "cut at {cut}");
    }
    let (item, _) = dec.decode(&out[start..]).unwrap().unwrap();
    assert!(matches!(
        item,
        Item::Ram(RamRecord::Compressed {
            method: Method::Zstd,
            offset: 0,
            named: true,
            ..
        })
    ));
}
