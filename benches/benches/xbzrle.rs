//! Criterion benches for `xbzrle`: groups `encode`, `encode_and_update`,
//! `decode` and `is_zero`, one id per backend × workload, throughput in bytes
//! of page (4096 per page or page pair), over a hot set of 64 pairs
//! (512 KiB). Generators in `precopy_benches`. Compare runs with
//! `cargo bench -p precopy-benches --bench xbzrle -- --save-baseline NAME`
//! and `--baseline NAME`.
// criterion_group!/criterion_main! generate undocumented public functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use precopy_benches::{
    PAGE_SIZE, Page, QemuPair, QemuPairs, Workload, pair, rng, word_loop_encode,
};
use xbzrle::{Backend, Codec};

const PAIRS: usize = 64;

/// The real QEMU pairs, loaded once; `None` (one `SKIPPED` line) without
/// the vectors, so the `qemu` rows are left out.
fn qemu_pairs() -> Option<&'static [QemuPair]> {
    static Q: OnceLock<Option<Vec<QemuPair>>> = OnceLock::new();
    Q.get_or_init(|| QemuPairs::load_or_skip("xbzrle bench, workload qemu"))
        .as_deref()
}

/// The hot set of `w`; `None` for `Qemu` without the vectors.
fn pairs(w: Workload) -> Option<Vec<(Box<Page>, Box<Page>)>> {
    if w == Workload::Qemu {
        let q = qemu_pairs()?;
        return Some(
            (0..PAIRS)
                .map(|k| {
                    let p = &q[(k * 7919) % q.len()];
                    (p.old.clone(), p.new.clone())
                })
                .collect(),
        );
    }
    let mut r = rng(w as u64 + 1);
    Some((0..PAIRS).map(|_| pair(w, &mut r)).collect())
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for w in Workload::ALL {
        let Some(ps) = pairs(w) else { continue };
        let mut out = vec![0u8; PAGE_SIZE];
        for b in Backend::available() {
            let codec = Codec::with_backend(b).expect("available");
            g.bench_function(BenchmarkId::new(b.name(), w.name()), |bench| {
                let mut k = 0;
                bench.iter(|| {
                    k = (k + 1) % PAIRS;
                    black_box(codec.encode(&ps[k].0, &ps[k].1, &mut out)).ok()
                })
            });
        }
        g.bench_function(BenchmarkId::new("word-loop", w.name()), |bench| {
            let mut k = 0;
            bench.iter(|| {
                k = (k + 1) % PAIRS;
                black_box(word_loop_encode(&ps[k].0, &ps[k].1, &mut out)).ok()
            })
        });
    }
    g.finish();
}

fn encode_and_update(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_and_update");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for w in [Workload::Sparse8, Workload::Words25, Workload::Qemu] {
        let Some(ps) = pairs(w) else { continue };
        let mut out = vec![0u8; PAGE_SIZE];
        for b in Backend::available() {
            let codec = Codec::with_backend(b).expect("available");
            let mut caches: Vec<Page> = ps.iter().map(|p| *p.0).collect();
            g.bench_function(BenchmarkId::new(b.name(), w.name()), |bench| {
                let mut k = 0;
                bench.iter(|| {
                    k = (k + 1) % PAIRS;
                    // alternate directions so every call has work to do
                    let target = if caches[k] == *ps[k].1 {
                        &ps[k].0
                    } else {
                        &ps[k].1
                    };
                    black_box(codec.encode_and_update(&mut caches[k], target, &mut out)).ok()
                })
            });
        }
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for w in Workload::ALL.into_iter().filter(|w| !w.overflows()) {
        let Some(ps) = pairs(w) else { continue };
        let mut out = vec![0u8; PAGE_SIZE];
        let deltas: Vec<Vec<u8>> = ps
            .iter()
            .map(|(o, n)| {
                let len = xbzrle::encode(o, n, &mut out).expect("fits");
                out[..len].to_vec()
            })
            .collect();
        let mut dest: Vec<Page> = ps.iter().map(|p| *p.0).collect();
        g.bench_function(BenchmarkId::new("scalar", w.name()), |bench| {
            let mut k = 0;
            bench.iter(|| {
                k = (k + 1) % PAIRS;
                black_box(xbzrle::decode(&deltas[k], &mut dest[k])).ok()
            })
        });
        g.bench_function(BenchmarkId::new("page-copy", w.name()), |bench| {
            let mut k = 0;
            bench.iter(|| {
                k = (k + 1) % PAIRS;
                dest[k].copy_from_slice(black_box(&ps[k].1[..]));
            })
        });
    }
    g.finish();
}

fn is_zero(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_zero");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let mut r = rng(9);
    let nonzero: Vec<Page> = (0..PAIRS)
        .map(|_| *pair(Workload::Random, &mut r).1)
        .collect();
    let zero: Vec<Page> = vec![[0u8; PAGE_SIZE]; PAIRS];
    for (name, pages) in [("zero", &zero), ("nonzero", &nonzero)] {
        for b in Backend::available() {
            let codec = Codec::with_backend(b).expect("available");
            g.bench_function(BenchmarkId::new(b.name(), name), |bench| {
                let mut k = 0;
                bench.iter(|| {
                    k = (k + 1) % PAIRS;
                    codec.is_zero(black_box(&pages[k]))
                })
            });
        }
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = encode, encode_and_update, decode, is_zero
}
criterion_main!(benches);
