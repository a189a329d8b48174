//! mapped-ram: our reader against a real QEMU 10.0.2 file (committed fixture,
//! and a fresh one when QEMU 10 is installed), writer/reader round trips,
//! and corrupt files refused with typed errors at the right offsets.

use std::path::{Path, PathBuf};
use std::process::Command;

use precopy_stream::mapped_ram::{
    HEADER_LEN, MappedRamFile, MappedRamWriter, PAGES_ALIGNMENT, bitmap_bytes,
};
use precopy_stream::{Error, FormatError, Limits, PAGE_SIZE, RamBlockInfo};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Checks `file` against the expected lines of `mapped_ram_expect.py`.
fn check_against_expected(file: &[u8], expected: &str) {
    let m = MappedRamFile::parse(file, &Limits::default()).expect("QEMU's file parses");
    assert!(m.capabilities.iter().any(|c| c == "mapped-ram"));
    assert!(
        m.machine_type.starts_with("pc-i440fx-"),
        "{}",
        m.machine_type
    );
    let exp_blocks: Vec<Vec<&str>> = expected
        .lines()
        .filter(|l| l.starts_with("block "))
        .map(|l| l.split(' ').collect())
        .collect();
    assert_eq!(m.blocks.len(), exp_blocks.len());
    let mut pc_ram = Vec::new();
    for (i, (b, e)) in m.blocks.iter().zip(&exp_blocks).enumerate() {
        assert_eq!(b.info.name, e[1]);
        assert_eq!(b.info.used_length.to_string(), e[2], "{}", e[1]);
        assert_eq!(b.header.bitmap_offset.to_string(), e[3], "{}", e[1]);
        assert_eq!(b.header.pages_offset.to_string(), e[4], "{}", e[1]);
        assert_eq!(b.present_pages().to_string(), e[5], "{}", e[1]);
        // QEMU puts the bitmap right after the header and pages at the next MiB.
        assert_eq!(b.header.bitmap_offset, b.header_offset + HEADER_LEN);
        assert_eq!(b.header.pages_offset % PAGES_ALIGNMENT, 0);
        let mut ram = vec![0xaa; b.info.used_length as usize];
        m.read_block(file, i, &mut ram).unwrap();
        assert_eq!(sha(&ram), e[6], "content of {}", e[1]);
        if b.info.name == "pc.ram" {
            pc_ram = ram;
        }
    }
    // pc.ram equals QEMU's own pmemsave of the stopped guest outside [0xa0000, 0x100000).
    for l in expected.lines().filter(|l| l.starts_with("pmem ")) {
        let f: Vec<&str> = l.split(' ').collect();
        let (a, z): (usize, usize) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        assert_eq!(sha(&pc_ram[a..z]), f[3], "pc.ram [{a:#x}, {z:#x})");
    }
    // After the RAM: QEMU's device sections (kept as bytes from the first one), checked
    // to run to EOF and the VM description.
    let last = m.sections.last().expect("a device section after the RAM");
    assert!(last.payload.is_none());
    assert!(last.offset > m.ram_end);
    assert!(m.saw_eof);
    assert!(m.vm_description.is_some());
    // The same file cut inside its device state, or inside its VM description: refused.
    let len = file.len();
    for cut in [last.offset as usize + 30, len - 100] {
        let e = MappedRamFile::parse(&file[..cut], &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("truncated"), "cut at {cut}: {e}");
        assert_eq!(e.offset(), cut as u64, "{e}");
    }
}

#[test]
fn qemu10_fixture_parses_to_the_expected_ram() {
    let z = std::fs::read(data_dir().join("qemu10-mapped-ram.bin.zst")).unwrap();
    let file = zstd::decode_all(&z[..]).unwrap();
    let expected = std::fs::read_to_string(data_dir().join("qemu10-mapped-ram.expected")).unwrap();
    check_against_expected(&file, &expected);
    assert!(MappedRamFile::sniff(&file[..]));
}

const QEMU10: &str = "/opt/qemu-newer/usr/bin/qemu-system-x86_64";

