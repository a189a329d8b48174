//! `limits`: the XBZRLE codec against the physical limit, measured in the
//! same run.
//!
//! `cargo run --release -p precopy-benches --bin limits [-- --quick]`
//!
//! Prints one JSON line per row on stdout:
//! `{"op": "encode"|"decode"|"is_zero", "backend": NAME, "workload": W,
//!   "cache": "hot"|"cold", "ns_per_page": X, "limit_ns": Y, "ratio": X/Y}`.
//!
//! * encode: every available backend plus `word-loop` (a plain
//!   8-bytes-at-a-time encoder, the baseline of the portable backend), into
//!   a 4096-byte buffer (QEMU's policy); limit = the fastest read of the
//!   old and new page (8 KiB, AVX-512 / AVX2 OR-fold).
//! * decode (one portable implementation, `scalar`); limit = a 4 KiB page
//!   copy onto the same destination page.
//! * is_zero: every backend; limit = the fastest read of 4 KiB.
//!
//! `hot`: a working set of about 1 MiB, cycled. `cold`: a 1 GiB arena of
//! pages visited in a random permutation, so a page comes back only after
//! 1 GiB of other traffic (this CPU's L3 is 260 MiB); decode deltas come
//! from a small hot pool, as freshly received data would. Each number is the
//! median over repetitions; limit and operation alternate short
//! repetitions (32 pages cold) so machine noise, such as other processes
//! competing for DRAM bandwidth, hits both alike.
//!
//! `LIMITS_FILTER=encode/avx512bw` runs only the rows whose
//! `op/backend/workload/cache` contains the string.

use std::hint::black_box;
use std::time::Instant;

use precopy_benches::{
    BenchRng, PAGE_SIZE, Page, QemuPair, QemuPairs, Workload, fill_random, make_new, page_arena,
    read_fold, read_kernel_name, rng, word_loop_encode,
};
use rand::seq::SliceRandom;
use xbzrle::{Backend, Codec};

/// Pairs in the hot set (2 pages each: 1 MiB).
const HOT_PAIRS: usize = 128;
/// Pages in the cold arena (1 GiB).
const COLD_PAGES: usize = 1 << 18;

