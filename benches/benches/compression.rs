//! `compression`: every page compression method on the real page corpus
//! (`benches/corpus/*.pcz`, captured from CPython, cc1, Node.js and SQLite) and on the
//! real QEMU 7.2 pairs (`shared/qemu-vectors`), as a bench binary printing tables.
//!
//! Per corpus and method: wire bytes per page (record header included, the page sent raw
//! when the method does not shrink it), encode and decode ns per page (best of
//! `REPS` runs per page, this CPU's fastest backend), and the modelled time to move the
//! corpus's pages over 1, 10 and 25 Gbit/s with 1 and 2 encoding cores:
//!
//! ```text
//! T = max(Σ encode_ns / cores, Σ wire_bytes / link_rate)
//! ```
//!
//! (encoding and sending overlap; the model `auto`'s selector uses). `auto` is replayed page by page through the real
//! `precopy_compress::select::Selector` with the measured per-page costs as its
//! measurements, paying what the engine pays: the XBZRLE delta on every page that has an
//! old copy, plus every method on a probe, plus the page's `Hint` (sampled on pages
//! without an old copy, its measured ns per page added). The row `1class` replays the
//! selector without hints (every page in one class), for comparison. Goals, checked and printed: `auto` within 5 %
//! of the best fixed method at every rate, better than every fixed method at one or
//! more; and zstd per page at least as fast per input byte as the `zstd` command line at
//! the same level with 4 KiB independent blocks (`zstd -b1 -B4096`), measured in the same
//! run.
//!
//! Run: `cargo bench -p precopy-benches --bench compression` (env `COMPRESSION_REPS`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use precopy_benches::corpus::Corpus;
use precopy_benches::{PAGE_SIZE, Page, QemuPairs};
use precopy_compress::select::{
    AUTO_CANDIDATES, Choice, DEFAULT_PROBE_MAX, DEFAULT_PROBE_MIN, Hint, RECORD_OVERHEAD, Selector,
};
use precopy_compress::{Levels, Method, PageCompressor, PageDecompressor};

/// Header of a PAGE record (be64, no block name).
const PAGE_RECORD: u64 = 8 + PAGE_SIZE as u64;
/// The engine's largest useful frame (see engine `MAX_FRAME`).
const MAX_FRAME: usize = PAGE_SIZE - 4;
const RATES_GBIT: [f64; 3] = [1.0, 10.0, 25.0];
const CORES: [usize; 2] = [1, 2];

struct Named {
    name: String,
    pairs: Vec<(Option<Box<Page>>, Box<Page>)>,
}

/// One page under one method: payload bytes (None = sent raw), encode ns, decode ns.
#[derive(Clone, Copy, Default)]
struct Cost {
    payload: Option<usize>,
    enc_ns: u64,
    dec_ns: u64,
}

impl Cost {
    fn wire(&self) -> u64 {
        match self.payload {
            Some(n) => n as u64 + RECORD_OVERHEAD,
            None => PAGE_RECORD,
        }
    }
}

fn min_ns(reps: usize, mut f: impl FnMut()) -> u64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as u64
        })
        .min()
        .unwrap_or(0)
}

/// Costs per page for every method (index = `Method::index`).
fn measure(
    c: &mut PageCompressor,
    d: &mut PageDecompressor,
    n: &Named,
    reps: usize,
) -> Vec<[Cost; 4]> {
    let mut out = vec![0u8; PAGE_SIZE];
    let mut scratch: Box<Page> = Box::new([0; PAGE_SIZE]);
    let mut costs = Vec::with_capacity(n.pairs.len());
    for (old, new) in &n.pairs {
        let mut row = [Cost::default(); 4];
        for m in Method::ALL {
            if m == Method::Xbzrle && old.is_none() {
                continue; // no cache hit: sent raw, nothing spent
            }
            let cap = if m == Method::None {
                PAGE_SIZE
            } else {
                MAX_FRAME
            };
            let mut r = None;
            let enc_ns = min_ns(reps, || {
                r = Some(c.compress(m, new, old.as_deref(), &mut out[..cap]));
            });
            let payload = r.and_then(Result::ok);
            let frame = out[..payload.unwrap_or(0)].to_vec();
            let dec_ns = match payload {
                Some(len) if m != Method::None => min_ns(reps, || {
                    if let Some(o) = old {
                        scratch.copy_from_slice(&o[..]);
                    }
                    d.decompress(m, &frame[..len], &mut scratch).unwrap();
                }),
                _ => min_ns(reps, || scratch.copy_from_slice(&new[..])),
            };
            if payload.is_some() && m != Method::None {
                assert_eq!(&scratch[..], &new[..], "{m} round trip on {}", n.name);
            }
            row[m.index()] = Cost {
                payload: if m == Method::None { None } else { payload },
                enc_ns,
                dec_ns,
            };
        }
        costs.push(row);
    }
    costs
}

