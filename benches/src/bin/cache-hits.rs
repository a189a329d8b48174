//! Hit rate of every XBZRLE cache policy on real and synthetic page traces.
//!
//! ```text
//! cargo run --release -p precopy-benches --bin cache-hits [-- --trace FILE]...
//! ```
//!
//! Prints one JSON line per (trace, policy, budget) row on stdout:
//! `{"trace", "policy", "default", "budget_fraction", "hit_rate", ...}` and a
//! readable table on stderr. Budgets are 1/8, 1/4 and 1/2 of the trace's
//! working set (distinct pages looked up), rounded down to a power of two
//! pages so that QEMU's direct-mapped policy accepts them; every policy gets
//! the same bytes. The replay (which events are lookups, inserts, zero-page
//! updates) is `precopy_pagecache::replay`, documented there.
//!
//! Traces:
//! * `qemu-7.2`: the page sequence of a real QEMU 7.2 XBZRLE migration
//!   (`page-trace.txt` in the shared QEMU vectors, located by
//!   `precopy_testsupport`: `$PRECOPY_VECTORS` or `../shared/qemu-vectors`
//!   next to the workspace). QEMU's own cache there was 16 MiB for 128 MiB
//!   of RAM. Without the vectors its rows and its check are skipped with a
//!   `SKIPPED` line (a failure under `PRECOPY_REQUIRE_VECTORS=1`).
//! * `zipf`: each pass dirties pages drawn from a Zipf(1.0) hot set scattered
//!   over 1 GiB.
//! * `scan`: each pass rewrites one contiguous region, larger than every cache.
//! * `mix`: the zipf hot set plus a scan of a separate region in every pass.
//!
//! `--check` exits with an error if the default policy has fewer hits than
//! direct-mapped on any row (CI runs it). `--trace FILE` (repeatable) adds rows for any file in the page-trace
//! format, named by its path. `--dump DIR` writes the synthetic traces there
//! (as `zipf.txt`, ...) in that format and exits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use precopy_pagecache::replay::{Event, Kind, PageTrace, replay};
use precopy_pagecache::{PAGE_SIZE, PageCache, Policy};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

const FRACTIONS: [f64; 3] = [0.125, 0.25, 0.5];
const P: u64 = PAGE_SIZE as u64;

/// Every policy measured; always includes `Policy::default()`.
fn policies() -> Vec<Policy> {
    let mut v = vec![
        Policy::DirectMapped,
        Policy::SetAssociative { ways: 1 },
        Policy::SetAssociative { ways: 2 },
        Policy::SetAssociative { ways: 4 },
        Policy::SetAssociative { ways: 8 },
        Policy::SetAssociative { ways: 16 },
    ];
    if !v.contains(&Policy::default()) {
        v.push(Policy::default());
    }
    v
}

fn load(path: &Path) -> Result<PageTrace, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cache-hits: reading {}: {e}", path.display()))?;
    PageTrace::parse(&text).map_err(|e| format!("cache-hits: {}: {e}", path.display()))
}

/// Inverse-CDF sampler of Zipf(s) over ranks 0..n.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.r#gen();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// RAM of the synthetic guests: 1 GiB.
const RAM_PAGES: u64 = 1 << 18;
/// Passes after the first one.
const PASSES: usize = 24;

/// First pass: every page of RAM whole (zero pages are irrelevant: cache off).
fn first_pass(events: &mut Vec<Event>) {
    events.extend((0..RAM_PAGES).map(|pn| Event::Send {
        kind: Kind::Page,
        addr: pn * P,
    }));
}

/// One pass: the dirty pages, sent in address order as a bitmap walk does.
fn pass(events: &mut Vec<Event>, mut dirty: Vec<u64>) {
    dirty.sort_unstable();
    dirty.dedup();
    events.push(Event::Sync);
    events.extend(dirty.into_iter().map(|pn| Event::Send {
        kind: Kind::Xbzrle,
        addr: pn * P,
    }));
}

/// A hot set of `n` pages scattered over RAM, Zipf-distributed writes.
struct HotSet {
    pages: Vec<u64>,
    zipf: Zipf,
}

