//! Behaviour of `Policy::SetAssociative`: placement, LRU victim, QEMU's
//! generation protection and the admission filter.

use precopy_pagecache::{Insert, PAGE_SIZE, Page, PageCache, Policy};

const P: u64 = PAGE_SIZE as u64;

fn page(fill: u8) -> Page {
    [fill; PAGE_SIZE]
}

/// One set of `ways` slots (budget = ways pages).
fn one_set(ways: u16) -> PageCache {
    let c = PageCache::new(u64::from(ways) * P, Policy::SetAssociative { ways }).unwrap();
    assert_eq!((c.sets(), c.ways()), (1, usize::from(ways)));
    c
}

#[test]
fn colliding_pages_share_a_set() {
    // Pages 0 and 4 share QEMU's slot in a 4-slot direct-mapped cache; in a
    // 4-way set they coexist.
    let mut c = one_set(4);
    for pn in [0u64, 4, 8, 12] {
        assert_eq!(c.insert(pn * P, &page(pn as u8), 1), Insert::Inserted);
    }
    for pn in [0u64, 4, 8, 12] {
        assert_eq!(c.lookup(pn * P, 2).map(|p| p[0]), Some(pn as u8));
    }
}

#[test]
fn fresh_set_refuses_like_qemu() {
    let mut c = one_set(2);
    assert_eq!(c.insert(0, &page(1), 1), Insert::Inserted);
    assert_eq!(c.insert(P, &page(2), 2), Insert::Inserted);
    // The least recently used page (age 1) is fresh at generation 2.
    assert_eq!(c.insert(2 * P, &page(3), 2), Insert::Refused);
    // A hit refreshes page 0: at generation 3, page 1 (age 2) is fresh and
    // page 0 (age 3) too.
    assert!(c.lookup(0, 3).is_some());
    assert_eq!(c.insert(2 * P, &page(3), 3), Insert::Refused);
    let s = c.stats();
    assert_eq!(
        (s.refused_inserts, s.evictions, s.resident_pages),
        (2, 0, 2)
    );
}

#[test]
fn admission_needs_a_miss_in_the_previous_generation() {
    let mut c = one_set(2);
    assert_eq!(c.insert(0, &page(1), 1), Insert::Inserted);
    assert_eq!(c.insert(P, &page(2), 1), Insert::Inserted);
    // Generation 10: both pages are stale. A page seen for the first time
    // is not admitted (it may be dirtied once and never again)...
    assert_eq!(c.insert(7 * P, &page(7), 10), Insert::Refused);
    // ...nor is a page whose last miss was two generations ago...
    assert_eq!(c.insert(9 * P, &page(9), 12), Insert::Refused);
    assert_eq!(c.insert(9 * P, &page(9), 14), Insert::Refused);
    // ...but one that missed in the previous generation is, over the least
    // recently used page.
    assert_eq!(c.insert(9 * P, &page(9), 15), Insert::Inserted);
    assert_eq!(c.peek(9 * P).map(|p| p[0]), Some(9));
    assert_eq!(c.stats().evictions, 1);
    assert_eq!(c.len(), 2);
}

#[test]
fn victim_is_least_recently_used() {
    let mut c = one_set(3);
    for (pn, g) in [(0u64, 1u64), (1, 2), (2, 3)] {
        assert_eq!(c.insert(pn * P, &page(pn as u8), g), Insert::Inserted);
    }
    // Page 0 used again at 4: page 1 (age 2) is now the least recent.
    assert!(c.lookup(0, 4).is_some());
    let _ = c.insert(5 * P, &page(5), 9); // noted by the filter
    assert_eq!(c.insert(5 * P, &page(5), 10), Insert::Inserted);
    assert!(!c.contains(P));
    assert!(c.contains(0) && c.contains(2 * P) && c.contains(5 * P));
}

#[test]
fn free_slots_admit_without_conditions() {
    let mut c = PageCache::new(64 * P, Policy::default()).unwrap();
    // Contiguous pages spread over the sets like QEMU's modulo: 64
    // consecutive pages fill a 64-page cache without a refusal.
    for pn in 0..64u64 {
        assert_eq!(
            c.insert((1 << 30) + pn * P, &page(1), 1),
            Insert::Inserted,
            "page {pn}"
        );
    }
    assert_eq!(c.len(), 64);
}

#[test]
fn geometry_uses_the_whole_budget() {
    for (pages, ways, sets, per_set) in [
        (1u64, 2u16, 1usize, 1usize),
        (3, 2, 1, 3),
        (4, 2, 2, 2),
        (100, 16, 4, 25),
        (16384, 2, 8192, 2),
        (16384, 16, 1024, 16),
        (5, 256, 1, 5),
    ] {
        let c = PageCache::new(pages * P, Policy::SetAssociative { ways }).unwrap();
        assert_eq!(
            (c.sets(), c.ways()),
            (sets, per_set),
            "{pages} pages, {ways} ways"
        );
        // Less than one slot per set is left unused.
        assert!(c.capacity_pages() as u64 <= pages);
        assert!(c.capacity_pages() as u64 + sets as u64 > pages);
    }
}

#[test]
fn policy_names_round_trip() {
    use std::str::FromStr;
    assert_eq!(Policy::DirectMapped.name(), "direct-mapped");
    assert_eq!(Policy::default().name(), "set-associative");
    for p in [
        Policy::DirectMapped,
        Policy::default(),
        Policy::SetAssociative { ways: 16 },
    ] {
        assert_eq!(Policy::from_str(&p.to_string()), Ok(p));
    }
    assert_eq!("set-associative".parse(), Ok(Policy::default()));
    assert!("set-associative-0".parse::<Policy>().is_err());
    assert!("set-associative-257".parse::<Policy>().is_err());
    assert!("lru".parse::<Policy>().is_err());
}
