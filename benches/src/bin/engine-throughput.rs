//! `engine-throughput`: GB/s of guest RAM migrated per core by the pre-copy loop, with no
//! bandwidth limit and an in-process sink, next to memcpy bandwidth measured in the same run.
//!
//! Guests (256 MiB by default, so a pass lasts long enough to time on two cores; the
//! XBZRLE cache is sized so every page fits):
//! * `zero-heavy`: every page zero (ZERO records);
//! * `xbzrle-friendly`: random pages, one 8-byte word changed per page per pass (XBZRLE hits,
//!   ~13-byte records);
//! * `random`: every page rewritten with new random data per pass (XBZRLE overflows, PAGE
//!   records).
//!
//! Each migration runs `--passes` passes where a hook ([`precopy_engine::Hooked`]) dirties
//! every page at each dirty-bitmap sync; the time the hook itself spends writing is excluded. The first two passes (bulk
//! stage, then cache fill) are not counted. Each guest runs as one stream and as multifd
//! with 1, 2 and 4 page channels (in-process sinks; GB/s per core divides by the cores the
//! channels can use). Then the XBZRLE-friendly guest again, alternating one stream,
//! `x-parallel-encoding` and multifd with 1 and 2 channels, for the scaling on all cores.
//!
//! `cargo run --release -p precopy-benches --bin engine-throughput [-- --passes N --mib M]`
//! (`--xbzrle-only`: one stream only; `--multifd-only --channels N`: multifd only, for
//! profiling)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use precopy_engine::{
    Capabilities, GuestRam, Hooked, MigrationStatus, Migrator, ParameterUpdate, SimConfig,
    SimGuest, SimWorkload, VcpuControl, block_pages,
};
use rand::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use xbzrle::PAGE_SIZE;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    ZeroHeavy,
    XbzrleFriendly,
    Random,
}

/// Dirties every page of a simulated guest at each sync, for `passes` passes (the sync hook
/// of a [`Hooked`] guest).
struct Dirtier {
    kind: Kind,
    passes: u64,
    rng: Mutex<Xoshiro256PlusPlus>,
    /// (hook entry, hook exit) per sync.
    marks: Mutex<Vec<(Instant, Instant)>>,
}

impl Dirtier {
    fn dirty_all(&self, g: &SimGuest) {
        let mut rng = self.rng.lock().unwrap();
        let pages = block_pages(&g.blocks()[0]);
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..pages {
            match self.kind {
                Kind::ZeroHeavy => {}
                Kind::XbzrleFriendly => {
                    g.read_page(0, p, &mut page).unwrap();
                    let w = (rng.next_u32() as usize % (PAGE_SIZE / 8)) * 8;
                    page[w..w + 8].copy_from_slice(&(rng.next_u64() | 1).to_le_bytes());
                }
                Kind::Random => rng.fill_bytes(&mut page),
            }
            g.write_page(0, p, &page).unwrap();
        }
    }

    /// At sync `n`: sync 1 is setup; dirty everything at the end of passes 1..passes-1.
    fn on_sync(&self, g: &SimGuest, n: u64) {
        let t0 = Instant::now();
        if (2..=self.passes).contains(&n) && g.is_running() {
            self.dirty_all(g);
        }
        self.marks.lock().unwrap().push((t0, Instant::now()));
    }
}

struct Result1 {
    gbps: f64,
    wire_ratio: f64,
}

/// How the pages leave: one stream, one stream with `x-parallel-encoding`, or multifd with
/// that many page channels (each an in-process sink).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Single,
    Parallel,
    Multifd(usize),
}

fn run(kind: Kind, mib: u64, passes: u64, mode: Mode) -> Result1 {
    let inner = SimGuest::new(SimConfig {
        blocks: vec![("pc.ram".into(), mib << 20)],
        workload: SimWorkload::Sparse,
        dirty_rate: 0,
        vcpus: 1,
        seed: 42,
        initial_zero_percent: if kind == Kind::ZeroHeavy { 100 } else { 0 },
    })
    .expect("guest");
    let dirtier = Arc::new(Dirtier {
        kind,
        passes,
        rng: Mutex::new(Xoshiro256PlusPlus::seed_from_u64(7)),
        marks: Mutex::new(Vec::new()),
    });
    let d = dirtier.clone();
    let guest = Hooked::new(Arc::new(inner)).on_sync(move |g, n| d.on_sync(g, n));
    let m = Migrator::new(Arc::new(guest));
    m.set_capabilities(Capabilities {
        xbzrle: true,
        auto_converge: false,
        x_parallel_encoding: mode == Mode::Parallel,
        multifd: false,
    })
    .unwrap();
    m.set_parameters(&ParameterUpdate {
        max_bandwidth: Some(0),
        downtime_limit: Some(0),
        // Every page fits the XBZRLE cache, whatever --mib.
        xbzrle_cache_size: Some((mib << 20).next_power_of_two().max(64 << 20)),
        ..Default::default()
    })
    .unwrap();
    match mode {
        Mode::Multifd(n) => m
            .start_multifd_to(std::io::sink(), (0..n).map(|_| std::io::sink()).collect())
            .unwrap(),
        _ => m.start_to(std::io::sink()).unwrap(),
    }
    let info = m.wait().unwrap();
    assert_eq!(info.status, MigrationStatus::Completed, "{info:?}");
    let marks = dirtier.marks.lock().unwrap().clone();
    // marks[k] is sync k+1; pass k runs from the exit of sync k to the entry of sync k+1.
    // Count passes 3..=passes (the bulk pass and the cache-filling pass excluded).
    // Best pass, as memcpy's best of five: the machine is shared and noisy.
    let mut t = Duration::MAX;
    for k in 3..=passes as usize {
        t = t.min(marks[k].0 - marks[k - 1].1);
    }
    let counted = 1u64;
    let bytes = counted * (mib << 20);
    let ram = info.ram.unwrap();
    Result1 {
        gbps: bytes as f64 / t.as_secs_f64() / 1e9,
        wire_ratio: ram.transferred as f64 / (passes * (mib << 20)) as f64,
    }
}

