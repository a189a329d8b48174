//! Criterion benches for `precopy-pagecache`: ns per lookup (hit and miss)
//! and per insert, for each policy, at QEMU's default 64 MiB budget.
//!
//! ```text
//! cargo bench -p precopy-benches --bench pagecache
//! ```
//!
//! Addresses come from a fixed pseudo-random sequence over 4x the cache's
//! page count (so `lookup-mixed` misses about 3 times in 4 once the cache
//! is warm); `lookup-hit` looks up only resident pages. An accepted insert
//! copies one 4 KiB page, so `insert-free-slot` and `insert-replace` are
//! bounded below by a page copy: the `page-copy` row measures that copy
//! alone, in the same run. `insert-refused` is the replacement decision
//! alone (every victim is fresh).
use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput};
use precopy_pagecache::{PAGE_SIZE, Page, PageCache, Policy};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

const BUDGET: u64 = 64 << 20;
const P: u64 = PAGE_SIZE as u64;
const ADDRS: usize = 1 << 16;

fn policies() -> [Policy; 3] {
    [
        Policy::DirectMapped,
        Policy::default(),
        Policy::SetAssociative { ways: 16 },
    ]
}

/// Page addresses spread over 4x the cache's page count.
fn addresses(seed: u64) -> Vec<u64> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let pages = BUDGET / P * 4;
    (0..ADDRS).map(|_| rng.gen_range(0..pages) * P).collect()
}

/// A cache warmed with the address sequence over a few generations.
fn warm(policy: Policy, addrs: &[u64]) -> PageCache {
    let mut cache = PageCache::new(BUDGET, policy).expect("64 MiB cache");
    let page: Page = [0x5a; PAGE_SIZE];
    for generation in 1..=4 {
        for &a in addrs {
            if cache.lookup(a, generation).is_none() {
                let _ = cache.insert(a, &page, generation);
            }
        }
    }
    cache
}

fn bench(c: &mut Criterion) {
    let addrs = addresses(1);
    let page: Page = [0xa5; PAGE_SIZE];

    let mut g = c.benchmark_group("pagecache/lookup-mixed");
    g.throughput(Throughput::Elements(1));
    for policy in policies() {
        let mut cache = warm(policy, &addrs);
        let mut i = 0usize;
        g.bench_function(policy.to_string(), |b| {
            b.iter(|| {
                i = (i + 1) % ADDRS;
                black_box(cache.lookup(black_box(addrs[i]), 5).is_some())
            })
        });
    }
    g.finish();

    // Hits only; the page itself is not read (that is the encoder's cost).
    let mut g = c.benchmark_group("pagecache/lookup-hit");
    g.throughput(Throughput::Elements(1));
    for policy in policies() {
        let mut cache = warm(policy, &addrs);
        let resident = resident(&cache, &addrs);
        let mut i = 0usize;
        g.bench_function(policy.to_string(), |b| {
            b.iter(|| {
                i = (i + 1) % resident.len();
                black_box(cache.lookup(black_box(resident[i]), 5).map(|p| p.as_ptr()))
            })
        });
    }
    g.finish();

    // Insert into a free slot (one 4 KiB copy): consecutive pages fill every
    // slot of both policies exactly; a full cache is cleared (amortised).
    let mut g = c.benchmark_group("pagecache/insert-free-slot");
    g.throughput(Throughput::Bytes(P));
    for policy in policies() {
        let mut cache = PageCache::new(BUDGET, policy).expect("64 MiB cache");
        let pages = cache.capacity_pages() as u64;
        let mut pn = 0u64;
        g.bench_function(policy.to_string(), |b| {
            b.iter(|| {
                if pn == pages {
                    pn = 0;
                    cache.clear();
                }
                let r = cache.insert(black_box(pn * P), &page, 1);
                pn += 1;
                black_box(r)
            })
        });
        assert_eq!(cache.stats().refused_inserts, 0, "{policy}");
    }
    // The physical floor of an insert: copying one page into a 64 MiB pool.
    let mut pool = vec![[0u8; PAGE_SIZE]; (BUDGET / P) as usize];
    let mut i = 0usize;
    g.bench_function("page-copy", |b| {
        b.iter(|| {
            i = (i + 1) % pool.len();
            pool[i].copy_from_slice(black_box(&page));
        })
    });
    g.finish();

    // Insert over a resident page (QEMU: a zero page that is sent).
    let mut g = c.benchmark_group("pagecache/insert-replace");
    g.throughput(Throughput::Bytes(P));
    for policy in policies() {
        let mut cache = warm(policy, &addrs);
        let resident = resident(&cache, &addrs);
        let mut i = 0usize;
        g.bench_function(policy.to_string(), |b| {
            b.iter(|| {
                i = (i + 1) % resident.len();
                black_box(cache.insert(black_box(resident[i]), &page, 5))
            })
        });
    }
    g.finish();

    // Refused inserts (the set's pages are fresh): the decision alone.
    let mut g = c.benchmark_group("pagecache/insert-refused");
    g.throughput(Throughput::Elements(1));
    for policy in policies() {
        let mut cache = warm(policy, &addrs);
        let absent: Vec<u64> = (0..ADDRS as u64)
            .map(|k| (BUDGET / P * 8 + k) * P)
            .filter(|&a| !cache.contains(a))
            .collect();
        let mut i = 0usize;
        g.bench_function(policy.to_string(), |b| {
            b.iter(|| {
                i = (i + 1) % absent.len();
                black_box(cache.insert(black_box(absent[i]), &page, 4))
            })
        });
        assert_eq!(
            cache.stats().evictions,
            warm(policy, &addrs).stats().evictions
        );
    }
    g.finish();

    let mut g = c.benchmark_group("pagecache/new-64MiB");
    g.sample_size(10);
    for policy in policies() {
        g.bench_function(policy.to_string(), |b| {
            b.iter_batched(
                || (),
                |()| black_box(PageCache::new(BUDGET, policy).map(|c| c.capacity_pages())),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

// criterion_main! would generate undocumented public items; this is the same.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}

/// The addresses of `addrs` that `cache` holds.
fn resident(cache: &PageCache, addrs: &[u64]) -> Vec<u64> {
    addrs
        .iter()
        .copied()
        .filter(|&a| cache.contains(a))
        .collect()
}
