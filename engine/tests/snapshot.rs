//! Snapshots of the simulated guest: full + diffs restore to the exact RAM (digest-checked),
//! a chain of 10 diffs under a running workload, merge, and every kind of bad file refused
//! with its typed error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use precopy_engine::snapshot::{
    SnapshotError, SnapshotOptions, Snapshotter, apply_diff, load_full, merge_chain, restore_chain,
};
use precopy_engine::vmdesc::image_digest;
use precopy_engine::{SimConfig, SimGuest, SimWorkload, VcpuControl};
use precopy_stream::{Limits, RamImage};

fn idle_guest() -> SimGuest {
    SimGuest::new(SimConfig {
        blocks: vec![("pc.ram".into(), 8 << 20), ("pc.bios".into(), 256 << 10)],
        dirty_rate: 0,
        seed: 7,
        initial_zero_percent: 40,
        ..SimConfig::default()
    })
    .unwrap()
}

fn same_ram(image: &RamImage, guest: &SimGuest) {
    let snap = guest.snapshot();
    assert_eq!(image.blocks().len(), snap.len());
    for (b, s) in image.blocks().iter().zip(&snap) {
        assert!(b.data() == &s[..], "block {} differs", b.name());
    }
}

fn page(v: u8) -> [u8; 4096] {
    let mut p = [v; 4096];
    p[17] = v.wrapping_add(1);
    p
}

fn limits() -> Limits {
    Limits::default()
}

#[test]
fn full_then_diffs_restore_exactly_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let g = idle_guest();
    let mut s = Snapshotter::new(&g, SnapshotOptions::default()).unwrap();
    let full = dir.path().join("full.snap");
    let st = s.full(&full).unwrap();
    assert_eq!(st.sequence, 0);
    // Zero pages are holes: disk usage well under the RAM size (40 % start zero).
    assert!(st.disk_bytes < (8 << 20) + (256 << 10), "{st:?}");
    let r = load_full(&full, &limits()).unwrap();
    same_ram(&r.image, &g);

    let mut diffs = Vec::new();
    for i in 0..4u8 {
        // A new page, a small change of a page already in a diff (XBZRLE), a page zeroed.
        g.write_page(0, 10 + u64::from(i), &page(i + 1)).unwrap();
        let mut p = page(1);
        p[100] = i;
        g.write_page(0, 10, &p).unwrap();
        g.write_page(1, u64::from(i), &[0; 4096]).unwrap();
        let d = dir.path().join(format!("d{i}.diff"));
        let st = s.diff(&d).unwrap();
        assert_eq!(st.sequence, u64::from(i) + 1);
        // At i = 0 pages 10 + i and 10 are the same page.
        assert_eq!(st.live_pages, if i == 0 { 2 } else { 3 });
        if i > 0 {
            assert!(st.xbzrle >= 1, "page 10 changed a little: {st:?}");
        }
        diffs.push(d);
        let r = restore_chain(&full, &diffs, &limits()).unwrap();
        same_ram(&r.image, &g);
        assert_eq!(r.sequence, u64::from(i) + 1);
    }
    // Merge the chain; the merged file restores the same RAM and the next diff applies onto it.
    let merged = dir.path().join("merged.snap");
    merge_chain(&full, &diffs, &merged, &limits()).unwrap();
    let m = load_full(&merged, &limits()).unwrap();
    same_ram(&m.image, &g);
    g.write_page(0, 99, &page(9)).unwrap();
    let d5 = dir.path().join("d5.diff");
    s.diff(&d5).unwrap();
    let r = restore_chain(&merged, std::slice::from_ref(&d5), &limits()).unwrap();
    same_ram(&r.image, &g);
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

#[test]
fn chain_of_ten_diffs_under_a_running_workload() {
    let dir = tempfile::tempdir().unwrap();
    let g = SimGuest::new(SimConfig {
        blocks: vec![("pc.ram".into(), 32 << 20)],
        dirty_rate: 200_000,
        vcpus: 2,
        workload: SimWorkload::Mix,
        seed: 3,
        ..SimConfig::default()
    })
    .unwrap();
    // resume: false leaves the guest stopped after each snapshot, so its RAM can be compared
    // with the restore; the pages were copied while it ran, only the final pass was paused.
    let mut s = Snapshotter::new(
        &g,
        SnapshotOptions {
            resume: false,
            xbzrle_cache_bytes: 8 << 20,
        },
    )
    .unwrap();
    let full = dir.path().join("full.snap");
    s.full(&full).unwrap();
    same_ram(&load_full(&full, &limits()).unwrap().image, &g);
    let mut diffs: Vec<PathBuf> = Vec::new();
    let mut r = load_full(&full, &limits()).unwrap();
    let mut kinds = (0, 0, 0);
    for i in 0..10 {
        g.resume().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let d = dir.path().join(format!("d{i}.diff"));
        let st = s.diff(&d).unwrap();
        assert!(!g.is_running());
        assert!(st.live_pages > 0, "the workload dirtied nothing: {st:?}");
        kinds.0 += st.zero;
        kinds.1 += st.raw;
        kinds.2 += st.xbzrle;
        apply_diff(&mut r, &d, &limits()).unwrap();
        same_ram(&r.image, &g);
        diffs.push(d);
    }
    assert!(kinds.2 > 0, "no XBZRLE record in 10 diffs: {kinds:?}");
    let whole = restore_chain(&full, &diffs, &limits()).unwrap();
    assert_eq!(image_digest(&whole.image), image_digest(&r.image));
    g.resume().unwrap();
}

