//! Our multifd page-channel layout: the encoder's channel records read back through
//! `Decoder::multifd_channel` and `PageApplier`, and what a channel may not carry.

use precopy_stream::multifd::{HELLO_LEN, Hello};
use precopy_stream::{
    Decoder, Encoder, FormatError, Item, Limits, LoadStats, PageApplier, RamBlockInfo, RamImage,
    RamRecord, RamTarget,
};

fn blocks() -> Vec<RamBlockInfo> {
    vec![
        RamBlockInfo::new("pc.ram", 16 * 4096),
        RamBlockInfo::new("vga", 4 * 4096),
    ]
}

/// Decodes a whole channel body, applying its page records onto `image`; returns the
/// sync numbers seen, in order.
fn apply_channel(body: &[u8], image: &mut RamImage, stats: &mut LoadStats) -> Vec<u64> {
    let mut dec = Decoder::multifd_channel(Limits::default(), blocks());
    let mut ap = PageApplier::new();
    let mut rest = body;
    let mut syncs = Vec::new();
    while let Some((item, n)) = dec.decode(rest).unwrap() {
        let off = dec.position() - n as u64;
        match &item {
            Item::Ram(RamRecord::MultifdFlush { seq }) => syncs.push(*seq),
            Item::Ram(RamRecord::Eos) => {}
            Item::Ram(rec) => ap.apply(image, off, rec, n, stats).unwrap(),
            other => panic!("unexpected item on a channel: {other:?}"),
        }
        rest = &rest[n..];
    }
    assert!(dec.is_complete(), "channel ended with EOS");
    dec.finish(rest).unwrap();
    syncs
}

#[test]
fn channel_records_round_trip_onto_the_ram() {
    let mut enc = Encoder::page_records_only(&blocks());
    let mut out = Vec::new();
    let page = [0x5au8; 4096];
    enc.page(&mut out, 0, 0x3000, &page).unwrap();
    enc.zero_page(&mut out, 0, 0x4000).unwrap();
    enc.multifd_flush(&mut out, 1).unwrap();
    // One changed byte at 100 against the page sent above: XBZRLE onto it.
    enc.xbzrle_page(&mut out, 0, 0x3000, &[100, 1, 0x77])
        .unwrap();
    enc.page(&mut out, 1, 0x1000, &page).unwrap();
    enc.multifd_flush(&mut out, 2).unwrap();
    enc.multifd_channel_end(&mut out).unwrap();
    assert!(
        enc.multifd_flush(&mut out, 3).is_err(),
        "nothing after the end"
    );

    let mut image = RamImage::default();
    image.set_blocks(&blocks(), 1 << 30).unwrap();
    let mut stats = LoadStats::default();
    let syncs = apply_channel(&out, &mut image, &mut stats);
    assert_eq!(syncs, [1, 2]);
    let mut want = page;
    want[100] = 0x77;
    assert_eq!(image.page_mut(0, 0x3000).unwrap(), &want);
    assert_eq!(image.page_mut(1, 0x1000).unwrap(), &page);
    assert_eq!(stats.page.count, 2);
    assert_eq!(stats.zero.count, 1);
    assert_eq!(stats.xbzrle.count, 1);
    assert_eq!(stats.records_with_block_name, 2, "pc.ram, then vga");
    assert_eq!(stats.records_with_continue, 2);
}

#[test]
fn a_channel_refuses_mem_size_trailing_bytes_and_is_truncated_without_eos() {
    // MEM_SIZE on a channel.
    let mut full = Encoder::new();
    let mut s = Vec::new();
    full.file_header(&mut s, "m").unwrap();
    let start = s.len();
    full.ram_setup(&mut s, &blocks()).unwrap();
    // The MEM_SIZE record starts after the START section header (1 + 4 + 1 + 3 + 4 + 4).
    let mem_size = &s[start + 17..];
    let mut dec = Decoder::multifd_channel(Limits::default(), blocks());
    let e = dec.decode(mem_size).unwrap_err();
    assert!(
        matches!(
            e,
            precopy_stream::Error::Format {
                kind: FormatError::Multifd { .. },
                offset: 0
            }
        ),
        "{e:?}"
    );

    // Bytes after the closing EOS.
    let mut enc = Encoder::page_records_only(&blocks());
    let mut out = Vec::new();
    enc.zero_page(&mut out, 0, 0).unwrap();
    enc.multifd_channel_end(&mut out).unwrap();
    let end = out.len() as u64;
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x10]);
    let mut dec = Decoder::multifd_channel(Limits::default(), blocks());
    let mut rest = &out[..];
    let err = loop {
        match dec.decode(rest) {
            Ok(Some((_, n))) => rest = &rest[n..],
            Ok(None) => panic!("trailing bytes must be refused"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.offset(), end);
    assert!(matches!(
        err,
        precopy_stream::Error::Format {
            kind: FormatError::TrailingData,
            ..
        }
    ));

    // A channel cut before its EOS is truncated.
    let mut dec = Decoder::multifd_channel(Limits::default(), blocks());
    let cut = &out[..out.len() - 16];
    let (_, n) = dec.decode(cut).unwrap().unwrap();
    assert!(!dec.is_complete());
    assert!(dec.finish(&cut[n..]).is_err());
}

#[test]
fn a_single_stream_reader_refuses_a_multifd_sync_point() {
    let mut enc = Encoder::new();
    let mut s = Vec::new();
    enc.file_header(&mut s, "m").unwrap();
    enc.ram_setup(&mut s, &blocks()).unwrap();
    enc.begin_ram_iteration(&mut s).unwrap();
    let at = s.len() as u64;
    enc.multifd_flush(&mut s, 1).unwrap();
    enc.end_ram_section(&mut s).unwrap();
    let e = precopy_stream::load(&s[..], Limits::default()).unwrap_err();
    assert_eq!(e.offset(), at);
    assert!(e.to_string().contains("multifd"), "{e}");
}

#[test]
fn hello_is_28_bytes_and_starts_with_pcmf() {
    let h = Hello {
        migration_id: [1; 16],
        index: 0,
        channels: 2,
    };
    assert_eq!(h.to_bytes().len(), HELLO_LEN);
    assert_eq!(Hello::parse(&h.to_bytes()).unwrap(), h);
}
