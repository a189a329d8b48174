//! `page-compression` end to end over loopback TCP: every method, the destination's RAM
//! equal to the source's, and the per-method statistics equal to what the destination read.

mod common;

use std::sync::Arc;

use common::*;
use precopy_engine::{
    MigrationInfo, PageCompression, ParameterUpdate, Received, SimConfig, SimGuest, SimWorkload,
};

/// Mostly zero RAM whose writes zero pages or put one word into them: pages that zstd and
/// zlib shrink to a few bytes.
fn compressible_guest(seed: u64) -> Arc<SimGuest> {
    Arc::new(
        SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), 4 << 20), ("vga.vram".into(), 256 << 10)],
            workload: SimWorkload::Zeroing,
            dirty_rate: 3000,
            vcpus: 2,
            seed,
            initial_zero_percent: 90,
        })
        .unwrap(),
    )
}

fn run(g: Arc<SimGuest>, mode: PageCompression, max_bandwidth: u64) -> (MigrationInfo, Received) {
    let m = migrator(g.clone(), false, true);
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(max_bandwidth),
            downtime_limit: Some(30),
            page_compression: Some(mode),
            multifd_zstd_level: Some(3),
            multifd_zlib_level: Some(6),
            ..Default::default()
        },
    );
    m.set_pass_limit(Some(500));
    let (info, r) = migrate(&m);
    completed(&info);
    let r = r.unwrap_or_else(|e| panic!("{mode}: {e}"));
    assert_same(&g, &r);
    (info, r)
}

/// The source's per-method pages and bytes are the records the destination read.
fn stats_match(mode: PageCompression, info: &MigrationInfo, r: &Received) {
    let p = info
        .page_compression
        .as_ref()
        .expect("page-compression stats");
    let ram = info.ram.as_ref().unwrap();
    assert_eq!(p.method, mode.name());
    assert_eq!(p.none.pages, ram.normal, "{mode}");
    assert_eq!(p.none.pages, r.stats.page.count, "{mode}");
    assert_eq!(p.none.bytes, r.stats.page.bytes, "{mode}");
    assert_eq!(p.xbzrle.pages, r.stats.xbzrle.count, "{mode}");
    assert_eq!(p.xbzrle.bytes, r.stats.xbzrle.bytes, "{mode}");
    assert_eq!(p.zstd.pages, r.stats.zstd.count, "{mode}");
    assert_eq!(p.zstd.bytes, r.stats.zstd.bytes, "{mode}");
    assert_eq!(p.zlib.pages, r.stats.zlib.count, "{mode}");
    assert_eq!(p.zlib.bytes, r.stats.zlib.bytes, "{mode}");
    assert_eq!(ram.transferred, r.bytes, "{mode}");
}

#[test]
fn every_method_migrates_the_ram_exactly() {
    for (i, mode) in PageCompression::ALL.into_iter().enumerate() {
        let g = compressible_guest(i as u64);
        let (info, r) = run(g, mode, 32 << 20);
        stats_match(mode, &info, &r);
        let p = info.page_compression.as_ref().unwrap();
        match mode {
            PageCompression::None => {
                assert_eq!(p.xbzrle.pages + p.zstd.pages + p.zlib.pages, 0);
                assert!(p.none.pages > 0);
            }
            PageCompression::Xbzrle => {
                assert_eq!(p.zstd.pages + p.zlib.pages, 0);
                assert!(
                    info.xbzrle_cache.is_some(),
                    "xbzrle mode turns the cache on"
                );
            }
            PageCompression::Zstd => {
                assert_eq!(p.xbzrle.pages + p.zlib.pages, 0);
                assert!(p.zstd.pages > 0);
                assert!(p.zstd.cpu_time_ns > 0);
                // A compressible page costs far less than a raw one.
                assert!(p.zstd.bytes < p.zstd.pages * 1024, "{p:?}");
            }
            PageCompression::Zlib => {
                assert_eq!(p.xbzrle.pages + p.zstd.pages, 0);
                assert!(p.zlib.pages > 0);
                assert!(p.zlib.bytes < p.zlib.pages * 1024, "{p:?}");
            }
            PageCompression::Auto => {
                // The first page sent is a probe of zstd; zlib is not a candidate of auto.
                assert!(p.zstd.cpu_time_ns > 0, "{p:?}");
                assert_eq!(p.zlib.pages + p.zlib.cpu_time_ns, 0, "{p:?}");
                assert!(
                    p.link_bandwidth > 0 && p.link_bandwidth <= 32 << 20,
                    "{p:?}"
                );
                assert!(info.xbzrle_cache.is_some());
            }
        }
    }
}

#[test]
fn auto_on_incompressible_ram_with_an_unlimited_link_sends_raw_pages() {
    // Random RAM (fullpage writes) over loopback: compression never pays, so after its
    // probes auto sends nearly every page raw.
    let g = sim(SimWorkload::FullPage, 4, 2000, 3);
    let (info, r) = run(g, PageCompression::Auto, 0);
    stats_match(PageCompression::Auto, &info, &r);
    let p = info.page_compression.as_ref().unwrap();
    let sent = p.none.pages + p.zstd.pages + p.zlib.pages + p.xbzrle.pages;
    assert!(p.none.pages * 10 >= sent * 9, "{p:?}");
}
