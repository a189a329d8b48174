//! Against the real QEMU 7.2 streams in `shared/qemu-vectors` (see its README):
//! per-block SHA-256, record counts, XBZRLE RAM == plain RAM, and our encoder
//! rewriting QEMU's RAM records byte for byte.
//!
//! The folder is found by `precopy_testsupport` (`PRECOPY_VECTORS`, else
//! `../shared/qemu-vectors` beside the workspace). Without it every test here
//! prints a `SKIPPED` line and passes, or fails under `PRECOPY_REQUIRE_VECTORS=1`.

use std::path::PathBuf;
use std::sync::OnceLock;

use precopy_stream::{
    Decoder, Encoder, Item, Limits, Loaded, RamBlockInfo, RamRecord, SectionKind, StopReason, load,
};
use sha2::{Digest, Sha256};

/// True (after a `SKIPPED` line) when the QEMU vectors are absent; panics
/// instead under `PRECOPY_REQUIRE_VECTORS=1` (see `precopy_testsupport`).
fn skipped(test: &str) -> bool {
    precopy_testsupport::vectors_or_skip(test).is_none()
}

/// The QEMU vectors folder (call after `skipped` said they are present).
fn vectors_dir() -> PathBuf {
    precopy_testsupport::Vectors::locate()
        .unwrap_or_else(|e| panic!("{e}"))
        .dir()
        .to_path_buf()
}

/// File `name` of the vectors folder, decompressed.
fn unxz(name: &str) -> Vec<u8> {
    precopy_testsupport::Vectors::at(vectors_dir())
        .read(name)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn xbzrle_stream() -> &'static [u8] {
    static S: OnceLock<Vec<u8>> = OnceLock::new();
    S.get_or_init(|| unxz("xbzrle-stream.bin.xz"))
}

fn plain_stream() -> &'static [u8] {
    static S: OnceLock<Vec<u8>> = OnceLock::new();
    S.get_or_init(|| unxz("plain-stream.bin.xz"))
}

