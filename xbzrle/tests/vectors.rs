//! Real data: every XBZRLE record QEMU 7.2 wrote in the shared migration
//! stream (`shared/qemu-vectors/xbzrle-vectors.bin.xz`, layout in that
//! folder's README). Each record decodes onto its old page to its new page,
//! and every backend re-encodes (old, new) into a 4096-byte buffer to
//! exactly QEMU's bytes.

mod common;

use xbzrle::{PAGE_SIZE, Page};

const FILE: &str = "xbzrle-vectors.bin.xz";
const RECORDS: usize = 9349;

struct Record {
    old: Box<Page>,
    enc: Vec<u8>,
    new: Box<Page>,
}

/// Every record of the vectors file (located by `precopy_testsupport`), or
/// `None` when the vectors are absent and the test is skipped.
fn load(test: &str) -> Option<Vec<Record>> {
    let v = precopy_testsupport::vectors_or_skip(test)?;
    let records = v.xbzrle_records().unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::with_capacity(RECORDS);
    for (rec, r) in records.into_iter().enumerate() {
        assert!(
            (1..=PAGE_SIZE).contains(&r.delta.len()),
            "record {rec}: delta length {}",
            r.delta.len()
        );
        out.push(Record {
            old: r.old,
            enc: r.delta,
            new: r.new,
        });
    }
    Some(out)
}

#[test]
#[cfg_attr(
    miri,
    ignore = "9349 real records; decompression and encoding take hours under Miri"
)]
fn qemu_vectors_decode_and_reencode_on_every_backend() {
    let Some(records) = load("qemu_vectors_decode_and_reencode_on_every_backend") else {
        return;
    };
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