/// Runs QEMU 10 now (firmware only, 2 s, then `migrate file:` with
/// mapped-ram) and checks the fresh file. Skipped with a printed reason when
/// QEMU 10 or python3 is absent, unless `PRECOPY_REQUIRE_QEMU10` is set.
#[test]
fn fresh_qemu10_file_parses_to_the_expected_ram() {
    let qemu = std::env::var("PRECOPY_QEMU10").unwrap_or_else(|_| QEMU10.to_owned());
    let have_python = Command::new("python3").arg("--version").output().is_ok();
    if !Path::new(&qemu).exists() || !have_python {
        let why =
            format!("QEMU 10 at {qemu} or python3 missing (scripts/qemu-newer.sh installs it)");
        if std::env::var_os("PRECOPY_REQUIRE_QEMU10").is_some() {
            panic!("FAILED fresh_qemu10_file: {why}");
        }
        eprintln!("SKIPPED fresh_qemu10_file_parses_to_the_expected_ram: {why}");
        return;
    }
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-vectors");
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("python3")
        .arg(scripts.join("mapped_ram.py"))
        .args(["--out", dir.path().to_str().unwrap(), "--qemu", &qemu])
        .args(["--run-seconds", "1"])
        .status()
        .unwrap();
    assert!(st.success(), "mapped_ram.py failed");
    let bin = dir.path().join("qemu-mapped-ram.bin");
    let out = Command::new("python3")
        .arg(scripts.join("mapped_ram_expect.py"))
        .arg(&bin)
        .arg(dir.path().join("ram.pmem"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let expected = String::from_utf8(out.stdout).unwrap();
    let file = std::fs::File::open(&bin).unwrap();
    // Through the File (positional reads), not a Vec.
    let m = MappedRamFile::parse(&file, &Limits::default()).unwrap();
    assert!(!m.blocks.is_empty());
    check_against_expected(&std::fs::read(&bin).unwrap(), &expected);
}

/// Where QEMU 10 is, or `None` after a `SKIPPED` line (a failure under
/// `PRECOPY_REQUIRE_QEMU10`).
fn qemu10_or_skip(test: &str) -> Option<String> {
    let qemu = std::env::var("PRECOPY_QEMU10").unwrap_or_else(|_| QEMU10.to_owned());
    let have_python = Command::new("python3").arg("--version").output().is_ok();
    if Path::new(&qemu).exists() && have_python {
        return Some(qemu);
    }
    let why = format!("QEMU 10 at {qemu} or python3 missing (scripts/qemu-newer.sh installs it)");
    if std::env::var_os("PRECOPY_REQUIRE_QEMU10").is_some() {
        panic!("FAILED {test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// RAM written by our writer, followed by QEMU's own stream tail (its device state for its
/// own machine), loads in QEMU 10 and gives QEMU the same RAM (pmemsave of both guests).
/// What QEMU needs from a file: its machine type, its exact RAM block list, its ram section
/// id and valid device sections for that machine, which only QEMU can write.
#[test]
fn precopy_written_ram_with_qemus_device_state_loads_in_qemu10() {
    let Some(qemu) = qemu10_or_skip("precopy_written_ram_with_qemus_device_state_loads_in_qemu10")
    else {
        return;
    };
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-vectors/mapped_ram.py");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let st = Command::new("python3")
        .arg(&script)
        .args(["--out", d, "--qemu", &qemu, "--run-seconds", "1"])
        .status()
        .unwrap();
    assert!(st.success());
    let theirs = std::fs::File::open(dir.path().join("qemu-mapped-ram.bin")).unwrap();
    let m = MappedRamFile::parse(&theirs, &Limits::default()).unwrap();
    let layout = precopy_stream::mapped_ram::Layout::with_ram_section_id(
        &m.machine_type,
        &m.block_infos(),
        m.ram_section_id,
    )
    .unwrap();
    let ours_path = dir.path().join("precopy-mapped-ram.bin");
    let ours = std::fs::File::create(&ours_path).unwrap();
    let w = MappedRamWriter::with_layout(&ours, layout).unwrap();
    for (i, b) in m.blocks.iter().enumerate() {
        let mut ram = vec![0u8; b.info.used_length as usize];
        m.read_block(&theirs, i, &mut ram).unwrap();
        w.write_pages(i, 0, &ram).unwrap();
    }
    let mut tail = vec![0u8; (m.file_len - m.ram_end) as usize];
    precopy_stream::mapped_ram::ReadAt::read_exact_at(&theirs, &mut tail, m.ram_end).unwrap();
    w.finish_with_tail(&tail).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .args([
            "--out",
            d,
            "--qemu",
            &qemu,
            "--load",
            ours_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "QEMU refused precopy's file: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let a = std::fs::read(dir.path().join("ram.pmem")).unwrap();
    let b = std::fs::read(dir.path().join("loaded.pmem")).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(
        a[..0xa0000] == b[..0xa0000] && a[0x100000..] == b[0x100000..],
        "RAM differs"
    );
}

fn page_of(seed: u64, zero: bool) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    if !zero {
        for (i, b) in p.iter_mut().enumerate() {
            *b = (seed.wrapping_mul(2654435761).wrapping_add(i as u64 * 7) >> 3) as u8 | 1;
        }
    }
    p
}

/// Writes `pages` (block, page index, content) in order and returns the file
/// bytes plus the expected RAM per block.
fn write_file(
    blocks: &[RamBlockInfo],
    pages: &[(usize, u64, [u8; PAGE_SIZE])],
    sections: &[(&str, u32, u32, &[u8])],
) -> (Vec<u8>, Vec<Vec<u8>>) {
    let f = tempfile::tempfile().unwrap();
    let w = MappedRamWriter::new(&f, "pc-i440fx-10.0", blocks).unwrap();
    let mut ram: Vec<Vec<u8>> = blocks
        .iter()
        .map(|b| vec![0; b.used_length as usize])
        .collect();
    for (b, p, data) in pages {
        w.write_page(*b, p * PAGE_SIZE as u64, data).unwrap();
        let o = *p as usize * PAGE_SIZE;
        ram[*b][o..o + PAGE_SIZE].copy_from_slice(data);
    }
    let len = w.finish(sections).unwrap();
    let mut bytes = Vec::new();
    use std::io::{Read, Seek};
    let mut f = f;
    f.rewind().unwrap();
    f.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes.len() as u64, len);
    (bytes, ram)
}

fn two_blocks() -> Vec<RamBlockInfo> {
    vec![
        RamBlockInfo::new("pc.ram", 70 * PAGE_SIZE as u64),
        RamBlockInfo::new("pc.bios", 3 * PAGE_SIZE as u64),
    ]
}

#[test]
fn round_trip_with_rewrites_zero_holes_and_device_state() {
    let blocks = two_blocks();
    let pages = vec![
        (0, 0, page_of(1, false)),
        (0, 69, page_of(2, false)),
        (0, 5, page_of(3, false)),
        (0, 5, page_of(4, false)), // rewritten in place
        (0, 64, page_of(5, false)),
        (0, 64, page_of(0, true)), // became zero: bit cleared
        (1, 2, page_of(6, false)),
        (0, 7, page_of(0, true)), // zero: never written
    ];
    let (bytes, ram) = write_file(&blocks, &pages, &[("precopy/vcpu", 0, 1, b"regs")]);
    let m = MappedRamFile::parse(&bytes[..], &Limits::default()).unwrap();
    assert_eq!(m.block_infos(), blocks);
    assert_eq!(m.blocks[0].present_pages(), 3);
    assert_eq!(m.blocks[1].present_pages(), 1);
    assert!(m.blocks[0].is_present(69) && !m.blocks[0].is_present(64));
    for (i, want) in ram.iter().enumerate() {
        let mut got = vec![0x55; want.len()];
        m.read_block(&bytes[..], i, &mut got).unwrap();
        assert_eq!(&got, want, "block {i}");
    }
    assert!(m.saw_eof);
    assert_eq!(m.sections.len(), 1);
    assert_eq!(m.sections[0].name, "precopy/vcpu");
    assert_eq!(m.sections[0].payload.as_deref(), Some(&b"regs"[..]));
}

#[test]
fn write_pages_runs_skip_zero_pages_and_leave_holes() {
    let blocks = vec![RamBlockInfo::new("pc.ram", 1024 * PAGE_SIZE as u64)];
    let f = tempfile::NamedTempFile::new().unwrap();
    let w = MappedRamWriter::new(f.as_file(), "pc", &blocks).unwrap();
    let mut data = vec![0u8; 1024 * PAGE_SIZE];
    for p in (0..1024).step_by(16) {
        data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&page_of(p as u64, false));
    }
    assert_eq!(w.write_pages(0, 0, &data).unwrap(), 64);
    w.finish(&[]).unwrap();
    let file = std::fs::File::open(f.path()).unwrap();
    let m = MappedRamFile::parse(&file, &Limits::default()).unwrap();
    assert_eq!(m.blocks[0].present_pages(), 64);
    let mut got = vec![1u8; data.len()];
    m.read_block(&file, 0, &mut got).unwrap();
    assert_eq!(got, data);
    // Sparse: far less allocated than the 4 MiB of RAM (64 pages + headers).
    use std::os::unix::fs::MetadataExt;
    let allocated = file.metadata().unwrap().blocks() * 512;
    assert!(allocated < 1024 * 1024, "allocated {allocated} bytes");
}

fn err_kind(bytes: &[u8]) -> (u64, FormatError) {
    match MappedRamFile::parse(bytes, &Limits::default()) {
        Err(Error::Format { offset, kind }) => (offset, kind),
        other => panic!("expected a format error, got {other:?}"),
    }
}

fn sample() -> (Vec<u8>, MappedRamFile) {
    let (bytes, _) = write_file(
        &two_blocks(),
        &[(0, 1, page_of(9, false)), (1, 0, page_of(8, false))],
        &[],
    );
    let m = MappedRamFile::parse(&bytes[..], &Limits::default()).unwrap();
    (bytes, m)
}

fn put_be64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn bitmap_offset_past_the_end_is_refused_at_its_field() {
    let (mut b, m) = sample();
    let h = m.blocks[1].header_offset;
    let len = b.len() as u64;
    put_be64(&mut b, h + 12, len - 4);
    assert_eq!(
        err_kind(&b),
        (
            h + 12,
            FormatError::MappedRam {
                why: "bitmap past the end of the file"
            }
        )
    );
    put_be64(&mut b, h + 12, u64::MAX - 3);
    assert_eq!(err_kind(&b).0, h + 12);
}

#[test]
fn corrupt_headers_are_refused_with_typed_errors() {
    let (b0, m) = sample();
    let h = m.blocks[0].header_offset;
    let cases: Vec<(u64, Vec<u8>, &str)> = vec![
        (h, 2u32.to_be_bytes().to_vec(), "header version is not 1"),
        (
            h + 4,
            8192u64.to_be_bytes().to_vec(),
            "page size is not 4096",
        ),
        (
            h + 12,
            (h + 3).to_be_bytes().to_vec(),
            "bitmap offset before the end of its header",
        ),
        (
            h + 20,
            (PAGES_ALIGNMENT + 4096).to_be_bytes().to_vec(),
            "pages offset not 1 MiB-aligned",
        ),
        (
            h + 20,
            0u64.to_be_bytes().to_vec(),
            "pages region overlaps the bitmap",
        ),
        (
            h + 20,
            (1u64 << 50).to_be_bytes().to_vec(),
            "pages region past the end of the file",
        ),
    ];
    for (at, patch, why) in cases {
        let mut b = b0.clone();
        b[at as usize..at as usize + patch.len()].copy_from_slice(&patch);
        assert_eq!(err_kind(&b), (at, FormatError::MappedRam { why }), "{why}");
    }
    // A bitmap bit past the block's last page (70 pages: bits 70..128 of word 1).
    let mut b = b0.clone();
    let bm = m.blocks[0].header.bitmap_offset;
    b[bm as usize + 8 + 7] = 0x80;
    assert_eq!(
        err_kind(&b),
        (
            bm + bitmap_bytes(70 * 4096) - 8,
            FormatError::MappedRam {
                why: "bitmap bit set past the block's last page"
            }
        )
    );
    // MEM_SIZE total over the limit.
    let small = Limits {
        max_ram_bytes: 4096,
        ..Limits::default()
    };
    assert!(matches!(
        MappedRamFile::parse(&b0[..], &small),
        Err(Error::Format {
            kind: FormatError::RamTooLarge { .. },
            ..
        })
    ));
    // A page record in the stream part of the file.
    let mut b = b0.clone();
    put_be64(&mut b, m.ram_end, 0x1000 | 0x08);
    assert_eq!(
        err_kind(&b),
        (
            m.ram_end,
            FormatError::MappedRam {
                why: "page record in the stream of a mapped-ram file"
            }
        )
    );
}

#[test]
fn a_plain_stream_is_not_mapped_ram() {
    let mut enc = precopy_stream::Encoder::new();
    let mut out = Vec::new();
    enc.file_header(&mut out, "pc").unwrap();
    enc.ram_setup(&mut out, &[RamBlockInfo::new("pc.ram", 0x10000)])
        .unwrap();
    assert!(!MappedRamFile::sniff(&out[..]));
    assert!(matches!(err_kind(&out).1, FormatError::NotMappedRam));
}

#[test]
fn every_truncation_is_refused_without_panic() {
    let (b, m) = sample();
    // Every cut in the stream prefix and tail, and a few inside the regions.
    let mut cuts: Vec<usize> = (0..(m.blocks[0].header.bitmap_offset as usize + 40)).collect();
    cuts.extend(m.ram_end as usize..b.len());
    cuts.extend([
        m.blocks[0].header.pages_offset as usize + 10,
        m.ram_end as usize - 1,
    ]);
    for cut in cuts {
        assert!(
            MappedRamFile::parse(&b[..cut], &Limits::default()).is_err(),
            "cut at {cut} of {}",
            b.len()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any blocks, any pages written in any order (zeros and rewrites
    /// included): the file reads back to the last content of every page.
    #[test]
    fn round_trip(
        sizes in proptest::collection::vec(1u64..150, 1..4),
        writes in proptest::collection::vec((0usize..4, 0u64..150, any::<u64>(), any::<bool>()), 0..80),
    ) {
        let blocks: Vec<RamBlockInfo> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| RamBlockInfo::new(format!("b{i}"), s * PAGE_SIZE as u64))
            .collect();
        let pages: Vec<_> = writes
            .iter()
            .map(|&(b, p, seed, z)| {
                let b = b % blocks.len();
                (b, p % sizes[b], page_of(seed, z))
            })
            .collect();
        let (bytes, ram) = write_file(&blocks, &pages, &[]);
        let m = MappedRamFile::parse(&bytes[..], &Limits::default()).unwrap();
        prop_assert_eq!(m.block_infos(), blocks);
        for (i, want) in ram.iter().enumerate() {
            let mut got = vec![0x55; want.len()];
            m.read_block(&bytes[..], i, &mut got).unwrap();
            prop_assert!(&got == want);
            let nonzero = want.chunks(PAGE_SIZE).filter(|c| c.iter().any(|&x| x != 0)).count();
            prop_assert_eq!(m.blocks[i].present_pages(), nonzero as u64);
        }
    }

    /// Arbitrary bytes patched over a valid file never panic the reader.
    #[test]
    fn corrupt_bytes_never_panic(patches in proptest::collection::vec((0usize..400, any::<u8>()), 1..8)) {
        let (mut b, _) = sample();
        for (at, v) in patches {
            if at < b.len() {
                b[at] = v;
            }
        }
        let _ = MappedRamFile::parse(&b[..], &Limits::default());
    }
}
