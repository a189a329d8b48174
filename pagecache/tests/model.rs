//! Model tests: random sequences of lookup / insert / resize / clear
//! against a reference model, for every policy.
//!
//! For every policy the cache may drop pages, but whatever it returns must
//! be the last data written for that address (by an insert or through the
//! mutable reference of a lookup hit). For `DirectMapped` a second model,
//! written from QEMU's rules, must agree on every hit, miss and refusal.

use std::collections::HashMap;

use precopy_pagecache::{Insert, PAGE_SIZE, Page, PageCache, Policy};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE as u64;

#[derive(Clone, Debug)]
enum Op {
    /// Look up address `addr`; on a hit, optionally overwrite the copy.
    Lookup {
        addr: u64,
        write: bool,
    },
    Insert {
        addr: u64,
    },
    Resize {
        pages: u64,
        extra: u64,
    },
    Clear,
    /// Advance the generation (dirty-bitmap sync).
    Sync {
        by: u64,
    },
}

/// Addresses: a small pool of pages (collisions), with low bits sometimes
/// set, plus a few far-away pages.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => (0u64..48, 0u64..P).prop_map(|(pn, low)| pn * P + if low % 4 == 0 { low } else { 0 }),
        1 => (0u64..4).prop_map(|k| u64::MAX - k * 1000 * P),
        1 => (0u64..8).prop_map(|k| (1 << 40) + k * (1 << 30)),
    ]
}

fn op(max_pages: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (addr(), any::<bool>()).prop_map(|(addr, write)| Op::Lookup { addr, write }),
        10 => addr().prop_map(|addr| Op::Insert { addr }),
        1 => (0..=max_pages, prop_oneof![3 => Just(0u64), 1 => 0..P]).prop_map(|(pages, extra)| Op::Resize { pages, extra }),
        1 => Just(Op::Clear),
        4 => prop_oneof![4 => Just(1u64), 1 => Just(0u64), 1 => 2u64..5].prop_map(|by| Op::Sync { by }),
    ]
}

/// A page whose every 8-byte word is `id`.
fn page_of(id: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for w in p.chunks_exact_mut(8) {
        w.copy_from_slice(&id.to_le_bytes());
    }
    p
}

/// QEMU's direct-mapped cache, written from the rules in page_cache.c:
/// slot = page number mod slots; hit refreshes the age; insert refused over
/// another page whose age + 2 > generation. Resize as this crate defines it
/// (most recent first, by age; ties by old slot order).
struct QemuModel {
    slots: Vec<Option<(u64, u64)>>, // (page number, age)
}

impl QemuModel {
    fn new(pages: usize) -> Self {
        QemuModel {
            slots: vec![None; pages],
        }
    }
    fn slot(&self, pn: u64) -> usize {
        (pn % self.slots.len() as u64) as usize
    }
    fn lookup(&mut self, pn: u64, g: u64) -> bool {
        let i = self.slot(pn);
        match &mut self.slots[i] {
            Some((p, age)) if *p == pn => {
                *age = g;
                true
            }
            _ => false,
        }
    }
    fn insert(&mut self, pn: u64, g: u64) -> Insert {
        let i = self.slot(pn);
        match self.slots[i] {
            Some((p, _)) if p == pn => {
                self.slots[i] = Some((pn, g));
                Insert::Replaced
            }
            Some((_, age)) if age.wrapping_add(2) > g => Insert::Refused,
            _ => {
                self.slots[i] = Some((pn, g));
                Insert::Inserted
            }
        }
    }
    fn resize(&mut self, pages: usize) {
        let mut old: Vec<(usize, (u64, u64))> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
            .collect();
        old.sort_by_key(|&(i, (_, age))| (std::cmp::Reverse(age), i));
        self.slots = vec![None; pages];
        for (_, (pn, age)) in old {
            let i = self.slot(pn);
            if self.slots[i].is_none() {
                self.slots[i] = Some((pn, age));
            }
        }
    }
}