/// Each page's [`Hint`] ([`Hint::Cached`] when it has an old copy, as the engine does)
/// and what sampling a page costs (ns per page, the best of `reps` passes over the
/// corpus's sampled pages).
fn hints(n: &Named, reps: usize) -> (Vec<Hint>, f64) {
    let sampled: Vec<&Page> = n
        .pairs
        .iter()
        .filter(|p| p.0.is_none())
        .map(|p| &*p.1)
        .collect();
    let ns = min_ns(reps.max(20), || {
        for p in &sampled {
            std::hint::black_box(Hint::of(std::hint::black_box(p)));
        }
    }) as f64
        / sampled.len().max(1) as f64;
    let hints = n
        .pairs
        .iter()
        .map(|(old, new)| match old {
            Some(_) => Hint::Cached,
            None => Hint::of(new),
        })
        .collect();
    (hints, ns)
}

fn model_ns(enc_ns: u64, wire: u64, gbit: f64, cores: usize) -> f64 {
    (enc_ns as f64 / cores as f64).max(wire as f64 * 8.0 / gbit)
}

/// `auto` replayed through the selector as the engine runs it: (encode ns spent, wire
/// bytes) for the corpus. Every page's [`Hint`] is computed first (its cost counted).
/// The selector is not serial ([`Selector::set_serial`]): the engine sets that only
/// without a rate limit, and every column here is a link of a given rate. On a hit the
/// engine makes the XBZRLE delta only when XBZRLE is chosen or probed; else it compares
/// and copies the page into the cache (charged as one page copy, `none`'s measured cost).
fn replay_auto(
    costs: &[[Cost; 4]],
    has_old: &[bool],
    hints: &[Hint],
    hint_ns: f64,
    gbit: f64,
    cores: usize,
) -> (u64, u64) {
    let bw = (gbit * 1e9 / 8.0) as u64;
    let mut s = Selector::new(
        bw,
        cores,
        DEFAULT_PROBE_MIN,
        DEFAULT_PROBE_MAX,
        AUTO_CANDIDATES,
    );
    // A modelled link of a given rate is the engine with `max-bandwidth` set: the
    // serial rule (unlimited loopback, the receiver on the same cores) is off there.
    s.set_serial(false);
    let (mut enc, mut wire) = (0u64, 0u64);
    for ((row, &hit), &hint) in costs.iter().zip(has_old).zip(hints) {
        let (e0, w0) = (enc, wire);
        s.set_hint(hint);
        if hint != Hint::Cached && hint_ns > 0.0 {
            enc += hint_ns as u64;
        }
        replay_page(&mut s, row, hit, &mut enc, &mut wire);
        let payload = (wire - w0).saturating_sub(RECORD_OVERHEAD) as usize;
        s.account(enc - e0, payload.min(PAGE_SIZE));
    }
    (enc, wire)
}

/// One page of [`replay_auto`]: adds its encode ns and wire bytes.
fn replay_page(s: &mut Selector, row: &[Cost; 4], hit: bool, enc: &mut u64, wire: &mut u64) {
    {
        let (chosen, probe, try_x) = match s.choose(hit) {
            Choice::Use(m) => (m, None, false),
            Choice::Probe { chosen, probe } => (chosen, Some(probe), false),
            Choice::TryXbzrle { fallback } => (fallback, None, true),
        };
        if hit && chosen != Method::Xbzrle && probe != Some(Method::Xbzrle) && !try_x {
            *enc += row[Method::None.index()].enc_ns;
        }
        if try_x {
            let x = &row[Method::Xbzrle.index()];
            *enc += x.enc_ns;
            s.record(Method::Xbzrle, x.payload.unwrap_or(PAGE_SIZE), x.enc_ns);
            if s.keep_xbzrle(x.payload, chosen) {
                *wire += x.wire();
                return;
            }
        }
        let made = |m: Method, s: &mut Selector| -> (Method, Option<usize>, u64) {
            let c = &row[m.index()];
            match m {
                Method::None => (m, Some(PAGE_SIZE), 0),
                _ => {
                    s.record(m, c.payload.unwrap_or(PAGE_SIZE), c.enc_ns);
                    (m, c.payload, c.enc_ns)
                }
            }
        };
        let c = made(chosen, s);
        *enc += c.2;
        let sent = match probe {
            None => c,
            Some(p) => {
                let p = made(p, s);
                *enc += p.2;
                if s.probe_done(c, p) == p.0 { p } else { c }
            }
        };
        *wire += match sent {
            (Method::None, _, _) | (_, None, _) => PAGE_RECORD,
            (_, Some(p), _) => p as u64 + RECORD_OVERHEAD,
        };
    }
}

