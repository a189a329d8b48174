//! Hostile and broken streams: every refusal is a typed error at the right
//! offset, and the page concerned is untouched.

use precopy_stream::format::*;
use precopy_stream::{
    Control, Decoder, Encoder, Error, FormatError, Item, Limits, Loader, RamBlockInfo, RamRecord,
    StopReason, WriteError, load,
};

const RAM_PAGES: u64 = 16;

fn blocks() -> Vec<RamBlockInfo> {
    vec![
        RamBlockInfo::new("pc.ram", RAM_PAGES * 4096),
        RamBlockInfo::new("pc.bios", 2 * 4096),
    ]
}

/// Header, configuration, ram START, a PART header, and one PAGE record
/// (pc.ram @ 0x1000, all 0xab) so CONTINUE refers to pc.ram.
fn prefix() -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = Encoder::new();
    e.file_header(&mut out, "pc-i440fx-7.2").unwrap();
    e.ram_setup(&mut out, &blocks()).unwrap();
    e.begin_ram_iteration(&mut out).unwrap();
    e.page(&mut out, 0, 0x1000, &[0xab; 4096]).unwrap();
    out
}

fn hdr(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// Decodes and applies `bytes` item by item. Returns the loader and the
/// first error (or the end-of-input verdict).
fn run(bytes: &[u8], limits: Limits) -> (Loader, Result<(), Error>) {
    let mut dec = Decoder::new(limits);
    let mut loader = Loader::new(limits);
    let mut input = bytes;
    loop {
        let off = dec.position();
        match dec.decode(input) {
            Ok(Some((item, n))) => {
                input = &input[n..];
                match loader.apply(off, &item, n) {
                    Ok(Control::Continue) => {}
                    Ok(Control::Stop) => return (loader, Ok(())),
                    Err(e) => return (loader, Err(e)),
                }
            }
            Ok(None) => {
                let r = dec.finish(input);
                return (loader, r);
            }
            Err(e) => return (loader, Err(e)),
        }
    }
}

fn err_of(bytes: &[u8]) -> (u64, FormatError) {
    match run(bytes, Limits::default()).1 {
        Err(Error::Format { offset, kind }) => (offset, kind),
        other => panic!("expected a format error, got {other:?}"),
    }
}

/// Appends `record` to the prefix; asserts the error is `want` at the
/// record's offset and that page pc.ram@0x1000 still holds 0xab.
fn refused(record: &[u8], want: FormatError) {
    let mut s = prefix();
    let at = s.len() as u64;
    s.extend_from_slice(record);
    let (loader, r) = run(&s, Limits::default());
    match r {
        Err(Error::Format { offset, kind }) => {
            assert_eq!(kind, want);
            assert_eq!(offset, at);
        }
        other => panic!("expected {want:?}, got {other:?}"),
    }
    assert_eq!(
        loader.image().page(0, 0x1000),
        Some(&[0xab; 4096]),
        "page touched"
    );
}

fn named(flags_offset: u64, name: &str) -> Vec<u8> {
    let mut r = hdr(flags_offset).to_vec();
    r.push(name.len() as u8);
    r.extend_from_slice(name.as_bytes());
    r
}

#[test]
fn wire_layout_examples_from_the_issue() {
    let blocks = [RamBlockInfo::new("pc.ram", 0x10000)];
    let mut e = Encoder::new();
    let mut out = Vec::new();
    e.file_header(&mut out, "pc-i440fx-7.2").unwrap();
    e.ram_setup(&mut out, &blocks).unwrap();
    e.begin_ram_iteration(&mut out).unwrap();
    let start = out.len();
    e.xbzrle_page(&mut out, 0, 0x2000, &[0xff, 0x1f, 0x01, 0x5a])
        .unwrap();
    let first: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x40, 0x06, 0x70, 0x63, 0x2e, 0x72, 0x61, 0x6d,
        0x01, 0x00, 0x04, 0xff, 0x1f, 0x01, 0x5a,
    ];
    assert_eq!(&out[start..], first);
    let mid = out.len();
    e.xbzrle_page(&mut out, 0, 0x3000, &[0xff, 0x1f, 0x01, 0x5a])
        .unwrap();
    let second: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x60, 0x01, 0x00, 0x04, 0xff, 0x1f, 0x01, 0x5a,
    ];
    assert_eq!(&out[mid..], second);
    e.end_ram_section(&mut out).unwrap();
    e.begin_ram_complete(&mut out).unwrap();
    e.end_ram_section(&mut out).unwrap();
    e.eof(&mut out).unwrap();

    // Read back: both records decode to the page with byte 4095 = 0x5a.
    let l = load(&out[..], Limits::default()).unwrap();
    let ram = l.image.block("pc.ram").unwrap().data();
    for base in [0x2000usize, 0x3000] {
        assert_eq!(ram[base + 4095], 0x5a);
        assert!(ram[base..base + 4095].iter().all(|&b| b == 0));
    }
    assert_eq!(l.stats.xbzrle.count, 2);
    assert_eq!(l.stats.xbzrle.bytes, (first.len() + second.len()) as u64);
    assert_eq!(l.stats.records_with_block_name, 1);
    assert_eq!(l.stats.records_with_continue, 1);
}