fn run(policy: Policy, initial_pages: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let valid = |pages: u64| match policy {
        Policy::DirectMapped => pages.is_power_of_two(),
        _ => pages >= 1,
    };
    let mut cache = PageCache::new(initial_pages * P, policy).unwrap();
    let mut qemu =
        matches!(policy, Policy::DirectMapped).then(|| QemuModel::new(initial_pages as usize));
    // Last data written per page number (ids), whether or not it stayed.
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut next_id = 1u64;
    let mut generation = 1u64;
    for op in ops {
        match op {
            Op::Lookup { addr, write } => {
                let pn = addr / P;
                let expect = qemu.as_mut().map(|q| q.lookup(pn, generation));
                let was = cache.contains(addr);
                let got = cache.lookup(addr, generation);
                prop_assert_eq!(got.is_some(), was, "lookup disagrees with contains");
                if let Some(e) = expect {
                    prop_assert_eq!(
                        got.is_some(),
                        e,
                        "QEMU model disagrees on lookup {:#x}",
                        addr
                    );
                }
                if let Some(page) = got {
                    let want = last.get(&pn).copied();
                    prop_assert_eq!(
                        Some(*page),
                        want.map(page_of),
                        "stale or foreign data for {:#x}",
                        addr
                    );
                    if write {
                        *page = page_of(next_id);
                        last.insert(pn, next_id);
                        next_id += 1;
                    }
                }
            }
            Op::Insert { addr } => {
                let pn = addr / P;
                let was = cache.contains(addr);
                let r = cache.insert(addr, &page_of(next_id), generation);
                last.insert(pn, next_id);
                next_id += 1;
                if let Some(q) = qemu.as_mut() {
                    prop_assert_eq!(
                        r,
                        q.insert(pn, generation),
                        "QEMU model disagrees on insert {:#x}",
                        addr
                    );
                }
                prop_assert_eq!(r == Insert::Replaced, was);
                prop_assert_eq!(cache.contains(addr), r.is_resident());
                if r.is_resident() {
                    prop_assert_eq!(cache.peek(addr).copied(), Some(page_of(last[&pn])));
                }
            }
            Op::Resize { pages, extra } => {
                let before: Vec<u64> = last
                    .keys()
                    .copied()
                    .filter(|&pn| cache.contains(pn * P))
                    .collect();
                let old_pages = cache.budget_bytes() / P;
                let old_stats = cache.stats();
                let r = cache.resize(pages * P + extra);
                if valid(pages) {
                    prop_assert!(r.is_ok(), "{:?}", r);
                    if let Some(q) = qemu.as_mut()
                        && pages != old_pages
                    {
                        q.resize(pages as usize);
                    }
                    if pages >= old_pages {
                        for &pn in &before {
                            prop_assert!(cache.contains(pn * P), "grow lost page {}", pn);
                        }
                    }
                    if pages == old_pages {
                        prop_assert_eq!(cache.stats(), old_stats);
                    }
                    prop_assert_eq!(cache.budget_bytes(), pages * P + extra);
                } else {
                    prop_assert!(r.is_err());
                    let after: Vec<u64> = last
                        .keys()
                        .copied()
                        .filter(|&pn| cache.contains(pn * P))
                        .collect();
                    prop_assert_eq!(&before, &after, "failed resize changed the cache");
                    prop_assert_eq!(cache.budget_bytes() / P, old_pages);
                }
            }
            Op::Clear => {
                cache.clear();
                prop_assert!(cache.is_empty());
                if let Some(q) = qemu.as_mut() {
                    q.slots.fill(None);
                }
            }
            Op::Sync { by } => generation += by,
        }
        // Invariants after every step.
        let s = cache.stats();
        prop_assert!(cache.len() <= cache.capacity_pages());
        prop_assert!(cache.capacity_pages() as u64 <= cache.budget_bytes() / P);
        prop_assert_eq!(cache.capacity_pages(), cache.sets() * cache.ways());
        prop_assert_eq!(s.lookups, s.hits + s.misses);
        prop_assert_eq!(s.resident_pages, cache.len() as u64);
        prop_assert_eq!(s.bytes, cache.len() as u64 * P);
        // Every resident page holds its last data.
        for (&pn, &id) in &last {
            if let Some(p) = cache.peek(pn * P) {
                prop_assert_eq!(*p, page_of(id), "page {} holds foreign data", pn);
            }
        }
        if let Some(q) = &qemu {
            let resident = q.slots.iter().filter(|s| s.is_some()).count();
            prop_assert_eq!(resident, cache.len());
        }
    }
    Ok(())
}

proptest! {
    // 256 cases by default; CI raises it with PROPTEST_CASES.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn direct_mapped_matches_qemu_and_model(
        shift in 0u32..5,
        ops in proptest::collection::vec(op(20), 1..300),
    ) {
        run(Policy::DirectMapped, 1 << shift, ops)?;
    }

    #[test]
    fn set_associative_matches_model(
        ways in prop_oneof![Just(1u16), Just(2), Just(3), Just(4), Just(16)],
        pages in 1u64..40,
        ops in proptest::collection::vec(op(40), 1..300),
    ) {
        run(Policy::SetAssociative { ways }, pages, ops)?;
    }

    #[test]
    fn default_policy_matches_model(
        pages in 1u64..40,
        ops in proptest::collection::vec(op(40), 1..300),
    ) {
        run(Policy::default(), pages, ops)?;
    }
}
