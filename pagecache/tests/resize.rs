//! Resize semantics: growing keeps every page, shrinking keeps the most
//! recently used pages that fit, the same size is a no-op, bad budgets are
//! errors that leave the cache as it was.

use precopy_pagecache::{CacheError, Insert, PAGE_SIZE, Page, PageCache, Policy};

const P: u64 = PAGE_SIZE as u64;

fn page_of(id: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for w in p.chunks_exact_mut(8) {
        w.copy_from_slice(&id.to_le_bytes());
    }
    p
}

/// Fills the cache to capacity with distinct pages, page `pn` holding
/// `page_of(pn)`, each inserted at its own generation. Returns
/// (page number, generation) of the resident pages.
fn fill(cache: &mut PageCache, first_pn: u64) -> Vec<(u64, u64)> {
    let mut resident = Vec::new();
    let mut pn = first_pn;
    let mut generation = 1;
    while cache.len() < cache.capacity_pages() {
        if cache.insert(pn * P, &page_of(pn), generation) == Insert::Inserted {
            resident.push((pn, generation));
        }
        pn += 1;
        generation += 1;
        assert!(pn < first_pn + 1_000_000, "cache never filled");
    }
    // Inserts may have evicted earlier pages: keep what is resident now.
    resident.retain(|&(pn, _)| cache.contains(pn * P));
    assert_eq!(resident.len(), cache.len());
    resident
}

fn assert_holds(cache: &PageCache, pages: &[(u64, u64)]) {
    for &(pn, _) in pages {
        assert_eq!(
            cache.peek(pn * P).map(|p| p[..8].to_vec()),
            Some(pn.to_le_bytes().to_vec()),
            "page {pn}"
        );
    }
}

#[test]
fn direct_mapped_grow_keeps_all() {
    let mut c = PageCache::new(8 * P, Policy::DirectMapped).unwrap();
    let pages = fill(&mut c, 100);
    assert_eq!(pages.len(), 8);
    for slots in [16u64, 64, 1024] {
        c.resize(slots * P).unwrap();
        assert_eq!(c.capacity_pages() as u64, slots);
        assert_eq!(c.len(), 8);
        assert_holds(&c, &pages);
    }
    assert_eq!(c.stats().evictions, 0);
}

#[test]
fn direct_mapped_shrink_keeps_most_recent() {
    let mut c = PageCache::new(8 * P, Policy::DirectMapped).unwrap();
    // Page i at generation 10 + i: pages 4..8 are more recent than 0..4.
    for i in 0..8u64 {
        assert_eq!(c.insert(i * P, &page_of(i), 10 + i), Insert::Inserted);
    }
    // A hit makes page 1 the most recent of all.
    assert!(c.lookup(P, 30).is_some());
    c.resize(4 * P).unwrap();
    assert_eq!(c.len(), 4);
    // New slot j holds j or j + 4, whichever was used later.
    for (kept, dropped) in [(1u64, 5u64), (6, 2), (7, 3), (4, 0)] {
        assert!(c.contains(kept * P), "page {kept}");
        assert!(!c.contains(dropped * P), "page {dropped}");
    }
    assert_holds(&c, &[(1, 0), (4, 0), (6, 0), (7, 0)]);
    assert_eq!(c.stats().evictions, 4);
    // The ages survive: page 1 (age 30) still protects its slot at 31.
    assert_eq!(c.insert(5 * P, &page_of(5), 31), Insert::Refused);
    // Shrink to one slot: the most recent page of all stays.
    c.resize(P).unwrap();
    assert_eq!(c.len(), 1);
    assert!(c.contains(P));
}

#[test]
fn direct_mapped_rejects_non_power_of_two_and_stays_intact() {
    let mut c = PageCache::new(8 * P, Policy::DirectMapped).unwrap();
    let pages = fill(&mut c, 0);
    let stats = c.stats();
    assert_eq!(
        c.resize(12 * P),
        Err(CacheError::NotPowerOfTwo {
            budget_bytes: 12 * P,
            pages: 12
        })
    );
    assert_eq!(
        c.resize(P / 2),
        Err(CacheError::BudgetTooSmall {
            budget_bytes: P / 2,
            page_size: P
        })
    );
    assert!(matches!(
        c.resize(u64::MAX / 2 + 1),
        Err(CacheError::BudgetTooLarge { .. })
    ));
    assert_eq!(c.budget_bytes(), 8 * P);
    assert_eq!(c.stats(), stats);
    assert_holds(&c, &pages);
}

