//! `snapshot`: a full memory snapshot (mapped-ram, parallel positional writes, zero pages as
//! holes) against diff snapshots after 1 s of guest writes to a 5 % hot set, on a large
//! simulated guest (default 4 GiB). Prints, for each: wall time, bytes written, pages by
//! kind, and the guest's pause; the disk usage of the mapped-ram file against the RAM size;
//! and the ratios diff/full measured in the same run.
//!
//! The guest's own vCPU threads are idle; one writer thread here stands for the workload:
//! it picks pages of the hot set (5 % of RAM, scattered) and changes one 8-byte word in
//! each, at `--write-rate` pages/s, and holds off while the guest is stopped (it checks the
//! guest's run state before each write, so at most one write can race a stop: this is a
//! bench, not a correctness test).
//!
//! `cargo run --release -p precopy-benches --bin snapshot [-- --gib 4 --hot-percent 5
//! --write-rate 200000 --dir /tmp/precopy-snapbench --cache-mib 256]`

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use precopy_engine::snapshot::{SnapshotOptions, SnapshotStats, Snapshotter};
use precopy_engine::{GuestRam, SimConfig, SimGuest, VcpuControl};
use xbzrle::PAGE_SIZE;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn row(label: &str, st: &SnapshotStats) {
    println!(
        "{label:<8} {:>8} ms  pause {:>9.3} ms  file {:>12} B  disk {:>12} B  live {:>8} final {:>7}  zero {:>8} raw {:>8} xbzrle {:>7}",
        st.total_ms,
        st.pause_us as f64 / 1000.0,
        st.file_bytes,
        st.disk_bytes,
        st.live_pages,
        st.final_pages,
        st.zero,
        st.raw,
        st.xbzrle
    );
}

fn main() {
    let gib: u64 = arg("--gib", 4);
    let hot_percent: u64 = arg("--hot-percent", 5);
    let rate: u64 = arg("--write-rate", 200_000);
    let cache_mib: u64 = arg("--cache-mib", 256);
    let dir: PathBuf = arg("--dir", PathBuf::from("/tmp/precopy-snapbench"));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let ram = gib << 30;
    let t = Instant::now();
    let guest = Arc::new(
        SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), ram)],
            dirty_rate: 0,
            vcpus: 1,
            seed: 5,
            initial_zero_percent: 25,
            ..SimConfig::default()
        })
        .expect("guest"),
    );
    let pages = ram / PAGE_SIZE as u64;
    let hot = pages * hot_percent / 100;
    println!(
        "guest: {gib} GiB ({pages} pages, 25 % zero), hot set {hot} pages ({hot_percent} %), writes {rate} pages/s; built in {} ms",
        t.elapsed().as_millis()
    );

    // The workload: one word changed per write, in pages of the hot set.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (g, stop, writes) = (guest.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut page = [0u8; PAGE_SIZE];
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut t0 = Instant::now();
            let mut n = 0u64;
            let mut in_window = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if !g.is_running() {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                }
                // Pace to `rate` writes per second, in 100 ms windows (no catching up
                // after a pause).
                if t0.elapsed() >= Duration::from_millis(100) {
                    t0 = Instant::now();
                    in_window = 0;
                }
                if in_window * 10 >= rate {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Scatter the hot set over RAM: page i of the set at i * 20 (5 %).
                let p = (x % hot) * (pages / hot.max(1));
                if g.read_page(0, p, &mut page).is_ok() {
                    let w = ((x >> 32) % 512) as usize * 8;
                    page[w..w + 8].copy_from_slice(&x.to_le_bytes());
                    let _ = g.write_page(0, p, &page);
                    n += 1;
                    in_window += 1;
                    writes.store(n, Ordering::Relaxed);
                }
            }
        })
    };

    let mut s = Snapshotter::new(
        &*guest,
        SnapshotOptions {
            xbzrle_cache_bytes: cache_mib << 20,
            resume: true,
        },
    )
    .expect("snapshotter");
    let full_path = dir.join("full.snap");
    let full = s.full(&full_path).expect("full snapshot");
    row("full", &full);
    let mut diffs = Vec::new();
    for i in 1..=3 {
        let w0 = writes.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(1));
        let w1 = writes.load(Ordering::Relaxed);
        let p = dir.join(format!("d{i}.diff"));
        let d = s.diff(&p).expect("diff snapshot");
        println!("  ({} page writes in the second before diff {i})", w1 - w0);
        row(&format!("diff {i}"), &d);
        diffs.push(d);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");

    println!();
    println!(
        "mapped-ram full snapshot: disk usage {} B = {:.3} of RAM ({} B), file length {} B",
        full.disk_bytes,
        full.disk_bytes as f64 / ram as f64,
        ram,
        full.file_bytes
    );
    println!(
        "non-zero RAM {} B: disk usage / non-zero RAM = {:.3}",
        full.raw * PAGE_SIZE as u64,
        full.disk_bytes as f64 / (full.raw * PAGE_SIZE as u64) as f64
    );
    for (i, d) in diffs.iter().enumerate() {
        println!(
            "diff {} / full: time {:.4}, bytes {:.4}, pause {:.4}",
            i + 1,
            d.total_ms as f64 / full.total_ms as f64,
            d.file_bytes as f64 / full.disk_bytes as f64,
            d.pause_us as f64 / full.pause_us.max(1) as f64
        );
    }

    // The physical limit in the same run: the same non-zero bytes written sequentially to a
    // new file in the same folder, then fsync.
    let bytes = full.raw * PAGE_SIZE as u64;
    let buf = vec![0x5au8; 8 << 20];
    let t = Instant::now();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(dir.join("seq.ref")).expect("reference file");
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n]).expect("write");
            left -= n as u64;
        }
        f.sync_all().expect("fsync");
    }
    let seq_ms = t.elapsed().as_millis() as u64;
    println!(
        "reference: sequential write + fsync of the same {bytes} B: {seq_ms} ms ({:.0} MB/s); full snapshot / reference = {:.2}",
        bytes as f64 / 1e3 / seq_ms.max(1) as f64,
        full.total_ms as f64 / seq_ms.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