/// Best of five copies of a `mib` MiB buffer in `chunk`-byte pieces, GB/s: the whole
/// buffer at once (memcpy, which at this size may use non-temporal stores), or one 4 KiB
/// page at a time, as the engine copies pages out.
fn copy_gbps(mib: u64, chunk: usize) -> f64 {
    let n = (mib << 20) as usize;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for (d, s) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            d.copy_from_slice(std::hint::black_box(s));
        }
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    n as f64 / best / 1e9
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let passes = arg("--passes", 6).max(3);
    if std::env::args().any(|a| a == "--xbzrle-only") {
        // For profiling: only the single-core XBZRLE-friendly run.
        let r = run(
            Kind::XbzrleFriendly,
            arg("--mib", 256).max(1),
            passes,
            Mode::Single,
        );
        println!("xbzrle-friendly: {:.2} GB/s", r.gbps);
        return;
    }
    let mib = arg("--mib", 256).max(1);
    if std::env::args().any(|a| a == "--multifd-only") {
        // For profiling: only the XBZRLE-friendly guest with --channels page channels.
        let n = arg("--channels", 2).max(1) as usize;
        let r = run(Kind::XbzrleFriendly, mib, passes, Mode::Multifd(n));
        println!("xbzrle-friendly, multifd {n}: {:.2} GB/s", r.gbps);
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memcpy = copy_gbps(mib, usize::MAX);
    println!(
        "engine throughput, {mib} MiB guest, best of passes 3..={passes}, xbzrle backend {:?}, {cores} threads",
        xbzrle::Codec::new().backend(),
    );
    let page_copy = copy_gbps(mib, PAGE_SIZE);
    println!(
        "memcpy ({mib} MiB buffers, one core): {memcpy:.2} GB/s whole buffer (the ratios below), \
         {page_copy:.2} GB/s page by page"
    );
    println!(
        "{:<16} {:<10} {:>9} {:>10} {:>10} {:>10}",
        "guest", "channels", "GB/s", "GB/s/core", "vs memcpy", "wire/RAM"
    );
    for kind in [Kind::ZeroHeavy, Kind::XbzrleFriendly, Kind::Random] {
        for mode in [
            Mode::Single,
            Mode::Multifd(1),
            Mode::Multifd(2),
            Mode::Multifd(4),
        ] {
            let r = run(kind, mib, passes, mode);
            let (label, used) = match mode {
                Mode::Multifd(n) => (format!("multifd {n}"), n.min(cores)),
                _ => ("1 stream".to_string(), 1),
            };
            let per_core = r.gbps / used as f64;
            println!(
                "{:<16} {:<10} {:>9.2} {:>10.2} {:>9.0}% {:>10.4}",
                format!("{kind:?}"),
                label,
                r.gbps,
                per_core,
                100.0 * per_core / memcpy,
                r.wire_ratio
            );
        }
    }
    // Alternate the configurations and keep the best of each: on a shared machine a
    // single pair of runs mostly measures who else was running.
    let (mut one, mut par, mut m1, mut m2) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for _ in 0..3 {
        one = one.max(run(Kind::XbzrleFriendly, mib, passes, Mode::Single).gbps);
        par = par.max(run(Kind::XbzrleFriendly, mib, passes, Mode::Parallel).gbps);
        m1 = m1.max(run(Kind::XbzrleFriendly, mib, passes, Mode::Multifd(1)).gbps);
        m2 = m2.max(run(Kind::XbzrleFriendly, mib, passes, Mode::Multifd(2)).gbps);
    }
    println!(
        "xbzrle-friendly, best of 3 alternating: 1 stream {one:.2} GB/s ({:.0}% of memcpy), \
         x-parallel-encoding {par:.2} GB/s ({:.2}x), multifd 1 channel {m1:.2} GB/s, \
         multifd 2 channels {m2:.2} GB/s: scaling {:.2}x (goal 1.7x)",
        100.0 * one / memcpy,
        par / one,
        m2 / m1
    );
}