#[test]
fn same_size_is_a_no_op() {
    for policy in [
        Policy::DirectMapped,
        Policy::default(),
        Policy::SetAssociative { ways: 16 },
    ] {
        let mut c = PageCache::new(64 * P, policy).unwrap();
        let pages = fill(&mut c, 7);
        let (stats, sets, ways) = (c.stats(), c.sets(), c.ways());
        c.resize(64 * P).unwrap();
        c.resize(64 * P + 123).unwrap();
        assert_eq!((c.stats(), c.sets(), c.ways()), (stats, sets, ways));
        assert_eq!(c.budget_bytes(), 64 * P + 123);
        assert_holds(&c, &pages);
    }
}

#[test]
fn set_associative_grow_keeps_all() {
    for ways in [1u16, 2, 3, 4, 16] {
        let policy = Policy::SetAssociative { ways };
        for start in [0u64, 5, 1 << 20] {
            let mut c = PageCache::new(24 * P, policy).unwrap();
            let pages = fill(&mut c, start);
            // Odd sizes too: splits that fit, and widening when they do not.
            for budget in [25u64, 32, 33, 48, 100, 1000] {
                c.resize(budget * P).unwrap();
                assert!(c.capacity_pages() as u64 <= budget);
                assert_eq!(c.len(), pages.len(), "ways {ways} budget {budget}");
                assert_holds(&c, &pages);
            }
            assert_eq!(c.stats().evictions, 0);
        }
    }
}

#[test]
fn set_associative_shrink_keeps_most_recent() {
    for ways in [2u16, 4, 16] {
        let mut c = PageCache::new(64 * P, Policy::SetAssociative { ways }).unwrap();
        let mut pages = fill(&mut c, 1000);
        // Shrinking to fewer pages than one set's ways: one set, so exactly
        // the most recently used pages stay.
        let keep = usize::from(ways);
        c.resize(keep as u64 * P).unwrap();
        assert_eq!((c.sets(), c.ways(), c.len()), (1, keep, keep));
        pages.sort_by_key(|&(_, g)| std::cmp::Reverse(g));
        assert_holds(&c, &pages[..keep]);
        for &(pn, _) in &pages[keep..] {
            assert!(!c.contains(pn * P), "ways {ways}: page {pn} should be gone");
        }
    }
}

#[test]
fn set_associative_shrink_to_odd_size_keeps_data_and_regrows() {
    let mut c = PageCache::new(256 * P, Policy::SetAssociative { ways: 4 }).unwrap();
    let pages = fill(&mut c, 0);
    c.resize(40 * P).unwrap();
    assert!(c.len() <= c.capacity_pages());
    assert!(c.len() >= c.capacity_pages() / 2, "kept only {}", c.len());
    let kept: Vec<_> = pages
        .iter()
        .filter(|&&(pn, _)| c.contains(pn * P))
        .copied()
        .collect();
    assert_eq!(kept.len(), c.len());
    assert_holds(&c, &kept);
    // Re-growing keeps what is there.
    c.resize(256 * P).unwrap();
    assert_holds(&c, &kept);
}

#[test]
fn shrink_then_use_keeps_working() {
    let mut c = PageCache::new(128 * P, Policy::default()).unwrap();
    let mut pages = fill(&mut c, 0);
    c.resize(2 * P).unwrap();
    assert_eq!((c.sets(), c.ways(), c.len()), (1, 2, 2));
    pages.sort_by_key(|&(_, g)| std::cmp::Reverse(g));
    assert_holds(&c, &pages[..2]);
    // Both residents are stale at a much later generation. A new page is
    // admitted once it missed in the previous generation too.
    let g = pages[0].1 + 100;
    assert_eq!(c.insert(9000 * P, &page_of(9000), g), Insert::Refused);
    assert_eq!(c.insert(9000 * P, &page_of(9000), g + 1), Insert::Inserted);
    assert_eq!(
        c.lookup(9000 * P, g + 1).map(|p| p[..8].to_vec()),
        Some(9000u64.to_le_bytes().to_vec())
    );
    // The least recently used of the two old pages made room.
    assert!(c.contains(pages[0].0 * P));
    assert!(!c.contains(pages[1].0 * P));
}