fn loaded(which: &str) -> &'static Loaded {
    static X: OnceLock<Loaded> = OnceLock::new();
    static P: OnceLock<Loaded> = OnceLock::new();
    let (cell, bytes) = match which {
        "xbzrle" => (&X, xbzrle_stream()),
        _ => (&P, plain_stream()),
    };
    cell.get_or_init(|| load(bytes, Limits::default()).expect("QEMU stream loads"))
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(vectors_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check_blocks(l: &Loaded) {
    let exp = expected();
    let blocks = exp["blocks"].as_array().unwrap();
    assert_eq!(l.image.blocks().len(), blocks.len());
    for (b, e) in l.image.blocks().iter().zip(blocks) {
        assert_eq!(b.name(), e["name"].as_str().unwrap());
        assert_eq!(b.len(), e["length"].as_u64().unwrap(), "{}", b.name());
        assert_eq!(
            sha256_hex(b.data()),
            e["sha256"].as_str().unwrap(),
            "{}",
            b.name()
        );
    }
    assert_eq!(
        l.image.total_bytes(),
        exp["mem_size_total"].as_u64().unwrap()
    );
    assert_eq!(
        l.machine_type.as_deref(),
        exp["machine_type_in_stream"].as_str()
    );
    assert_eq!(l.file_version, 3);
}

/// For test `test`: `None` when the vectors are absent (skipped); else the
/// `which` stream ("xbzrle" or "plain") loaded, its blocks checked against
/// expected.json, its ZERO and PAGE record counts checked, and its part of
/// expected.json (`<which>_stream`).
fn stream_case(test: &str, which: &str) -> Option<(&'static Loaded, serde_json::Value)> {
    if skipped(test) {
        return None;
    }
    let l = loaded(which);
    check_blocks(l);
    let e = expected()[format!("{which}_stream").as_str()].clone();
    assert_eq!(l.stats.zero.count, e["records"]["zero"].as_u64().unwrap());
    assert_eq!(l.stats.page.count, e["records"]["page"].as_u64().unwrap());
    Some((l, e))
}

#[test]
fn xbzrle_stream_matches_expected() {
    let Some((l, e)) = stream_case("xbzrle_stream_matches_expected", "xbzrle") else {
        return;
    };
    let s = &l.stats;
    assert_eq!(s.xbzrle.count, e["records"]["xbzrle"].as_u64().unwrap());
    assert_eq!(
        s.xbzrle_delta_bytes,
        e["xbzrle_encoded_bytes_total"].as_u64().unwrap()
    );
    assert_eq!(
        s.records_with_block_name,
        e["records_with_block_name"].as_u64().unwrap()
    );
    assert_eq!(
        s.records_with_continue,
        e["records_with_continue"].as_u64().unwrap()
    );
    assert_eq!(s.eos.count, e["eos_markers"].as_u64().unwrap());
    assert_eq!(s.mem_size.count, 1);
    assert_eq!(
        (s.ram_start, s.ram_part, s.ram_end),
        (
            e["ram_sections"]["START"].as_u64().unwrap(),
            e["ram_sections"]["PART"].as_u64().unwrap(),
            e["ram_sections"]["END"].as_u64().unwrap()
        )
    );
    // Each record kind's bytes: header 8 + payload (+ names: 7 named records).
    assert_eq!(s.zero.bytes, 9 * s.zero.count + named_bytes(l, "zero"));
    assert_eq!(
        s.xbzrle.bytes,
        11 * s.xbzrle.count + s.xbzrle_delta_bytes + named_bytes(l, "xbzrle")
    );
    assert_eq!(s.bytes, e["ram_data_ends_at"].as_u64().unwrap());
    match &l.stop {
        StopReason::ForeignSection {
            offset,
            kind,
            section_id,
            name,
            instance_id,
            version_id,
        } => {
            assert_eq!(*offset, e["ram_data_ends_at"].as_u64().unwrap());
            assert_eq!(*kind, SectionKind::Full);
            assert_eq!(
                (name.as_str(), *section_id, *instance_id, *version_id),
                ("timer", 0, 0, 2)
            );
        }
        other => panic!("unexpected stop {other:?}"),
    }
    assert!(l.device_states.is_empty());
}

/// Bytes of block names carried by records of `kind` (computed by a direct walk).
fn named_bytes(l: &Loaded, kind: &str) -> u64 {
    let bytes = if l.stats.xbzrle.count > 0 {
        xbzrle_stream()
    } else {
        plain_stream()
    };
    let mut dec = Decoder::new(Limits::default());
    let mut input = bytes;
    let mut total = 0;
    while let Ok(Some((item, n))) = dec.decode(input) {
        input = &input[n..];
        let (k, named, block) = match item {
            Item::Ram(RamRecord::Zero { named, block, .. }) => ("zero", named, block),
            Item::Ram(RamRecord::Page { named, block, .. }) => ("page", named, block),
            Item::Ram(RamRecord::Xbzrle { named, block, .. }) => ("xbzrle", named, block),
            Item::ForeignSection(_) => break,
            _ => continue,
        };
        if k == kind && named {
            total += 1 + dec.blocks()[block].name.len() as u64;
        }
    }
    total
}

#[test]
fn plain_stream_matches_expected() {
    let Some((l, e)) = stream_case("plain_stream_matches_expected", "plain") else {
        return;
    };
    let s = &l.stats;
    assert_eq!(s.xbzrle.count, 0);
    assert_eq!(
        s.records_with_block_name,
        e["records_with_block_name"].as_u64().unwrap()
    );
    assert_eq!((s.ram_start, s.ram_part, s.ram_end), (1, 2, 1));
    assert_eq!(s.bytes, e["ram_data_ends_at"].as_u64().unwrap());
    assert_eq!(
        s.page.bytes,
        s.page.count * (8 + 4096) + named_bytes(l, "page")
    );
    assert!(matches!(&l.stop, StopReason::ForeignSection { name, .. } if name == "timer"));
}

#[test]
fn xbzrle_ram_equals_plain_ram() {
    if skipped("xbzrle_ram_equals_plain_ram") {
        return;
    }
    let x = &loaded("xbzrle").image;
    let p = &loaded("plain").image;
    assert_eq!(x.blocks().len(), p.blocks().len());
    for (a, b) in x.blocks().iter().zip(p.blocks()) {
        assert_eq!(a.name(), b.name());
        assert!(a.data() == b.data(), "block {} differs", a.name());
    }
}

/// Re-encodes every RAM item of a QEMU stream with our [`Encoder`]; returns
/// our bytes and the offset where QEMU's RAM data ended.
fn rewrite(stream: &[u8]) -> (Vec<u8>, usize) {
    let mut dec = Decoder::new(Limits::default());
    let mut enc = Encoder::with_ram_section_id(2);
    let mut out = Vec::with_capacity(stream.len());
    let mut input = stream;
    let mut in_start = false;
    loop {
        let pos = stream.len() - input.len();
        let (item, n) = dec.decode(input).expect("decodes").expect("complete");
        input = &input[n..];
        match item {
            Item::FileHeader { .. } | Item::Footer { .. } => {}
            Item::Configuration(c) => enc.file_header(&mut out, c.machine_type).unwrap(),
            Item::Section(h) => match h.kind {
                SectionKind::Start => in_start = true,
                SectionKind::Part => enc.begin_ram_iteration(&mut out).unwrap(),
                SectionKind::End => enc.begin_ram_complete(&mut out).unwrap(),
                SectionKind::Full => unreachable!(),
            },
            Item::Ram(RamRecord::MemSize { blocks, .. }) => {
                enc.ram_setup(&mut out, &blocks).unwrap()
            }
            Item::Ram(RamRecord::Eos) if in_start => in_start = false,
            Item::Ram(RamRecord::Eos) => enc.end_ram_section(&mut out).unwrap(),
            Item::Ram(RamRecord::Zero { block, offset, .. }) => {
                enc.zero_page(&mut out, block, offset).unwrap()
            }
            Item::Ram(RamRecord::Page {
                block,
                offset,
                data,
                ..
            }) => enc.page(&mut out, block, offset, data).unwrap(),
            Item::Ram(RamRecord::Xbzrle {
                block,
                offset,
                delta,
                ..
            }) => enc.xbzrle_page(&mut out, block, offset, delta).unwrap(),
            Item::ForeignSection(_) => return (out, pos),
            other => panic!("unexpected item {other:?} at {pos}"),
        }
    }
}

#[test]
fn rewriting_xbzrle_stream_is_byte_identical() {
    if skipped("rewriting_xbzrle_stream_is_byte_identical") {
        return;
    }
    let s = xbzrle_stream();
    let (ours, end) = rewrite(s);
    assert_eq!(end, 72143688);
    assert_eq!(ours.len(), end);
    let first_diff = ours.iter().zip(s).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "first differing byte");
}