impl HotSet {
    fn new(n: usize, rng: &mut impl Rng) -> HotSet {
        let mut pages: Vec<u64> = Vec::with_capacity(n);
        // Scattered guest frames, with some contiguity (runs of 1..16 pages),
        // in the lower half of RAM; the scan region lives in the upper half.
        while pages.len() < n {
            let start = rng.gen_range(0..RAM_PAGES / 2);
            let run = rng.gen_range(1..=16u64);
            pages.extend((start..(start + run).min(RAM_PAGES / 2)).take(n - pages.len()));
        }
        HotSet {
            pages,
            zipf: Zipf::new(n, 1.0),
        }
    }

    fn draw(&self, writes: usize, rng: &mut impl Rng) -> Vec<u64> {
        (0..writes)
            .map(|_| self.pages[self.zipf.sample(rng)])
            .collect()
    }
}

const HOT_PAGES: usize = 16384;
const HOT_WRITES: usize = 12000;
const SCAN_PAGES: u64 = 16384;

fn synthetic(name: &str) -> PageTrace {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x5eed_0000 + name.len() as u64);
    let mut events = Vec::new();
    first_pass(&mut events);
    let hot = HotSet::new(HOT_PAGES, &mut rng);
    let scan_base = RAM_PAGES / 2;
    for _ in 0..PASSES {
        let dirty = match name {
            "zipf" => hot.draw(HOT_WRITES, &mut rng),
            "scan" => (scan_base..scan_base + SCAN_PAGES).collect(),
            _ => {
                let mut d = hot.draw(HOT_WRITES / 2, &mut rng);
                d.extend(scan_base..scan_base + SCAN_PAGES / 2);
                d
            }
        };
        pass(&mut events, dirty);
    }
    PageTrace::from_events(events)
}

fn main() -> ExitCode {
    let mut extra = Vec::new();
    let mut dump = None;
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--trace" => match args.next() {
                Some(f) => extra.push(PathBuf::from(f)),
                None => {
                    eprintln!("cache-hits: --trace needs a FILE");
                    return ExitCode::from(2);
                }
            },
            "--check" => check = true,
            "-h" | "--help" => {
                eprintln!("usage: cache-hits [--trace FILE]... [--check] [--dump DIR]");
                return ExitCode::SUCCESS;
            }
            "--dump" => match args.next() {
                Some(d) => dump = Some(PathBuf::from(d)),
                None => {
                    eprintln!("cache-hits: --dump needs a DIR");
                    return ExitCode::from(2);
                }
            },
            // cargo bench / test harness flags
            "--bench" | "--test" => {}
            other => {
                eprintln!(
                    "cache-hits: unknown argument {other:?} (usage: cache-hits [--trace FILE]...)"
                );
                return ExitCode::from(2);
            }
        }
    }
    match run(extra, dump, check) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(extra: Vec<PathBuf>, dump: Option<PathBuf>, check: bool) -> Result<(), String> {
    let mut traces: Vec<(String, PageTrace)> = Vec::new();
    match precopy_testsupport::Vectors::locate() {
        Ok(v) => {
            let qemu = load(&v.path("page-trace.txt"))?;
            qemu_check(&qemu)?;
            traces.push(("qemu-7.2".into(), qemu));
        }
        Err(e) => precopy_testsupport::skip_or_fail("cache-hits, trace qemu-7.2 and its check", &e),
    }
    let synthetic_from = traces.len();
    for name in ["zipf", "scan", "mix"] {
        traces.push((name.into(), synthetic(name)));
    }
    if let Some(dir) = dump {
        for (name, t) in &traces[synthetic_from..] {
            write_trace(&dir.join(format!("{name}.txt")), t)?;
        }
        return Ok(());
    }
    for path in extra {
        let t = load(&path)?;
        traces.push((path.display().to_string(), t));
    }
    let default = Policy::default();
    let mut losses = Vec::new();
    eprintln!(
        "{:<16} {:>8} {:>10} {:>8} | {}",
        "trace",
        "fraction",
        "budget",
        "lookups",
        policies()
            .iter()
            .map(|p| format!("{:>20}", p.to_string()))
            .collect::<String>()
    );
    for (name, trace) in &traces {
        let ws = trace.working_set_pages() as u64;
        for fraction in FRACTIONS {
            let want = ((ws as f64 * fraction) as u64).max(1);
            let pages = 1u64 << (63 - want.leading_zeros());
            let budget = pages * P;
            let mut cells = String::new();
            let mut lookups = 0;
            let (mut dm_hits, mut default_hits) = (0, 0);
            for policy in policies() {
                let mut cache = PageCache::new(budget, policy)
                    .map_err(|e| format!("cache-hits: {policy} at {budget} bytes: {e}"))?;
                let r = replay(trace, &mut cache);
                lookups = r.lookups;
                if policy == Policy::DirectMapped {
                    dm_hits = r.hits;
                }
                if policy == default {
                    default_hits = r.hits;
                }
                // Fields in the documented order (serde_json's map would sort them).
                let row = format!(
                    "{{\"trace\": {}, \"policy\": {}, \"default\": {}, \"budget_fraction\": {}, \
                     \"hit_rate\": {}, \"budget_bytes\": {}, \"working_set_pages\": {}, \
                     \"lookups\": {}, \"hits\": {}}}",
                    serde_json::Value::from(name.as_str()),
                    serde_json::Value::from(policy.to_string()),
                    policy == default,
                    fraction,
                    serde_json::Value::from(r.hit_rate()),
                    budget,
                    ws,
                    r.lookups,
                    r.hits,
                );
                println!("{row}");
                cells.push_str(&format!(
                    "{:>20}",
                    format!(
                        "{:.4}{}",
                        r.hit_rate(),
                        if policy == default { "*" } else { "" }
                    )
                ));
            }
            if default_hits < dm_hits {
                losses.push(format!(
                    "{name} at {fraction}: {default_hits} < {dm_hits} hits"
                ));
            }
            eprintln!(
                "{:<16} {:>8} {:>9}K {:>8} | {cells}",
                truncate(name, 16),
                fraction,
                budget / 1024,
                lookups
            );
        }
    }
    eprintln!(
        "(* = Policy::default(); budget = fraction x working set, rounded down to 2^k pages)"
    );
    if check && !losses.is_empty() {
        return Err(format!(
            "cache-hits --check: the default policy lost to direct-mapped: {}",
            losses.join("; ")
        ));
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        format!("...{}", &s[s.len() - (n - 3)..])
    }
}