#[test]
fn truncated_records_are_truncation_errors_at_their_offset() {
    let mut s = prefix();
    let p = s.len();
    let mut e = Encoder::new();
    let mut tmp = Vec::new();
    e.file_header(&mut tmp, "pc-i440fx-7.2").unwrap();
    e.ram_setup(&mut tmp, &blocks()).unwrap();
    e.begin_ram_iteration(&mut tmp).unwrap();
    e.page(&mut tmp, 0, 0x1000, &[0xab; 4096]).unwrap();
    assert_eq!(tmp, s);
    e.xbzrle_page(&mut s, 0, 0x2000, &[0x10, 0x02, 0xaa, 0xbb])
        .unwrap();
    e.zero_page(&mut s, 1, 0x1000).unwrap();
    e.page(&mut s, 0, 0x3000, &[1; 4096]).unwrap();
    e.end_ram_section(&mut s).unwrap();
    e.begin_ram_complete(&mut s).unwrap();
    e.end_ram_section(&mut s).unwrap();
    e.device_state(&mut s, "precopy/x", 0, 0, &[5; 40]).unwrap();
    e.eof(&mut s).unwrap();
    e.vm_description(&mut s, b"{}").unwrap();
    // Where each item starts, from a full decode.
    let mut starts = vec![];
    let mut dec = Decoder::default();
    let mut input = &s[..];
    while let Some((_, n)) = dec.decode(input).unwrap() {
        starts.push(dec.position() - n as u64);
        input = &input[n..];
    }
    assert!(input.is_empty() && dec.is_complete());
    let eof_at = s.len() - 1 - 5 - 2;
    for cut in 0..s.len() {
        if cut == eof_at + 1 {
            continue; // EOF read, VM description absent: a complete stream
        }
        let (off, kind) = err_of(&s[..cut]);
        let mut expect_at = *starts.iter().filter(|&&r| r <= cut as u64).max().unwrap();
        if cut as u64 == starts[2] {
            // The configuration section is complete only once the next byte
            // shows it is not a subsection.
            expect_at = starts[1];
        }
        assert!(
            matches!(kind, FormatError::Truncated { .. }),
            "cut {cut}: {kind:?}"
        );
        assert_eq!(off, expect_at, "cut {cut}");
    }
    // A record cut inside its header names the record, not flags 0.
    let (_, kind) = err_of(&s[..p + 3]);
    assert_eq!(kind, FormatError::Truncated { what: "ram record" });
    let (_, kind) = err_of(&s[..p + 12]);
    assert_eq!(
        kind,
        FormatError::Truncated {
            what: "XBZRLE record"
        }
    );
    run(&s[..eof_at + 1], Limits::default()).1.unwrap();
}

#[test]
fn page_offset_outside_its_block() {
    let past = RAM_PAGES * 4096;
    refused(
        &named(past | FLAG_PAGE, "pc.ram"),
        FormatError::PageOutsideBlock {
            block: "pc.ram".into(),
            offset: past,
            length: past,
        },
    );
    let huge = 0xffff_ffff_ffff_f000;
    refused(
        &hdr(huge | FLAG_ZERO | FLAG_CONTINUE),
        FormatError::PageOutsideBlock {
            block: "pc.ram".into(),
            offset: huge,
            length: past,
        },
    );
    refused(
        &named(0x2000 | FLAG_XBZRLE, "pc.bios"),
        FormatError::PageOutsideBlock {
            block: "pc.bios".into(),
            offset: 0x2000,
            length: 0x2000,
        },
    );
}