/// `zstd -b<level> -B4096` on `file`: compression speed in MB/s as the tool prints it.
fn zstd_cli_speed(file: &Path, level: i32) -> Option<(f64, String)> {
    let o = Command::new("zstd")
        .args(["-q", &format!("-b{level}"), "-i1", "-B4096"])
        .arg(file)
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // The last line with "MB/s" (updates are \r-separated); the compression speed is the
    // number before its first "MB/s".
    let line = text
        .split(['\r', '\n'])
        .rfind(|l| l.contains("MB/s"))?
        .trim()
        .to_owned();
    let before = line.split("MB/s").next()?;
    let speed = before
        .split([' ', ','])
        .rfind(|t| !t.is_empty())?
        .parse()
        .ok()?;
    Some((speed, line))
}

fn corpora() -> Vec<Named> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "pcz"));
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let c = Corpus::read(&f).unwrap_or_else(|e| panic!("{e}"));
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        println!(
            "corpus {name}: {:?}\n  scanned {} pages: zero {} unchanged {} changed {} fresh {} (stored pairs {})",
            c.label,
            c.scanned,
            c.zero,
            c.unchanged,
            c.changed,
            c.fresh,
            c.pairs.len()
        );
        out.push(Named {
            name,
            pairs: c.pairs.into_iter().map(|p| (p.old, p.new)).collect(),
        });
    }
    if let Some(q) = QemuPairs::load_or_skip("compression bench: QEMU pairs") {
        println!(
            "corpus qemu-7.2-xbzrle: {} real (old, new) pairs of shared/qemu-vectors",
            q.len()
        );
        out.push(Named {
            name: "qemu-7.2-xbzrle".into(),
            pairs: q.into_iter().map(|r| (Some(r.old), r.new)).collect(),
        });
    }
    out
}

