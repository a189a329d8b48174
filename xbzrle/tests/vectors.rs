//! Real data: every XBZRLE record QEMU 7.2 wrote in the shared migration
//! stream (`shared/qemu-vectors/xbzrle-vectors.bin.xz`, layout in that
//! folder's README). Each record decodes onto its old page to its new page,
//! and every backend re-encodes (old, new) into a 4096-byte buffer to
//! exactly QEMU's bytes.

mod common;

use std::io::Read;
use std::path::PathBuf;

use xbzrle::{PAGE_SIZE, Page};

const FILE: &str = "xbzrle-vectors.bin.xz";
const RECORDS: usize = 9349;

/// The vectors file: `$PRECOPY_VECTORS` (the folder, or the file itself) if
/// set, else `$CARGO_MANIFEST_DIR/../../shared/qemu-vectors` (CI puts
/// `shared/` beside the repository clone).
fn vectors_path() -> PathBuf {
    let dir = match std::env::var_os("PRECOPY_VECTORS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/qemu-vectors"),
    };
    let file = if dir.is_file() {
        dir.clone()
    } else {
        dir.join(FILE)
    };
    assert!(
        file.is_file(),
        "QEMU vectors not found: looked for {} (set PRECOPY_VECTORS to the qemu-vectors folder)",
        file.display()
    );
    file
}

struct Record {
    old: Box<Page>,
    enc: Vec<u8>,
    new: Box<Page>,
}

fn take<'a>(data: &mut &'a [u8], n: usize, what: &str, rec: usize) -> &'a [u8] {
    assert!(data.len() >= n, "record {rec}: file ends inside {what}");
    let (head, rest) = data.split_at(n);
    *data = rest;
    head
}

fn field<'a>(data: &mut &'a [u8], what: &str, rec: usize) -> &'a [u8] {
    let len = u32::from_le_bytes(take(data, 4, what, rec).try_into().unwrap()) as usize;
    take(data, len, what, rec)
}

fn load() -> Vec<Record> {
    let path = vectors_path();
    let mut raw = Vec::new();
    xz2::read::XzDecoder::new(std::fs::File::open(&path).unwrap())
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("decompressing {}: {e}", path.display()));
    let mut data = &raw[..];
    let mut out = Vec::with_capacity(RECORDS);
    while !data.is_empty() {
        let rec = out.len();
        let old = field(&mut data, "old page", rec);
        let enc = field(&mut data, "delta", rec).to_vec();
        let new = field(&mut data, "new page", rec);
        assert!(
            (1..=PAGE_SIZE).contains(&enc.len()),
            "record {rec}: delta length {}",
            enc.len()
        );
        out.push(Record {
            old: Box::new(old.try_into().expect("old page is 4096 bytes")),
            enc,
            new: Box::new(new.try_into().expect("new page is 4096 bytes")),
        });
    }
    out
}

#[test]
#[cfg_attr(
    miri,
    ignore = "9349 real records; decompression and encoding take hours under Miri"
)]
fn qemu_vectors_decode_and_reencode_on_every_backend() {
    let records = load();
    assert_eq!(records.len(), RECORDS, "record count of {FILE}");
    assert_eq!(
        records.iter().map(|r| r.enc.len()).sum::<usize>(),
        740_753,
        "sum of enc_len (README)"
    );
    let codecs = common::codecs("qemu_vectors_decode_and_reencode_on_every_backend");
    let mut out = [0u8; PAGE_SIZE];
    for (i, r) in records.iter().enumerate() {
        let mut page = *r.old;
        xbzrle::decode(&r.enc, &mut page).unwrap_or_else(|e| panic!("record {i}: {e}"));
        assert!(page == *r.new, "record {i}: decode(old) != new");
        let mut page = *r.old;
        xbzrle::reference::decode(&r.enc, &mut page).unwrap();
        assert!(page == *r.new, "record {i}: reference decode(old) != new");

        let n = xbzrle::reference::encode(&r.old, &r.new, &mut out).unwrap();
        assert_eq!(&out[..n], &r.enc[..], "record {i}: reference encoder");
        for c in &codecs {
            let name = c.backend().name();
            let n = c
                .encode(&r.old, &r.new, &mut out)
                .unwrap_or_else(|e| panic!("record {i} on {name}: {e}"));
            assert_eq!(
                &out[..n],
                &r.enc[..],
                "record {i} on {name}: bytes differ from QEMU's"
            );
            let mut cached = *r.old;
            let n = c.encode_and_update(&mut cached, &r.new, &mut out).unwrap();
            assert_eq!(
                &out[..n],
                &r.enc[..],
                "record {i} on {name}: encode_and_update"
            );
            assert!(cached == *r.new);
            // one byte short overflows (exact rule), nothing written past it
            let mut short = vec![0xa5u8; r.enc.len() + 16];
            assert_eq!(
                c.encode(&r.old, &r.new, &mut short[..r.enc.len() - 1]),
                Err(xbzrle::EncodeError::Overflow),
                "record {i} on {name}"
            );
            assert!(short[r.enc.len() - 1..].iter().all(|&b| b == 0xa5));
        }
    }
    println!(
        "{} QEMU records checked on {} backends",
        records.len(),
        codecs.len()
    );
}