#[test]
fn unknown_block_name() {
    refused(
        &named(FLAG_PAGE, "pc.rom"),
        FormatError::UnknownBlock {
            name: "pc.rom".into(),
        },
    );
    refused(
        &named(FLAG_ZERO, ""),
        FormatError::UnknownBlock {
            name: String::new(),
        },
    );
}

#[test]
fn block_names_longer_than_the_format_allows_are_refused_by_the_writer() {
    let long = "x".repeat(256);
    let mut e = Encoder::new();
    let mut out = Vec::new();
    e.file_header(&mut out, "m").unwrap();
    let before = out.len();
    let r = e.ram_setup(&mut out, &[RamBlockInfo::new(long, 4096)]);
    assert!(matches!(r, Err(WriteError::BadName { .. })), "{r:?}");
    assert_eq!(out.len(), before, "nothing written on error");
    assert!(matches!(
        e.ram_setup(&mut out, &[RamBlockInfo::new("", 4096)]),
        Err(WriteError::BadName { .. })
    ));
    // 255 bytes is the longest name; it round-trips.
    let max = "y".repeat(255);
    e.ram_setup(&mut out, &[RamBlockInfo::new(max.clone(), 4096)])
        .unwrap();
    e.begin_ram_iteration(&mut out).unwrap();
    e.page(&mut out, 0, 0, &[3; 4096]).unwrap();
    e.end_ram_section(&mut out).unwrap();
    e.begin_ram_complete(&mut out).unwrap();
    e.end_ram_section(&mut out).unwrap();
    e.eof(&mut out).unwrap();
    let l = load(&out[..], Limits::default()).unwrap();
    assert_eq!(l.image.block(&max).unwrap().data(), &[3; 4096]);
}

#[test]
fn empty_block_name_in_mem_size() {
    let mut s = Vec::new();
    let mut e = Encoder::new();
    e.file_header(&mut s, "m").unwrap();
    s.extend_from_slice(&[
        SECTION_START,
        0,
        0,
        0,
        0,
        3,
        b'r',
        b'a',
        b'm',
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        4,
    ]);
    let at = s.len() as u64;
    s.extend_from_slice(&hdr(4096 | FLAG_MEM_SIZE));
    s.push(0);
    s.extend_from_slice(&4096u64.to_be_bytes());
    assert_eq!(err_of(&s), (at, FormatError::BadName { what: "RAM block" }));
}

#[test]
fn xbzrle_length_over_page_size() {
    for len in [4097u16, 0xffff] {
        let mut r = hdr(0x2000 | FLAG_XBZRLE | FLAG_CONTINUE).to_vec();
        r.push(ENCODING_XBZRLE);
        r.extend_from_slice(&len.to_be_bytes());
        refused(
            &r,
            FormatError::TooLong {
                what: "XBZRLE delta",
                len: len.into(),
                limit: 4096,
            },
        );
    }
}

#[test]
fn xbzrle_encoding_byte_must_be_1() {
    for byte in [0x00, 0x02, 0xff] {
        let mut r = hdr(0x1000 | FLAG_XBZRLE | FLAG_CONTINUE).to_vec();
        r.extend_from_slice(&[byte, 0, 4, 0xff, 0x1f, 0x01, 0x5a]);
        refused(&r, FormatError::BadXbzrleEncoding { byte });
    }
}

#[test]
fn zero_record_with_nonzero_fill() {
    let mut r = hdr(0x1000 | FLAG_ZERO | FLAG_CONTINUE).to_vec();
    r.push(0x41);
    refused(&r, FormatError::NonZeroFill { fill: 0x41 });
}