fn main() {
    let reps: usize = std::env::var("COMPRESSION_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let levels = Levels::default();
    let mut c = PageCompressor::new(levels).unwrap();
    let mut d = PageDecompressor::new();
    let mut goals_ok = true;
    for n in corpora() {
        let pages = n.pairs.len() as u64;
        if pages == 0 {
            continue;
        }
        let costs = measure(&mut c, &mut d, &n, reps);
        let has_old: Vec<bool> = n.pairs.iter().map(|p| p.0.is_some()).collect();
        let (hints, hint_ns) = hints(&n, reps);
        println!(
            "\n== {} ({} pages, {} with an old copy; zstd level {}, zlib level {}) ==",
            n.name,
            pages,
            has_old.iter().filter(|&&b| b).count(),
            levels.zstd,
            levels.zlib
        );
        print!(
            "{:<7} {:>10} {:>9} {:>9}",
            "method", "bytes/pg", "enc ns", "dec ns"
        );
        for g in RATES_GBIT {
            for k in CORES {
                print!(" {:>9}", format!("{g}G/{k}c"));
            }
        }
        println!("   (modelled ms for the corpus)");
        let mut fixed: Vec<(Method, Vec<f64>)> = Vec::new();
        for m in Method::ALL {
            let wire: u64 = costs.iter().map(|r| r[m.index()].wire()).sum();
            let enc: u64 = costs.iter().map(|r| r[m.index()].enc_ns).sum();
            let dec: u64 = costs.iter().map(|r| r[m.index()].dec_ns).sum();
            print!(
                "{:<7} {:>10.1} {:>9} {:>9}",
                m.name(),
                wire as f64 / pages as f64,
                enc / pages,
                dec / pages
            );
            let mut times = Vec::new();
            for g in RATES_GBIT {
                for k in CORES {
                    let t = model_ns(enc, wire, g, k);
                    times.push(t);
                    print!(" {:>9.3}", t / 1e6);
                }
            }
            println!();
            fixed.push((m, times));
        }
        print!("{:<7} {:>10} {:>9} {:>9}", "auto", "", "", "");
        let mut strictly_better = false;
        let mut ratios = Vec::new();
        let mut i = 0;
        for g in RATES_GBIT {
            for k in CORES {
                let (enc, wire) = replay_auto(&costs, &has_old, &hints, hint_ns, g, k);
                let t = model_ns(enc, wire, g, k);
                print!(" {:>9.3}", t / 1e6);
                let best = fixed.iter().map(|f| f.1[i]).fold(f64::INFINITY, f64::min);
                ratios.push(t / best);
                strictly_better |= t < best;
                i += 1;
            }
        }
        println!();
        // For comparison: the selector without hints (every page in one class).
        let one_class = vec![Hint::default(); hints.len()];
        print!("{:<7} {:>10} {:>9} {:>9}", "1class", "", "", "");
        let mut i = 0;
        let mut ratios1 = Vec::new();
        for g in RATES_GBIT {
            for k in CORES {
                let (enc, wire) = replay_auto(&costs, &has_old, &one_class, 0.0, g, k);
                let t = model_ns(enc, wire, g, k);
                print!(" {:>9.3}", t / 1e6);
                let best = fixed.iter().map(|f| f.1[i]).fold(f64::INFINITY, f64::min);
                ratios1.push(format!("{:.3}", t / best));
                i += 1;
            }
        }
        println!("   (auto without hints: {})", ratios1.join(" "));
        let worst = ratios.iter().copied().fold(0.0, f64::max);
        let mut classes = String::new();
        for h in Hint::ALL {
            let of: Vec<&[Cost; 4]> = costs
                .iter()
                .zip(&hints)
                .filter(|(_, x)| **x == h)
                .map(|(c, _)| c)
                .collect();
            let zstd = of
                .iter()
                .map(|r| r[Method::Zstd.index()].wire())
                .sum::<u64>() as f64
                / of.len().max(1) as f64;
            classes += &format!(" {h:?} {} ({zstd:.0} B/pg zstd);", of.len());
        }
        println!(
            "hint: {hint_ns:.0} ns/page (zstd {:.0} ns/page); pages per class:{classes}",
            costs
                .iter()
                .map(|r| r[Method::Zstd.index()].enc_ns)
                .sum::<u64>() as f64
                / pages as f64,
        );
        let within = worst <= 1.05;
        println!(
            "auto / best fixed: {} (worst {:.3}: {}; better than every fixed method somewhere: {})",
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" "),
            worst,
            if within {
                "within 5 %"
            } else {
                "NOT within 5 %"
            },
            if strictly_better { "yes" } else { "no" }
        );
        goals_ok &= within;

        // zstd per page against the zstd command line, same level, 4 KiB blocks.
        let zstd_enc: u64 = costs.iter().map(|r| r[Method::Zstd.index()].enc_ns).sum();
        let ours = pages as f64 * PAGE_SIZE as f64 / (zstd_enc as f64 / 1e9) / 1e6;
        let file = std::env::temp_dir().join(format!(
            "precopy-corpus-{}-{}.raw",
            n.name,
            std::process::id()
        ));
        let raw: Vec<u8> = n.pairs.iter().flat_map(|p| p.1.iter().copied()).collect();
        std::fs::write(&file, &raw).unwrap();
        match zstd_cli_speed(&file, levels.zstd) {
            Some((cli, line)) => {
                println!(
                    "zstd per page: {ours:.1} MB/s of input; zstd CLI -b{} -B4096: {cli:.1} MB/s ({line}); ratio {:.2} ({})",
                    levels.zstd,
                    ours / cli,
                    if ours >= cli {
                        "at least as fast"
                    } else {
                        "SLOWER"
                    }
                );
            }
            None => println!("zstd per page: {ours:.1} MB/s of input; zstd CLI not available"),
        }
        let _ = std::fs::remove_file(&file);
    }
    println!(
        "\ngoal auto within 5 % of the best fixed method everywhere: {}",
        if goals_ok { "met" } else { "NOT met" }
    );
}