fn chain(dir: &Path) -> (SimGuest, PathBuf, PathBuf, PathBuf) {
    let g = idle_guest();
    let mut s = Snapshotter::new(&g, SnapshotOptions::default()).unwrap();
    let full = dir.join("full.snap");
    s.full(&full).unwrap();
    g.write_page(0, 3, &page(3)).unwrap();
    let d1 = dir.join("d1.diff");
    s.diff(&d1).unwrap();
    g.write_page(0, 4, &page(4)).unwrap();
    let d2 = dir.join("d2.diff");
    s.diff(&d2).unwrap();
    (g, full, d1, d2)
}

/// A chain error and the file it names (restore_chain says which file is at fault).
fn in_file(e: SnapshotError) -> (std::path::PathBuf, SnapshotError) {
    match e {
        SnapshotError::InFile { path, source } => (path, *source),
        e => panic!("the error names no file: {e}"),
    }
}

#[test]
fn a_diff_on_the_wrong_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, full, d1, d2) = chain(dir.path());
    let (p, e) = in_file(restore_chain(&full, std::slice::from_ref(&d2), &limits()).unwrap_err());
    assert_eq!(p, d2);
    assert!(matches!(e, SnapshotError::WrongBase { .. }), "{e}");
    let (p, e) = in_file(restore_chain(&full, &[d1.clone(), d1.clone()], &limits()).unwrap_err());
    assert_eq!(p, d1);
    assert!(matches!(e, SnapshotError::WrongBase { .. }), "{e}");
    // A diff from another guest's chain.
    let other = tempfile::tempdir().unwrap();
    let (_g2, _f2, o1, _o2) = chain(other.path());
    let (p, e) = in_file(restore_chain(&full, std::slice::from_ref(&o1), &limits()).unwrap_err());
    assert_eq!(p, o1);
    assert!(matches!(e, SnapshotError::WrongBase { .. }), "{e}");
    assert!(restore_chain(&full, &[d1, d2], &limits()).is_ok());
}

#[test]
fn torn_and_corrupt_diffs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, full, d1, _d2) = chain(dir.path());
    let good = std::fs::read(&d1).unwrap();
    for cut in [0, 7, 20, good.len() / 2, good.len() - 41, good.len() - 1] {
        std::fs::write(&d1, &good[..cut]).unwrap();
        let (p, e) =
            in_file(restore_chain(&full, std::slice::from_ref(&d1), &limits()).unwrap_err());
        assert_eq!(p, d1);
        assert!(
            matches!(
                e,
                SnapshotError::Torn { .. } | SnapshotError::Corrupt { .. }
            ),
            "cut {cut}: {e}"
        );
    }
    // One flipped bit anywhere in the body: the trailer no longer matches.
    for at in [9, 50, good.len() / 2, good.len() - 45] {
        let mut b = good.clone();
        b[at] ^= 0x10;
        std::fs::write(&d1, &b).unwrap();
        let (_, e) =
            in_file(restore_chain(&full, std::slice::from_ref(&d1), &limits()).unwrap_err());
        assert!(matches!(e, SnapshotError::Torn { .. }), "flip at {at}: {e}");
    }
}

#[test]
fn corrupt_full_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, full, _d1, _d2) = chain(dir.path());
    let good = std::fs::read(&full).unwrap();
    let m = precopy_stream::mapped_ram::MappedRamFile::parse(&good[..], &limits()).unwrap();
    let b0 = &m.blocks[0];
    // Bitmap offset past the end of the file.
    let mut b = good.clone();
    let at = (b0.header_offset + 12) as usize;
    b[at..at + 8].copy_from_slice(&(good.len() as u64 + 4096).to_be_bytes());
    std::fs::write(&full, &b).unwrap();
    match load_full(&full, &limits()).unwrap_err() {
        SnapshotError::Format { source, .. } => assert_eq!(source.offset(), at as u64),
        e => panic!("{e}"),
    }
    // Truncated anywhere.
    for cut in [10, 200, good.len() / 2, good.len() - 10] {
        std::fs::write(&full, &good[..cut]).unwrap();
        assert!(
            matches!(
                load_full(&full, &limits()).unwrap_err(),
                SnapshotError::Format { .. }
            ),
            "cut {cut}"
        );
    }
    // A changed byte of page data: the RAM digest catches it.
    let p = (0..b0.pages()).find(|&p| b0.is_present(p)).unwrap();
    let mut b = good.clone();
    b[b0.page_file_offset(p) as usize + 5] ^= 1;
    std::fs::write(&full, &b).unwrap();
    assert!(matches!(
        load_full(&full, &limits()).unwrap_err(),
        SnapshotError::DigestMismatch { .. }
    ));
    // A mapped-ram file without our VM description (as QEMU writes them).
    let json_at = good.len() - m.vm_description.as_ref().unwrap().len() - 5;
    std::fs::write(&full, &good[..json_at]).unwrap();
    assert!(matches!(
        load_full(&full, &limits()).unwrap_err(),
        SnapshotError::NotASnapshot { .. }
    ));
}

#[test]
fn a_diff_before_a_full_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let g = idle_guest();
    let mut s = Snapshotter::new(&g, SnapshotOptions::default()).unwrap();
    assert!(matches!(
        s.diff(&dir.path().join("d.diff")).unwrap_err(),
        SnapshotError::NoBase
    ));
    assert!(!dir.path().join("d.diff").exists());
}