struct Cfg {
    reps_hot: usize,
    reps_cold: usize,
    chunk_cold: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `LIMITS_FILTER` (a substring of `op/backend/workload/cache`): run only
/// matching rows, e.g. `encode/avx512bw/words25`.
fn wanted(op: &str, backend: &str, workload: &str, cache: &str) -> bool {
    match std::env::var("LIMITS_FILTER") {
        Ok(f) => format!("{op}/{backend}/{workload}/{cache}").contains(&f),
        Err(_) => true,
    }
}

fn row(op: &str, backend: &str, workload: &str, cache: &str, ns: f64, limit: f64) {
    // Fields in the documented order (serde_json's map would sort them).
    let r = format!(
        "{{\"op\": {}, \"backend\": {}, \"workload\": {}, \"cache\": {}, \"ns_per_page\": {}, \"limit_ns\": {}, \"ratio\": {}}}",
        serde_json::Value::from(op),
        serde_json::Value::from(backend),
        serde_json::Value::from(workload),
        serde_json::Value::from(cache),
        serde_json::Value::from((ns * 10.0).round() / 10.0),
        serde_json::Value::from((limit * 10.0).round() / 10.0),
        serde_json::Value::from((ns / limit * 1000.0).round() / 1000.0),
    );
    if wanted(op, backend, workload, cache) {
        println!("{r}");
    }
}

/// ns per call of `f(i)` for `i` in `items`.
fn per_item(items: &[usize], mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for &i in items {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / items.len() as f64
}

/// Alternates `limit` and `op` over `reps` repetitions, each over the
/// index list `next()` gives; returns (median op ns, median limit ns).
fn measure(
    want: bool,
    reps: usize,
    mut next: impl FnMut() -> Vec<usize>,
    mut limit: impl FnMut(usize),
    mut op: impl FnMut(usize),
) -> (f64, f64) {
    let (mut lt, mut ot) = (vec![f64::NAN], vec![f64::NAN]);
    if want {
        lt.clear();
        ot.clear();
    }
    for _ in 0..if want { reps } else { 0 } {
        lt.push(per_item(&next(), &mut limit));
        ot.push(per_item(&next(), &mut op));
    }
    if want && std::env::var_os("LIMITS_DEBUG").is_some() {
        let q = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            let n = v.len();
            format!(
                "min {:.0} p25 {:.0} p50 {:.0} p75 {:.0} max {:.0}",
                v[0],
                v[n / 4],
                v[n / 2],
                v[3 * n / 4],
                v[n - 1]
            )
        };
        eprintln!("  op    {}\n  limit {}", q(ot.clone()), q(lt.clone()));
    }
    (median(ot), median(lt))
}

/// A cyclic walk over a random permutation of `0..n`.
struct Walk {
    perm: Vec<usize>,
    pos: usize,
}

impl Walk {
    fn new(n: usize, rng: &mut BenchRng) -> Walk {
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(rng);
        Walk { perm, pos: 0 }
    }
    fn take(&mut self, k: usize) -> Vec<usize> {
        let mut v = Vec::with_capacity(k);
        for _ in 0..k {
            v.push(self.perm[self.pos]);
            self.pos = (self.pos + 1) % self.perm.len();
        }
        v
    }
}

type Encoder = Box<dyn Fn(&Page, &Page, &mut [u8]) -> Result<usize, xbzrle::EncodeError>>;

fn encoders() -> Vec<(&'static str, Encoder)> {
    let mut v: Vec<(&'static str, Encoder)> = Backend::available()
        .map(|b| {
            let c = Codec::with_backend(b).expect("available");
            (
                b.name(),
                Box::new(move |o: &Page, n: &Page, out: &mut [u8]| c.encode(o, n, out)) as Encoder,
            )
        })
        .collect();
    v.push(("word-loop", Box::new(word_loop_encode)));
    v
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        Cfg {
            reps_hot: 11,
            reps_cold: 41,
            chunk_cold: 32,
        }
    } else {
        Cfg {
            reps_hot: 101,
            reps_cold: 401,
            chunk_cold: 32,
        }
    };
    let start = Instant::now();
    let mut r = rng(0x5eed);
    eprintln!(
        "limits: backends {:?}, best {}, read kernel {}, hot {} KiB, cold {} MiB{}",
        Backend::available().map(|b| b.name()).collect::<Vec<_>>(),
        Backend::best().name(),
        read_kernel_name(),
        HOT_PAIRS * 2 * PAGE_SIZE / 1024,
        (COLD_PAGES * PAGE_SIZE) >> 20,
        if quick { " (quick)" } else { "" }
    );
    // Without the QEMU vectors the `qemu` rows are left out (one SKIPPED line).
    let qemu: Vec<QemuPair> =
        QemuPairs::load_or_skip("limits, workload qemu (encode and decode rows)")
            .unwrap_or_default();
    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|&w| w != Workload::Qemu || !qemu.is_empty())
        .collect();
    let encs = encoders();
    let mut arena = page_arena(COLD_PAGES, &mut r);
    let mut out = vec![0u8; PAGE_SIZE];
    let mut hot: Vec<Page> = vec![[0u8; PAGE_SIZE]; 2 * HOT_PAIRS];
    let mut summary: Vec<(String, f64)> = Vec::new();

    // Fill pairs (2k, 2k+1) of `pages` with workload `w`.
    let fill = |pages: &mut [Page], w: Workload, r: &mut BenchRng| {
        for (k, pair) in pages.chunks_exact_mut(2).enumerate() {
            let [old, new] = pair else { unreachable!() };
            if w == Workload::Qemu {
                let q = &qemu[(k * 7919) % qemu.len()];
                old.copy_from_slice(&q.old[..]);
                new.copy_from_slice(&q.new[..]);
            } else {
                fill_random(r, &mut old[..]);
                make_new(w, r, old, new);
            }
        }
    };

    // ---- encode ----
    for &w in &workloads {
        fill(&mut hot, w, &mut r);
        fill(&mut arena, w, &mut r);
        // evict what the fill left in the caches
        black_box(read_fold(
            &arena[..COLD_PAGES / 2]
                .iter()
                .map(|p| &p[..])
                .collect::<Vec<_>>(),
        ));
        let hot_idx: Vec<usize> = (0..HOT_PAIRS).collect();
        let mut walk = Walk::new(COLD_PAGES / 2, &mut r);
        for (name, enc) in &encs {
            let (ns, lim) = measure(
                wanted("encode", name, w.name(), "hot"),
                cfg.reps_hot,
                || hot_idx.clone(),
                |k| {
                    black_box(read_fold(&[&hot[2 * k], &hot[2 * k + 1]]));
                },
                |k| {
                    black_box(enc(&hot[2 * k], &hot[2 * k + 1], &mut out)).ok();
                },
            );
            row("encode", name, w.name(), "hot", ns, lim);
            summary.push((format!("encode {} {} hot", name, w.name()), ns));
            let (ns, lim) = measure(
                wanted("encode", name, w.name(), "cold"),
                cfg.reps_cold,
                || walk.take(cfg.chunk_cold),
                |k| {
                    black_box(read_fold(&[&arena[2 * k], &arena[2 * k + 1]]));
                },
                |k| {
                    black_box(enc(&arena[2 * k], &arena[2 * k + 1], &mut out)).ok();
                },
            );
            row("encode", name, w.name(), "cold", ns, lim);
        }
    }