#[test]
fn xbzrle_delta_that_does_not_apply_leaves_the_page() {
    // zrun 0 then nzrun 0: an empty literal run.
    let mut r = hdr(0x1000 | FLAG_XBZRLE | FLAG_CONTINUE).to_vec();
    r.extend_from_slice(&[1, 0, 3, 0, 0, 0]);
    let mut s = prefix();
    s.extend_from_slice(&r);
    let (loader, res) = run(&s, Limits::default());
    match res {
        Err(Error::Format {
            kind: FormatError::Xbzrle(e),
            ..
        }) => assert_eq!(e.kind(), xbzrle::DecodeErrorKind::EmptyLiteralRun),
        other => panic!("{other:?}"),
    }
    assert_eq!(loader.image().page(0, 0x1000), Some(&[0xab; 4096]));
    // A run past the end of the page: 4095 unchanged then 2 literals.
    let mut r = hdr(0x1000 | FLAG_XBZRLE | FLAG_CONTINUE).to_vec();
    r.extend_from_slice(&[1, 0, 5, 0xff, 0x1f, 0x02, 0x11, 0x22]);
    let mut s = prefix();
    s.extend_from_slice(&r);
    let (loader, res) = run(&s, Limits::default());
    assert!(matches!(
        res,
        Err(Error::Format {
            kind: FormatError::Xbzrle(_),
            ..
        })
    ));
    assert_eq!(loader.image().page(0, 0x1000), Some(&[0xab; 4096]));
}

fn start_ram(s: &mut Vec<u8>) -> u64 {
    let mut e = Encoder::new();
    e.file_header(s, "m").unwrap();
    s.extend_from_slice(&[
        SECTION_START,
        0,
        0,
        0,
        0,
        3,
        b'r',
        b'a',
        b'm',
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        4,
    ]);
    s.len() as u64
}

fn mem_size(total: u64, list: &[(&str, u64)]) -> Vec<u8> {
    let mut r = hdr(total | FLAG_MEM_SIZE).to_vec();
    for (n, l) in list {
        r.push(n.len() as u8);
        r.extend_from_slice(n.as_bytes());
        r.extend_from_slice(&l.to_be_bytes());
    }
    r
}