/// Replays the real trace with QEMU's own policy and size (16 MiB) and
/// prints the result next to QEMU's counters from the same migration
/// (`query-migrate`: cache-miss 2165; XBZRLE records 9349 + 54 overflows).
fn qemu_check(trace: &PageTrace) -> Result<(), String> {
    for policy in [Policy::DirectMapped, Policy::default()] {
        let mut cache = PageCache::new(16 << 20, policy).map_err(|e| e.to_string())?;
        let r = replay(trace, &mut cache);
        eprintln!(
            "qemu-7.2 at QEMU's 16 MiB, {policy}: {} lookups, {} hits, {} misses",
            r.lookups,
            r.hits,
            r.misses()
        );
    }
    eprintln!(
        "  (QEMU's own counters for that run: 2165 misses; its hits also count 1486 \
         unchanged pages that are absent from the trace)"
    );
    Ok(())
}

/// Writes a trace in the page-trace format (`--dump DIR`), so other tools
/// can replay the synthetic workloads.
fn write_trace(path: &Path, trace: &PageTrace) -> Result<(), String> {
    use std::io::Write;
    let f =
        std::fs::File::create(path).map_err(|e| format!("cache-hits: {}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let mut out = || -> std::io::Result<()> {
        writeln!(w, "# synthetic page trace written by cache-hits")?;
        for e in trace.events() {
            match *e {
                Event::Sync => writeln!(w, "sync")?,
                Event::Send { kind, addr } => {
                    let k = match kind {
                        Kind::Zero => 'z',
                        Kind::Page => 'p',
                        Kind::Xbzrle => 'x',
                    };
                    writeln!(w, "{k} {addr:x}")?
                }
            }
        }
        w.flush()
    };
    out().map_err(|e| format!("cache-hits: {}: {e}", path.display()))
}
