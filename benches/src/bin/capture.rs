//! `capture`: reads every present writable page of a running process twice, some seconds
//! apart, through `/proc/PID/mem`, and writes the pages that changed (with their first
//! content) or appeared, plus the zero / unchanged counts, as a page corpus (format in
//! `precopy_benches::corpus`).
//!
//! ```text
//! capture --pid PID --out FILE.pcz [--interval SECS] [--max-pairs N] [--label TEXT] [--level N]
//! ```
//!
//! Writable mappings come from `/proc/PID/maps` (`[vvar]`, `[vsyscall]` skipped); present
//! pages from `/proc/PID/pagemap` (bit 63), so nothing is faulted in. Ranges that cannot be
//! read are skipped and counted. The process keeps running: this is what a pre-copy pass
//! sees. With more changed pages than `--max-pairs` (default 1000), an even sample
//! (every k-th in address order) is stored; the counts are always of all pages.
//! Needs the right to ptrace the process (root, or the same user with
//! `kernel.yama.ptrace_scope=0`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use precopy_benches::corpus::{Corpus, Pair};
use precopy_benches::{PAGE_SIZE, Page};

const PAGE: u64 = PAGE_SIZE as u64;
/// Pages read with one `pread` when they are contiguous and present.
const RUN: u64 = 64;
/// Pages per pagemap read.
const WINDOW: u64 = 1 << 16;

struct Args {
    pid: u32,
    out: String,
    interval: f64,
    max_pairs: usize,
    label: String,
    level: i32,
}

fn usage() -> String {
    "usage: capture --pid PID --out FILE.pcz [--interval SECS] [--max-pairs N] [--label TEXT] [--level N]".into()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        pid: 0,
        out: String::new(),
        interval: 3.0,
        max_pairs: 1000,
        label: String::new(),
        level: 19,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| format!("{k} needs a value\n{}", usage()))
        };
        match k.as_str() {
            "--pid" => a.pid = v()?.parse().map_err(|e| format!("--pid: {e}"))?,
            "--out" => a.out = v()?,
            "--interval" => a.interval = v()?.parse().map_err(|e| format!("--interval: {e}"))?,
            "--max-pairs" => a.max_pairs = v()?.parse().map_err(|e| format!("--max-pairs: {e}"))?,
            "--label" => a.label = v()?,
            "--level" => a.level = v()?.parse().map_err(|e| format!("--level: {e}"))?,
            _ => return Err(format!("unknown option {k}\n{}", usage())),
        }
    }
    if a.pid == 0 || a.out.is_empty() {
        return Err(usage());
    }
    if a.label.is_empty() {
        a.label = std::fs::read(format!("/proc/{}/cmdline", a.pid))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
    }
    Ok(a)
}

/// Writable mappings of the process: (start, end).
fn writable_ranges(pid: u32) -> io::Result<Vec<(u64, u64)>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(3).unwrap_or("");
        if perms.as_bytes().get(1) != Some(&b'w') || path == "[vvar]" || path == "[vsyscall]" {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
            out.push((a, b));
        }
    }
    Ok(out)
}

/// One pass: every present writable page's content, and the count of unreadable ones.
fn snapshot(pid: u32) -> io::Result<(HashMap<u64, Box<Page>>, u64)> {
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let mut pages = HashMap::new();
    let mut unreadable = 0u64;
    let mut entries = Vec::new();
    let mut buf = vec![0u8; (RUN * PAGE) as usize];
    // Large mappings are walked in windows of 64 Ki pages (512 KiB of pagemap).
    let windows = writable_ranges(pid)?.into_iter().flat_map(|(a, b)| {
        (a..b)
            .step_by((WINDOW * PAGE) as usize)
            .map(move |s| (s, (s + WINDOW * PAGE).min(b)))
    });
    for (start, end) in windows {
        let n = (end - start) / PAGE;
        entries.resize(n as usize * 8, 0);
        if pagemap
            .read_exact_at(&mut entries, start / PAGE * 8)
            .is_err()
        {
            unreadable += n;
            continue;
        }
        let present = |i: u64| {
            let e = u64::from_le_bytes(entries[i as usize * 8..][..8].try_into().unwrap());
            e >> 63 == 1
        };
        let mut i = 0;
        while i < n {
            if !present(i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && j - i < RUN && present(j) {
                j += 1;
            }
            let len = ((j - i) * PAGE) as usize;
            let addr = start + i * PAGE;
            if mem.read_exact_at(&mut buf[..len], addr).is_ok() {
                for (k, chunk) in buf[..len].chunks_exact(PAGE_SIZE).enumerate() {
                    let p: Box<Page> = Box::new(chunk.try_into().unwrap());
                    pages.insert(addr + k as u64 * PAGE, p);
                }
            } else {
                // Page by page: keep what can be read.
                for k in i..j {
                    let mut p: Box<Page> = Box::new([0; PAGE_SIZE]);
                    if mem.read_exact_at(&mut p[..], start + k * PAGE).is_ok() {
                        pages.insert(start + k * PAGE, p);
                    } else {
                        unreadable += 1;
                    }
                }
            }
            i = j;
        }
    }
    Ok((pages, unreadable))
}

fn run(a: &Args) -> io::Result<Corpus> {
    let t = Instant::now();
    let (first, u1) = snapshot(a.pid)?;
    let first_ms = t.elapsed().as_millis();
    std::thread::sleep(Duration::from_secs_f64(a.interval));
    let (second, u2) = snapshot(a.pid)?;
    let mut c = Corpus {
        scanned: second.len() as u64,
        unreadable: u1 + u2,
        interval_ms: (a.interval * 1000.0) as u64,
        label: a.label.clone(),
        ..Default::default()
    };
    let mut addrs: Vec<u64> = second.keys().copied().collect();
    addrs.sort_unstable();
    let mut sent = Vec::new();
    for addr in addrs {
        let new = &second[&addr];
        if new.iter().all(|&b| b == 0) {
            c.zero += 1;
            continue;
        }
        match first.get(&addr) {
            Some(old) if old == new => c.unchanged += 1,
            Some(_) => {
                c.changed += 1;
                sent.push(addr);
            }
            None => {
                c.fresh += 1;
                sent.push(addr);
            }
        }
    }
    let step = sent.len().div_ceil(a.max_pairs.max(1)).max(1);
    for &addr in sent.iter().step_by(step) {
        c.pairs.push(Pair {
            address: addr,
            old: first.get(&addr).cloned(),
            new: second[&addr].clone(),
        });
    }
    eprintln!(
        "capture: pid {} first pass {} pages in {first_ms} ms; second pass {} pages: zero {} unchanged {} changed {} fresh {} unreadable {}; stored {} pairs",
        a.pid,
        first.len(),
        c.scanned,
        c.zero,
        c.unchanged,
        c.changed,
        c.fresh,
        c.unreadable,
        c.pairs.len()
    );
    Ok(c)
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let result = run(&a).and_then(|c| {
        let f = BufWriter::new(File::create(&a.out)?);
        c.write_to(f, a.level)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capture: pid {}: {e}", a.pid);
            ExitCode::FAILURE
        }
    }
}
