//! The replay of QEMU's real page sequence (`shared/qemu-vectors/page-trace.txt`)
//! reproduces QEMU's own cache counters with `DirectMapped` at QEMU's size,
//! and the default policy beats it at smaller budgets.

use precopy_pagecache::replay::{Event, Kind, PageTrace, replay};
use precopy_pagecache::{PageCache, Policy};

/// The real page trace, located by `precopy_testsupport`; `None` (the test
/// is skipped, or fails under `PRECOPY_REQUIRE_VECTORS=1`) without the vectors.
fn trace(test: &str) -> Option<PageTrace> {
    let v = precopy_testsupport::vectors_or_skip(test)?;
    let text = v
        .read_to_string("page-trace.txt")
        .unwrap_or_else(|e| panic!("QEMU page trace: {e}"));
    Some(PageTrace::parse(&text).unwrap())
}

#[test]
fn trace_matches_the_stream_record_counts() {
    let Some(t) = trace("trace_matches_the_stream_record_counts") else {
        return;
    };
    let count = |k: Kind| {
        t.events()
            .iter()
            .filter(|e| matches!(e, Event::Send { kind, .. } if *kind == k))
            .count()
    };
    // README / expected.json: ZERO 18087, PAGE 17333, XBZRLE 9349.
    assert_eq!(
        (count(Kind::Zero), count(Kind::Page), count(Kind::Xbzrle)),
        (18087, 17333, 9349)
    );
    // 12 pass boundaries (QEMU's dirty-sync-count ended at 14: the setup
    // sync plus one whose pass sent nothing visible as a new pass).
    assert_eq!(t.syncs(), 12);
}

#[test]
fn direct_mapped_at_qemus_size_reproduces_qemus_misses() {
    let Some(t) = trace("direct_mapped_at_qemus_size_reproduces_qemus_misses") else {
        return;
    };
    let mut c = PageCache::new(16 << 20, Policy::DirectMapped).unwrap();
    let r = replay(&t, &mut c);
    assert_eq!(r.generation, 13);
    // Every XBZRLE record was a hit in QEMU; the 54 overflow pages too.
    assert_eq!(r.lookups, t.lookup_addrs().count() as u64);
    assert!(r.hits >= 9349 + 54, "{r:?}");
    // QEMU counted 2165 misses (query-migrate cache-miss). The trace lacks
    // the 1486 unchanged pages (hits that refreshed ages), and QEMU's
    // addresses order the small ROM blocks differently, so allow 5 %.
    let misses = r.misses() as f64;
    assert!(
        (misses - 2165.0).abs() / 2165.0 < 0.05,
        "replay misses {misses}, QEMU 2165"
    );
    assert_eq!(c.stats().misses, r.misses());
    assert_eq!(c.stats().hits, r.hits);
}

#[test]
fn default_policy_beats_direct_mapped_on_the_real_trace() {
    let Some(t) = trace("default_policy_beats_direct_mapped_on_the_real_trace") else {
        return;
    };
    let ws = t.working_set_pages() as u64;
    assert!(ws > 1000, "working set {ws}");
    for fraction in [8u64, 4, 2] {
        let want = ws / fraction;
        let pages = 1u64 << (63 - want.leading_zeros());
        let budget = pages * 4096;
        let dm = replay(
            &t,
            &mut PageCache::new(budget, Policy::DirectMapped).unwrap(),
        );
        let def = replay(&t, &mut PageCache::new(budget, Policy::default()).unwrap());
        assert!(
            def.hits > dm.hits,
            "1/{fraction} of the working set ({pages} pages): default {} hits, direct-mapped {}",
            def.hits,
            dm.hits
        );
    }
}

#[test]
fn parse_errors_name_the_line() {
    let e = PageTrace::parse("# c\np 1000\nsync\nq 2000\n").unwrap_err();
    assert_eq!(e.line, 4);
    assert!(e.to_string().contains("line 4"), "{e}");
    for bad in ["p", "p zz", "p 1 2", "x 10000000000000000", "syncx"] {
        assert!(PageTrace::parse(bad).is_err(), "{bad:?}");
    }
    let t = PageTrace::parse("\n  x 0x1000 \nz 0X2000\n").unwrap();
    assert_eq!(
        t.events(),
        &[
            Event::Send {
                kind: Kind::Xbzrle,
                addr: 0x1000
            },
            Event::Send {
                kind: Kind::Zero,
                addr: 0x2000
            }
        ]
    );
}

#[test]
fn replay_follows_qemus_engine() {
    // First pass: no cache use. After a sync: p/x look up, miss inserts,
    // z inserts a zero page without a lookup.
    let t = PageTrace::parse("p 0\nx 1000\nz 2000\nsync\np 0\nz 2000\nsync\nx 0\np 2000\np 3000\n")
        .unwrap();
    let mut c = PageCache::new(64 * 4096, Policy::DirectMapped).unwrap();
    let r = replay(&t, &mut c);
    assert_eq!(
        (r.lookups, r.hits, r.zero_inserts, r.generation),
        (4, 2, 1, 3)
    );
    assert!(c.contains(0) && c.contains(0x2000) && c.contains(0x3000));
    assert!(!c.contains(0x1000));
    assert_eq!(c.peek(0x2000), Some(&[0u8; 4096]));
}