    // ---- decode ----
    let scalar_best = Codec::new();
    for w in workloads.iter().copied().filter(|w| !w.overflows()) {
        fill(&mut hot, w, &mut r);
        let deltas: Vec<Vec<u8>> = (0..HOT_PAIRS)
            .map(|k| {
                let n = scalar_best
                    .encode(&hot[2 * k], &hot[2 * k + 1], &mut out)
                    .expect("fits");
                out[..n].to_vec()
            })
            .collect();
        let news: Vec<Page> = (0..HOT_PAIRS).map(|k| hot[2 * k + 1]).collect();
        let mut dest: Vec<Page> = (0..HOT_PAIRS).map(|k| hot[2 * k]).collect();
        let hot_idx: Vec<usize> = (0..HOT_PAIRS).collect();
        let dest_cell = std::cell::RefCell::new(&mut dest);
        let (ns, lim) = measure(
            wanted("decode", "scalar", w.name(), "hot"),
            cfg.reps_hot,
            || hot_idx.clone(),
            |k| {
                dest_cell.borrow_mut()[k].copy_from_slice(black_box(&news[k]));
            },
            |k| {
                black_box(xbzrle::decode(&deltas[k], &mut dest_cell.borrow_mut()[k])).ok();
            },
        );
        row("decode", "scalar", w.name(), "hot", ns, lim);
        summary.push((format!("decode {} hot", w.name()), ns));
        // cold: destination pages anywhere in the arena, deltas from the hot pool
        let mut walk = Walk::new(COLD_PAGES, &mut r);
        let arena_cell = std::cell::RefCell::new(&mut arena);
        let (ns, lim) = measure(
            wanted("decode", "scalar", w.name(), "cold"),
            cfg.reps_cold,
            || walk.take(cfg.chunk_cold),
            |p| {
                arena_cell.borrow_mut()[p].copy_from_slice(black_box(&news[p % HOT_PAIRS]));
            },
            |p| {
                black_box(xbzrle::decode(
                    &deltas[p % HOT_PAIRS],
                    &mut arena_cell.borrow_mut()[p],
                ))
                .ok();
            },
        );
        row("decode", "scalar", w.name(), "cold", ns, lim);
    }

    // ---- is_zero ----
    for (wname, zero) in [("nonzero", false), ("zero", true)] {
        let mut hot_pages: Vec<Page> = vec![[0u8; PAGE_SIZE]; 2 * HOT_PAIRS];
        for p in hot_pages.iter_mut().chain(arena.iter_mut()) {
            if zero {
                p.fill(0);
            } else {
                fill_random(&mut r, &mut p[..]);
            }
        }
        black_box(&mut arena);
        let hot_idx: Vec<usize> = (0..2 * HOT_PAIRS).collect();
        let mut walk = Walk::new(COLD_PAGES, &mut r);
        for b in Backend::available() {
            let c = Codec::with_backend(b).expect("available");
            let (ns, lim) = measure(
                wanted("is_zero", b.name(), wname, "hot"),
                cfg.reps_hot,
                || hot_idx.clone(),
                |k| {
                    black_box(read_fold(&[&hot_pages[k]]));
                },
                |k| {
                    black_box(c.is_zero(black_box(&hot_pages[k])));
                },
            );
            row("is_zero", b.name(), wname, "hot", ns, lim);
            let (ns, lim) = measure(
                wanted("is_zero", b.name(), wname, "cold"),
                cfg.reps_cold,
                || walk.take(cfg.chunk_cold),
                |k| {
                    black_box(read_fold(&[&arena[k]]));
                },
                |k| {
                    black_box(c.is_zero(black_box(&arena[k])));
                },
            );
            row("is_zero", b.name(), wname, "cold", ns, lim);
        }
    }

    let get = |k: &str| summary.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    if let (Some(s), Some(p)) = (
        get("encode scalar words25 hot"),
        get("encode word-loop words25 hot"),
    ) && s > 0.0
        && p.is_finite()
        && s.is_finite()
    {
        eprintln!(
            "limits: scalar vs word-loop on words25 (hot): {:.2}x faster",
            p / s
        );
    }
    eprintln!("limits: done in {:.1} s", start.elapsed().as_secs_f64());
}
