//! QEMU-exact behaviour of `Policy::DirectMapped` (migration/page_cache.c),
//! the cases from issue 3, plus the constructor errors.

use precopy_pagecache::{CacheError, Insert, PAGE_SIZE, Page, PageCache, Policy};

const P: u64 = PAGE_SIZE as u64;

fn page(fill: u8) -> Page {
    [fill; PAGE_SIZE]
}

fn four_slots() -> PageCache {
    let c = PageCache::new(4 * P, Policy::DirectMapped).unwrap();
    assert_eq!(c.capacity_pages(), 4);
    c
}

#[test]
fn fresh_page_is_protected_for_two_generations() {
    let mut c = four_slots();
    assert_eq!(c.insert(0, &page(1), 1), Insert::Inserted);
    // Page 4 maps to slot 0 too; page 0's age 1 + 2 > 2: refused.
    assert_eq!(c.insert(4 * P, &page(2), 2), Insert::Refused);
    assert!(c.contains(0));
    assert!(!c.contains(4 * P));
    // 1 + 2 > 3 is false: accepted, page 0 evicted.
    assert_eq!(c.insert(4 * P, &page(2), 3), Insert::Inserted);
    assert!(c.lookup(0, 3).is_none());
    assert_eq!(c.lookup(4 * P, 3).map(|p| p[0]), Some(2));
    let s = c.stats();
    assert_eq!((s.lookups, s.hits, s.misses), (2, 1, 1));
    assert_eq!((s.inserts, s.refused_inserts, s.evictions), (2, 1, 1));
    assert_eq!((s.resident_pages, s.bytes), (1, P));
}

#[test]
fn hit_refreshes_age() {
    let mut c = four_slots();
    assert_eq!(c.insert(4 * P, &page(2), 3), Insert::Inserted);
    // A hit at generation 5 sets the age to 5.
    assert!(c.lookup(4 * P, 5).is_some());
    assert_eq!(c.insert(0, &page(1), 6), Insert::Refused);
    assert_eq!(c.insert(0, &page(1), 7), Insert::Inserted);
    assert_eq!(c.lookup(0, 7).map(|p| p[0]), Some(1));
    assert!(!c.contains(4 * P));
}

#[test]
fn without_the_hit_the_age_stays_old() {
    let mut c = four_slots();
    assert_eq!(c.insert(4 * P, &page(2), 3), Insert::Inserted);
    // contains() does not age: 3 + 2 > 6 is false.
    assert!(c.contains(4 * P));
    assert_eq!(c.insert(0, &page(1), 6), Insert::Inserted);
}

#[test]
fn reinserting_the_same_address_always_succeeds() {
    let mut c = four_slots();
    assert_eq!(c.insert(P, &page(1), 10), Insert::Inserted);
    assert_eq!(c.insert(P, &page(2), 10), Insert::Replaced);
    assert_eq!(c.insert(P, &page(3), 0), Insert::Replaced);
    assert_eq!(c.peek(P).map(|p| p[0]), Some(3));
    assert_eq!(c.len(), 1);
}

#[test]
fn empty_slot_accepts_at_any_generation() {
    let mut c = four_slots();
    for (i, g) in [(0u64, 0u64), (1, 1), (2, u64::MAX), (3, 5)] {
        assert_eq!(c.insert(i * P, &page(i as u8), g), Insert::Inserted);
    }
    assert_eq!(c.len(), 4);
}

#[test]
fn slot_is_page_number_mod_slots() {
    let mut c = four_slots();
    for i in 0..4u64 {
        assert_eq!(c.insert(i * P, &page(i as u8), 1), Insert::Inserted);
    }
    // Every page 4..8 collides with a fresh page.
    for i in 4..8u64 {
        assert_eq!(c.insert(i * P, &page(0), 2), Insert::Refused);
    }
    // Page 9 lands in slot 1 only.
    assert_eq!(c.insert(9 * P, &page(9), 3), Insert::Inserted);
    assert!(!c.contains(P));
    for i in [0u64, 2, 3, 9] {
        assert!(c.contains(i * P), "page {i}");
    }
}

#[test]
fn low_address_bits_are_ignored() {
    let mut c = four_slots();
    assert_eq!(c.insert(0x1234, &page(5), 1), Insert::Inserted);
    assert!(c.contains(0x1000));
    assert!(c.contains(0x1fff));
    assert_eq!(c.lookup(0x1000, 1).map(|p| p[0]), Some(5));
    assert_eq!(c.insert(0x1000, &page(6), 1), Insert::Replaced);
}

#[test]
fn extreme_addresses_and_generations() {
    let mut c = four_slots();
    assert_eq!(c.insert(u64::MAX, &page(1), u64::MAX), Insert::Inserted);
    assert!(c.contains(!(P - 1)));
    // QEMU's unsigned `age + 2` wraps to 1 for age = u64::MAX.
    assert_eq!(c.insert(u64::MAX - 4 * P, &page(2), 0), Insert::Refused);
    assert_eq!(c.insert(u64::MAX - 4 * P, &page(2), 1), Insert::Inserted);
    assert_eq!(c.lookup(u64::MAX - 4 * P, 1).map(|p| p[0]), Some(2));
}

#[test]
fn constructor_errors_say_what_was_wrong() {
    assert_eq!(
        PageCache::new(P - 1, Policy::DirectMapped).unwrap_err(),
        CacheError::BudgetTooSmall {
            budget_bytes: P - 1,
            page_size: P
        }
    );
    assert_eq!(
        PageCache::new(0, Policy::default()).unwrap_err(),
        CacheError::BudgetTooSmall {
            budget_bytes: 0,
            page_size: P
        }
    );
    assert_eq!(
        PageCache::new(3 * P, Policy::DirectMapped).unwrap_err(),
        CacheError::NotPowerOfTwo {
            budget_bytes: 3 * P,
            pages: 3
        }
    );
    let e = PageCache::new(3 * P, Policy::DirectMapped).unwrap_err();
    assert!(e.to_string().contains("3 pages"), "{e}");
    // Remainder bytes are allowed (QEMU divides, then checks the page count).
    let c = PageCache::new(4 * P + 100, Policy::DirectMapped).unwrap();
    assert_eq!((c.capacity_pages(), c.budget_bytes()), (4, 4 * P + 100));
    for ways in [0u16, 257, u16::MAX] {
        assert_eq!(
            PageCache::new(64 * P, Policy::SetAssociative { ways }).unwrap_err(),
            CacheError::InvalidWays { ways, max: 256 }
        );
    }
}

#[test]
fn huge_budgets_are_errors_not_aborts() {
    for policy in [Policy::DirectMapped, Policy::default()] {
        for budget in [u64::MAX, 1 << 63, 1 << 62, 1 << 56] {
            match PageCache::new(budget, policy) {
                Err(CacheError::BudgetTooLarge { budget_bytes, .. }) => {
                    assert_eq!(budget_bytes, budget)
                }
                Err(CacheError::NotPowerOfTwo { .. }) if budget == u64::MAX => {}
                other => panic!("{policy:?} {budget}: {other:?}"),
            }
        }
    }
}