#[test]
fn rewriting_plain_stream_is_byte_identical() {
    if skipped("rewriting_plain_stream_is_byte_identical") {
        return;
    }
    let s = plain_stream();
    let (ours, end) = rewrite(s);
    assert_eq!(end, 62147296);
    assert!(ours[..] == s[..end], "rewritten plain stream differs");
}

#[test]
fn tiny_cases_are_where_the_readme_says() {
    if skipped("tiny_cases_are_where_the_readme_says") {
        return;
    }
    let text = std::fs::read_to_string(vectors_dir().join("tiny-cases.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = xbzrle_stream();
    let blocks = [RamBlockInfo::new("pc.ram", 0x800_0000)];
    for case in cases.as_array().unwrap() {
        let hex = case["record_hex"].as_str().unwrap();
        let rec: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let pos = case["stream_pos"].as_u64().unwrap() as usize;
        assert_eq!(&s[pos..pos + rec.len()], &rec[..]);
        // Our encoder, with pc.ram as the previous block, writes the same bytes.
        let offset = u64::from_str_radix(
            case["page_offset_in_block"]
                .as_str()
                .unwrap()
                .trim_start_matches("0x"),
            16,
        )
        .unwrap();
        let delta: Vec<u8> = rec[11..].to_vec();
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.file_header(&mut out, "m").unwrap();
        enc.ram_setup(&mut out, &blocks).unwrap();
        enc.begin_ram_iteration(&mut out).unwrap();
        enc.zero_page(&mut out, 0, 0).unwrap();
        let before = out.len();
        enc.xbzrle_page(&mut out, 0, offset, &delta).unwrap();
        assert_eq!(&out[before..], &rec[..]);
    }
}

#[test]
fn vm_description_is_found_past_qemu_device_state() {
    if skipped("vm_description_is_found_past_qemu_device_state") {
        return;
    }
    let s = xbzrle_stream();
    let e = &expected()["xbzrle_stream"];
    let mut r = precopy_stream::StreamReader::new(s, Limits::default());
    let mut loader = precopy_stream::Loader::new(Limits::default());
    loader.load_from(&mut r).unwrap();
    let (base, rest) = r.read_rest(64 << 20).unwrap();
    // The rest starts after the foreign section's header (type, id, "timer", instance, version).
    assert_eq!(
        base,
        e["ram_data_ends_at"].as_u64().unwrap() + 1 + 4 + 1 + 5 + 4 + 4
    );
    let (eof_at, json) = precopy_stream::find_vm_description(&rest).expect("VM description");
    // The README gives the JSON's offset: right after the EOF byte.
    assert_eq!(
        base + eof_at as u64 + 1,
        e["vmdescription_at"].as_u64().unwrap()
    );
    let v: serde_json::Value = serde_json::from_slice(json).unwrap();
    assert_eq!(
        v["devices"].as_array().unwrap().len() as u64,
        e["vmdescription_devices"].as_u64().unwrap()
    );
    assert_eq!(v["page_size"], 4096);
}

/// `Loader::load_to_end` reads both real streams to their last byte, keeps QEMU's device
/// state as bytes and splits it into exactly the devices the VM description lists, each
/// section starting with its header and ending with its footer.
#[test]
fn device_state_is_read_to_the_end_and_split_along_the_vm_description() {
    if skipped("device_state_is_read_to_the_end_and_split_along_the_vm_description") {
        return;
    }
    for (key, s) in [
        ("xbzrle_stream", xbzrle_stream()),
        ("plain_stream", plain_stream()),
    ] {
        let e = &expected()[key];
        let mut r = precopy_stream::StreamReader::new(s, Limits::default());
        let mut loader = precopy_stream::Loader::new(Limits::default());
        loader.load_to_end(&mut r).unwrap();
        let l = loader.finish().unwrap();
        let f = l.foreign_device_state.as_ref().expect("device state");
        assert_eq!(f.offset, e["ram_data_ends_at"].as_u64().unwrap(), "{key}");
        if let Some(at) = e.get("vmdescription_at").and_then(|v| v.as_u64()) {
            assert_eq!(f.eof_offset + 1, at, "{key}");
        }
        assert_eq!(
            f.bytes,
            s[f.offset as usize..f.eof_offset as usize],
            "{key}"
        );
        assert_eq!(l.stats.bytes, s.len() as u64, "{key}");
        assert!(matches!(
            l.stop,
            StopReason::EndOfStream {
                vm_description: true,
                ..
            }
        ));
        let v: serde_json::Value =
            serde_json::from_slice(l.vm_description.as_ref().unwrap()).unwrap();
        let devices = v["devices"].as_array().unwrap();
        assert_eq!(f.sections.len(), devices.len(), "{key}");
        for (i, (sec, dev)) in f.sections.iter().zip(devices).enumerate() {
            assert_eq!(sec.name, dev["name"].as_str().unwrap(), "{key} #{i}");
            assert_eq!(
                u64::from(sec.instance_id),
                dev["instance_id"].as_u64().unwrap()
            );
            let b = f.section_bytes(i).unwrap();
            assert_eq!(b[0], 0x04, "{key} {}: FULL", sec.name);
            assert_eq!(b[b.len() - 5], 0x7e, "{key} {}: footer", sec.name);
            assert_eq!(b[b.len() - 4..], sec.section_id.to_be_bytes());
        }
        assert_eq!(f.sections[0].name, "timer");
        println!(
            "{key}: {} device sections, {} bytes",
            f.sections.len(),
            f.bytes.len()
        );
    }
}