#[test]
fn mem_size_is_bounded_before_allocation() {
    let limits = Limits {
        max_ram_bytes: 1 << 20,
        ..Limits::default()
    };
    for total in [(1u64 << 20) + 4096, 1 << 40, 0xffff_ffff_ffff_f000] {
        let mut s = Vec::new();
        let at = start_ram(&mut s);
        s.extend_from_slice(&mem_size(total, &[]));
        match run(&s, limits).1 {
            Err(Error::Format { offset, kind }) => {
                assert_eq!(offset, at);
                assert_eq!(
                    kind,
                    FormatError::RamTooLarge {
                        total,
                        limit: 1 << 20
                    }
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // Exactly at the limit is fine.
    let mut s = Vec::new();
    start_ram(&mut s);
    s.extend_from_slice(&mem_size(1 << 20, &[("pc.ram", 1 << 20)]));
    s.extend_from_slice(&hdr(FLAG_EOS));
    s.push(SECTION_EOF);
    let (loader, r) = run(&s, limits);
    r.unwrap();
    assert_eq!(loader.image().total_bytes(), 1 << 20);
}

#[test]
fn mem_size_block_list_is_checked() {
    type Case<'a> = (u64, &'a [(&'a str, u64)], &'a str);
    let cases: &[Case] = &[
        (8192, &[("a", 4096), ("a", 4096)], "duplicate block name"),
        (8192, &[("a", 12288)], "block lengths exceed the total"),
        (
            8192,
            &[("a", 100)],
            "block length zero or not a multiple of the page size",
        ),
        (
            8192,
            &[("a", 0)],
            "block length zero or not a multiple of the page size",
        ),
    ];
    for (total, list, why) in cases {
        let mut s = Vec::new();
        let at = start_ram(&mut s);
        s.extend_from_slice(&mem_size(*total, list));
        assert_eq!(err_of(&s), (at, FormatError::BadMemSize { why }));
    }
    let limits = Limits {
        max_blocks: 2,
        ..Limits::default()
    };
    let mut s = Vec::new();
    let at = start_ram(&mut s);
    s.extend_from_slice(&mem_size(
        3 * 4096,
        &[("a", 4096), ("b", 4096), ("c", 4096)],
    ));
    match run(&s, limits).1 {
        Err(Error::Format {
            offset,
            kind: FormatError::TooLong { what, .. },
        }) => {
            assert_eq!((offset, what), (at, "MEM_SIZE block count"))
        }
        other => panic!("{other:?}"),
    }
    // A second MEM_SIZE.
    refused(
        &mem_size(4096, &[("z", 4096)]),
        FormatError::DuplicateMemSize,
    );
}

#[test]
fn every_flag_combination_is_understood_or_refused_by_name() {
    let valid = [
        FLAG_ZERO,
        FLAG_PAGE,
        FLAG_XBZRLE,
        FLAG_COMPRESS_PAGE,
        FLAG_ZERO | FLAG_CONTINUE,
        FLAG_PAGE | FLAG_CONTINUE,
        FLAG_XBZRLE | FLAG_CONTINUE,
        FLAG_COMPRESS_PAGE | FLAG_CONTINUE,
        // Ours (issue 11): the COMPRESSED record.
        FLAG_COMPRESSED,
        FLAG_COMPRESSED | FLAG_CONTINUE,
        FLAG_EOS,
        FLAG_HOOK,
        FLAG_MEM_SIZE,
        // QEMU >= 8 with multifd, and our multifd sync points (issue 10).
        FLAG_MULTIFD_FLUSH,
    ];
    let p = prefix();
    for flags in 0..0x1000u64 {
        let mut s = p.clone();
        s.extend_from_slice(&hdr(0x2000 | flags));
        // Enough well-formed-looking bytes for any valid record: an XBZRLE
        // encoding byte, a short length, then zeros.
        s.extend_from_slice(&[1, 0, 0]);
        s.extend_from_slice(&[0; 8192]);
        let mut dec = Decoder::default();
        let mut input = &s[..];
        while dec.position() < p.len() as u64 {
            let (_, n) = dec.decode(input).unwrap().unwrap();
            input = &input[n..];
        }
        let result = match dec.decode(input) {
            Ok(Some(_)) => Some(Ok(())),
            Ok(None) => panic!("flags {flags:#x}: need more"),
            Err(e) => Some(Err(e)),
        };
        let bad_flags = matches!(
            result,
            Some(Err(Error::Format { kind: FormatError::BadFlags { flags: f }, .. })) if f == flags
        );
        assert_eq!(
            bad_flags,
            !valid.contains(&flags),
            "flags {flags:#x}: {result:?}"
        );
    }
}

#[test]
fn continue_without_block_and_records_before_mem_size() {
    let mut s = Vec::new();
    start_ram(&mut s);
    s.extend_from_slice(&mem_size(4096, &[("a", 4096)]));
    let at = s.len() as u64;
    s.extend_from_slice(&hdr(FLAG_ZERO | FLAG_CONTINUE));
    s.push(0);
    assert_eq!(err_of(&s), (at, FormatError::ContinueWithoutBlock));

    let mut s = Vec::new();
    let at = start_ram(&mut s);
    s.extend_from_slice(&named(FLAG_ZERO, "a"));
    s.push(0);
    assert_eq!(err_of(&s), (at, FormatError::RecordBeforeMemSize));
}

/// A complete small stream from our writer, and the offsets of its parts.
fn complete() -> Vec<u8> {
    let mut e = Encoder::new();
    let mut out = Vec::new();
    e.file_header(&mut out, "pc-q35-7.2").unwrap();
    e.ram_setup(&mut out, &blocks()).unwrap();
    e.begin_ram_iteration(&mut out).unwrap();
    e.page(&mut out, 0, 0, &[9; 4096]).unwrap();
    e.zero_page(&mut out, 1, 4096).unwrap();
    e.end_ram_section(&mut out).unwrap();
    e.begin_ram_complete(&mut out).unwrap();
    e.xbzrle_page(&mut out, 0, 0, &[0, 1, 7]).unwrap();
    e.end_ram_section(&mut out).unwrap();
    e.device_state(&mut out, "precopy/vcpu", 0, 1, b"state")
        .unwrap();
    e.eof(&mut out).unwrap();
    e.vm_description(&mut out, b"{\"page_size\": 4096}")
        .unwrap();
    out
}

#[test]
fn container_errors() {
    let ok = complete();
    let l = load(&ok[..], Limits::default()).unwrap();
    assert_eq!(l.image.block("pc.ram").unwrap().data()[0], 7);
    assert_eq!(l.image.block("pc.ram").unwrap().data()[1], 9);
    assert_eq!(l.device_states.len(), 1);
    assert_eq!(l.device_states[0].name, "precopy/vcpu");
    assert_eq!(l.device_states[0].payload, b"state");
    assert_eq!(
        l.vm_description.as_deref(),
        Some(&b"{\"page_size\": 4096}"[..])
    );
    assert!(matches!(
        l.stop,
        StopReason::EndOfStream {
            vm_description: true,
            ..
        }
    ));
    assert_eq!(l.stats.bytes, ok.len() as u64);
    assert_eq!(l.machine_type.as_deref(), Some("pc-q35-7.2"));

    let mut bad = ok.clone();
    bad[0] = b'X';
    assert_eq!(
        err_of(&bad),
        (0, FormatError::BadMagic { found: 0x5845564d })
    );
    let mut bad = ok.clone();
    bad[7] = 2;
    assert_eq!(
        err_of(&bad),
        (0, FormatError::UnsupportedFileVersion { found: 2 })
    );

    // Data after the VM description.
    let mut bad = ok.clone();
    bad.push(0);
    assert_eq!(err_of(&bad).1, FormatError::TrailingData);
    // Unknown section type, VM description before EOF, stray footer.
    let cfg_end = 8 + 1 + 4 + "pc-q35-7.2".len();
    for (byte, kind) in [
        (0x09u8, FormatError::UnknownSectionType { byte: 0x09 }),
        (
            VM_DESCRIPTION,
            FormatError::Unexpected {
                what: "VM description before EOF",
            },
        ),
        (
            SUBSECTION + 0x10,
            FormatError::UnknownSectionType { byte: 0x15 },
        ),
    ] {
        let mut bad = ok[..cfg_end].to_vec();
        bad.extend_from_slice(&[byte, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(err_of(&bad), (cfg_end as u64, kind));
    }
    let mut bad = ok[..cfg_end].to_vec();
    bad.extend_from_slice(&[SECTION_FOOTER, 0, 0, 0, 0]);
    assert_eq!(
        err_of(&bad),
        (
            cfg_end as u64,
            FormatError::Unexpected {
                what: "section footer"
            }
        )
    );
    // PART of an unknown section id; a footer naming the wrong section.
    let mut bad = prefix();
    let end = bad.len();
    bad.extend_from_slice(&hdr(FLAG_EOS));
    bad.extend_from_slice(&[SECTION_FOOTER, 0, 0, 0, 9]);
    assert_eq!(
        err_of(&bad),
        (
            end as u64 + 8,
            FormatError::FooterMismatch {
                expected: 0,
                found: 9
            }
        )
    );
    let mut bad = prefix();
    bad.extend_from_slice(&hdr(FLAG_EOS));
    let at = bad.len() as u64;
    bad.extend_from_slice(&[SECTION_PART, 0, 0, 0, 5]);
    assert_eq!(err_of(&bad), (at, FormatError::UnknownSectionId { id: 5 }));
    // A second ram START, and a ram section of another version.
    let mut bad = prefix();
    bad.extend_from_slice(&hdr(FLAG_EOS));
    let at = bad.len() as u64;
    bad.extend_from_slice(&[
        SECTION_START,
        0,
        0,
        0,
        7,
        3,
        b'r',
        b'a',
        b'm',
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        4,
    ]);
    assert_eq!(err_of(&bad), (at, FormatError::DuplicateRamSection));
    let mut bad = Vec::new();
    let at = start_ram(&mut bad) - 17;
    let n = bad.len();
    bad[n - 1] = 3;
    assert_eq!(
        err_of(&bad),
        (
            at,
            FormatError::UnsupportedRamSection {
                instance: 0,
                version: 3
            }
        )
    );
}

#[test]
fn size_limits_on_device_state_and_vm_description() {
    let ok = complete();
    let limits = Limits {
        max_device_state_bytes: 4,
        ..Limits::default()
    };
    match run(&ok, limits).1 {
        Err(Error::Format {
            kind: FormatError::TooLong { what, len, limit },
            ..
        }) => {
            assert_eq!((what, len, limit), ("device state", 5, 4))
        }
        other => panic!("{other:?}"),
    }
    let limits = Limits {
        max_vm_description_bytes: 8,
        ..Limits::default()
    };
    match run(&ok, limits).1 {
        Err(Error::Format {
            kind: FormatError::TooLong { what, .. },
            ..
        }) => {
            assert_eq!(what, "VM description")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn foreign_sections_stop_reading_cleanly() {
    let mut s = prefix();
    s.extend_from_slice(&hdr(FLAG_EOS));
    s.extend_from_slice(&[SECTION_FOOTER, 0, 0, 0, 0]);
    s.extend_from_slice(&[SECTION_END, 0, 0, 0, 0]);
    s.extend_from_slice(&hdr(FLAG_EOS));
    let at = s.len() as u64;
    s.extend_from_slice(&[
        SECTION_FULL,
        0,
        0,
        0,
        1,
        5,
        b't',
        b'i',
        b'm',
        b'e',
        b'r',
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
    ]);
    s.extend_from_slice(b"opaque device state that we cannot parse");
    let l = load(&s[..], Limits::default()).unwrap();
    assert_eq!(
        l.stop,
        StopReason::ForeignSection {
            offset: at,
            kind: precopy_stream::SectionKind::Full,
            section_id: 1,
            name: "timer".into(),
            instance_id: 0,
            version_id: 2,
        }
    );
    assert_eq!(l.stats.bytes, at);
    assert_eq!(l.image.page(0, 0x1000), Some(&[0xab; 4096]));
    // Decoding on past a foreign section is refused.
    let mut dec = Decoder::default();
    let mut input = &s[..];
    while let Some((item, n)) = dec.decode(input).unwrap() {
        input = &input[n..];
        if matches!(item, Item::ForeignSection(_)) {
            break;
        }
    }
    assert!(dec.is_stopped());
    assert!(matches!(
        dec.decode(input),
        Err(Error::Format {
            kind: FormatError::Stopped,
            ..
        })
    ));
}

#[test]
fn valid_but_unsupported_records_are_refused_by_the_loader() {
    // COMPRESS_PAGE: framing decodes, the loader refuses it.
    let mut r = hdr(0x1000 | FLAG_COMPRESS_PAGE | FLAG_CONTINUE).to_vec();
    r.extend_from_slice(&3u32.to_be_bytes());
    r.extend_from_slice(&[1, 2, 3]);
    refused(
        &r,
        FormatError::Unsupported {
            what: "compressed page (compress capability)",
        },
    );
    let mut r = hdr(0x1000 | FLAG_COMPRESS_PAGE | FLAG_CONTINUE).to_vec();
    r.extend_from_slice(&4111u32.to_be_bytes());
    refused(
        &r,
        FormatError::TooLong {
            what: "compressed page",
            len: 4111,
            limit: 4110,
        },
    );
    refused(
        &hdr(FLAG_HOOK),
        FormatError::Unsupported {
            what: "RDMA hook record",
        },
    );
    let mut s = prefix();
    s.extend_from_slice(&hdr(FLAG_EOS));
    let at = s.len() as u64;
    s.extend_from_slice(&[COMMAND, 0, 1, 0, 0]);
    assert_eq!(
        err_of(&s),
        (
            at,
            FormatError::Unsupported {
                what: "migration command (postcopy/return path)"
            }
        )
    );
}

#[test]
fn configuration_subsections() {
    let mut s = Vec::new();
    s.extend_from_slice(&FILE_MAGIC.to_be_bytes());
    s.extend_from_slice(&FILE_VERSION.to_be_bytes());
    s.push(CONFIGURATION);
    s.extend_from_slice(&1u32.to_be_bytes());
    s.push(b'm');
    let sub = |s: &mut Vec<u8>, name: &str| {
        s.push(SUBSECTION);
        s.push(name.len() as u8);
        s.extend_from_slice(name.as_bytes());
        s.extend_from_slice(&1u32.to_be_bytes());
    };
    sub(&mut s, "configuration/target-page-bits");
    s.extend_from_slice(&12u32.to_be_bytes());
    sub(&mut s, "configuration/capabilities");
    s.extend_from_slice(&1u32.to_be_bytes());
    s.push(15);
    s.extend_from_slice(b"x-ignore-shared");
    sub(&mut s, "configuration/uuid");
    s.extend_from_slice(&[0x42; 16]);
    let cfg = s.clone();
    // With x-ignore-shared, MEM_SIZE carries a be64 address per block.
    s.extend_from_slice(&[
        SECTION_START,
        0,
        0,
        0,
        2,
        3,
        b'r',
        b'a',
        b'm',
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        4,
    ]);
    s.extend_from_slice(&mem_size(4096, &[("a", 4096)]));
    s.extend_from_slice(&0x1234_0000u64.to_be_bytes());
    s.extend_from_slice(&hdr(FLAG_EOS));
    s.push(SECTION_EOF);
    let mut dec = Decoder::default();
    let mut input = &s[..];
    let mut seen_cfg = false;
    while let Some((item, n)) = dec.decode(input).unwrap() {
        input = &input[n..];
        if let Item::Configuration(c) = &item {
            assert_eq!(c.machine_type, "m");
            assert_eq!(c.capabilities, vec!["x-ignore-shared"]);
            assert_eq!(c.uuid, Some([0x42; 16]));
            seen_cfg = true;
        }
        if let Item::Ram(RamRecord::MemSize { blocks, .. }) = &item {
            assert_eq!(blocks, &[RamBlockInfo::new("a", 4096)]);
        }
    }
    assert!(seen_cfg && dec.is_complete());
    dec.finish(input).unwrap();

    let mut bad = cfg[..8 + 1 + 4 + 1].to_vec();
    sub(&mut bad, "configuration/nonsense");
    assert_eq!(
        err_of(&bad).1,
        FormatError::UnknownSubsection {
            name: "configuration/nonsense".into()
        }
    );
    let mut bad = cfg[..8 + 1 + 4 + 1].to_vec();
    sub(&mut bad, "configuration/target-page-bits");
    bad.extend_from_slice(&16u32.to_be_bytes());
    assert_eq!(
        err_of(&bad).1,
        FormatError::Unsupported {
            what: "target page size other than 4096"
        }
    );
}

/// QEMU 10.0's `MIG_CMD_SWITCHOVER_START` (command 11, no data) before the ram END section
/// is counted and skipped; with data, or any other command, the loader refuses it at its
/// offset.
#[test]
fn switchover_start_command_is_skipped_other_commands_are_refused() {
    use precopy_stream::{Encoder, FormatError, RamBlockInfo, load};
    let mut enc = Encoder::new();
    let mut head = Vec::new();
    enc.file_header(&mut head, "pc-i440fx-10.0").unwrap();
    enc.ram_setup(&mut head, &[RamBlockInfo::new("pc.ram", 0x2000)])
        .unwrap();
    let mut tail = Vec::new();
    enc.begin_ram_complete(&mut tail).unwrap();
    enc.page(&mut tail, 0, 0x1000, &[7; 4096]).unwrap();
    enc.end_ram_section(&mut tail).unwrap();
    enc.eof(&mut tail).unwrap();
    let with = |cmd: &[u8]| [&head[..], cmd, &tail[..]].concat();

    let l = load(&with(&[0x08, 0, 11, 0, 0])[..], Limits::default()).unwrap();
    assert_eq!(l.stats.switchover_start, 1);
    assert_eq!(l.image.blocks()[0].data()[0x1000..], [7; 4096]);

    for cmd in [
        &[0x08, 0, 11, 0, 1, 9][..],
        &[0x08, 0, 2, 0, 4, 0, 0, 0, 1][..],
    ] {
        let e = load(&with(cmd)[..], Limits::default()).unwrap_err();
        assert_eq!(e.offset(), head.len() as u64, "{e}");
        assert!(
            matches!(
                e,
                precopy_stream::Error::Format {
                    kind: FormatError::Unsupported { .. },
                    ..
                }
            ),
            "{e}"
        );
    }
}
