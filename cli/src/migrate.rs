//! `precopy migrate` and `precopy incoming` (issue 5).
//!
//! `precopy migrate` with no arguments migrates a built-in simulated guest (1 GiB, a hot-set
//! workload that does not converge at the default bandwidth without XBZRLE or
//! auto-converge) to a destination in the same process over loopback TCP, shows a live
//! progress bar, prints a summary like QEMU's `info migrate`, and verifies the destination
//! RAM against the source.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use precopy_engine::{
    Capabilities, Destination, GuestRam, IncomingError, IncomingListener, MigrationInfo,
    MigrationParameters, MigrationStatus, MigrationUri, Migrator, ParameterUpdate, Received,
    SimConfig, SimGuest, SimWorkload,
};
use precopy_stream::Limits;

/// `on` / `off`, as QEMU spells capability states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl OnOff {
    pub(crate) fn on(self) -> bool {
        self == OnOff::On
    }
}

/// Which guest to migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum GuestKind {
    /// The built-in simulated guest (threads dirtying shared memory).
    Sim,
    /// A real KVM guest (needs /dev/kvm and the `kvm` feature).
    Kvm,
}

/// Parse a size: a whole number with an optional binary suffix K, M, G, T (optionally
/// followed by `iB` or `B`), as QEMU's size options: `256M`, `1G`, `65536`. Every size
/// option of the CLI uses this parser; fractions (`1.5G`) are refused.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suf) = t.split_at(digits);
    if suf.starts_with(['.', ',']) {
        return Err(format!(
            "{s:?}: fractions are not accepted; give a whole number of a smaller unit (e.g. 1536M for 1.5G)"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 256M, 1G)"))?;
    let suf = suf.trim_end_matches("iB").trim_end_matches('B');
    let shift = match suf {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{s:?}: unknown size suffix (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Arguments of `precopy migrate`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct MigrateArgs {
    /// The guest to migrate.
    #[arg(long, value_enum, default_value = "sim")]
    pub(crate) guest: GuestKind,
    /// Guest RAM size (e.g. 256M, 1G).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub(crate) mem: u64,
    /// vCPUs (writer threads of the simulated guest).
    #[arg(long, default_value_t = 2)]
    pub(crate) vcpus: usize,
    /// Pages the guest dirties per second (before throttling); 0 = idle.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) dirty_rate: u64,
    /// Workload of the simulated guest: sparse, cacheline, fullpage, zeroing, hotset, mix.
    #[arg(long, default_value = "hotset")]
    pub(crate) workload: SimWorkload,
    /// Seed of the simulated guest's contents and writes.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Destination URI (tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, fd:N); default: an
    /// in-process destination on loopback TCP.
    #[arg(long)]
    pub(crate) to: Option<String>,
    /// max-bandwidth, bytes/s (suffixes allowed: 128M); 0 = unlimited. Any small value is
    /// legitimate: the migration then proceeds at that rate (possibly never converging)
    /// and the progress display keeps updating.
    #[arg(long, value_parser = parse_size)]
    pub(crate) max_bandwidth: Option<u64>,
    /// avail-switchover-bandwidth, bytes/s; 0 = use the measured bandwidth.
    #[arg(long, value_parser = parse_size)]
    pub(crate) avail_switchover_bandwidth: Option<u64>,
    /// downtime-limit, ms.
    #[arg(long)]
    pub(crate) downtime_limit: Option<u64>,
    /// xbzrle-cache-size, bytes (power of two, suffixes allowed: 64M).
    #[arg(long, value_parser = parse_size)]
    pub(crate) xbzrle_cache_size: Option<u64>,
    /// cpu-throttle-initial, %.
    #[arg(long)]
    pub(crate) cpu_throttle_initial: Option<u8>,
    /// cpu-throttle-increment, %.
    #[arg(long)]
    pub(crate) cpu_throttle_increment: Option<u8>,
    /// cpu-throttle-tailslow.
    #[arg(long, value_enum)]
    pub(crate) cpu_throttle_tailslow: Option<OnOff>,
    /// max-cpu-throttle, %.
    #[arg(long)]
    pub(crate) max_cpu_throttle: Option<u8>,
    /// throttle-trigger-threshold, %.
    #[arg(long)]
    pub(crate) throttle_trigger_threshold: Option<u8>,
    /// Capability xbzrle.
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) xbzrle: OnOff,
    /// Capability auto-converge.
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) auto_converge: OnOff,
    /// Capability x-parallel-encoding (ours): encode on a thread pool.
    #[arg(long, value_enum, default_value = "off")]
    pub(crate) parallel_encoding: OnOff,
    /// Give up (failed) after this many dirty-bitmap syncs without converging. It counts
    /// bitmap syncs (QEMU's "dirty sync count", one at the start of each pass over RAM),
    /// not seconds; with a tiny --max-bandwidth one pass can take very long.
    #[arg(long)]
    pub(crate) pass_limit: Option<u64>,
    /// Print the final query-migrate object as one JSON line, plus "verified": true or
    /// false when this process compared the destination RAM with the source (in-process
    /// destination or --to file:PATH; false also when the migration failed), null when an
    /// external destination (e.g. `precopy incoming`) verifies and the source cannot know.
    /// Exit status is non-zero only when the migration failed or verification was false.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Arguments of `precopy incoming`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct IncomingArgs {
    /// Where to receive: tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, fd:N.
    pub(crate) uri: String,
    /// The guest to receive into.
    #[arg(long, value_enum, default_value = "sim")]
    pub(crate) guest: GuestKind,
    /// Guest RAM size for a KVM destination (e.g. 256M, 1G).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub(crate) mem: u64,
    /// vCPUs of a KVM destination.
    #[arg(long, default_value_t = 2)]
    pub(crate) vcpus: usize,
    /// Largest RAM the stream may declare (MEM_SIZE), bytes (suffixes K, M, G, T).
    #[arg(long, value_parser = parse_size, default_value = "16G")]
    pub(crate) max_ram: u64,
    /// Check the RAM against the digest the source (`precopy migrate`) puts in the VM
    /// description. A real QEMU stream carries no such digest: receive it with `--verify off`
    /// (it then loads and reports "verified: not checked").
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) verify: OnOff,
    /// Print the result as one JSON line.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The parameter update and capabilities the options ask for.
pub(crate) fn parameters_from(args: &MigrateArgs) -> (ParameterUpdate, Capabilities) {
    let u = ParameterUpdate {
        max_bandwidth: args.max_bandwidth,
        avail_switchover_bandwidth: args.avail_switchover_bandwidth,
        downtime_limit: args.downtime_limit,
        xbzrle_cache_size: args.xbzrle_cache_size,
        cpu_throttle_initial: args.cpu_throttle_initial,
        cpu_throttle_increment: args.cpu_throttle_increment,
        cpu_throttle_tailslow: args.cpu_throttle_tailslow.map(OnOff::on),
        max_cpu_throttle: args.max_cpu_throttle,
        throttle_trigger_threshold: args.throttle_trigger_threshold,
    };
    let c = Capabilities {
        xbzrle: args.xbzrle.on(),
        auto_converge: args.auto_converge.on(),
        x_parallel_encoding: args.parallel_encoding.on(),
    };
    (u, c)
}

/// Configure `m` from the options; prints the error and returns false on a bad parameter.
pub(crate) fn configure(m: &Migrator, args: &MigrateArgs) -> bool {
    let (u, c) = parameters_from(args);
    if let Err(e) = m.set_parameters(&u).and_then(|()| m.set_capabilities(c)) {
        eprintln!("precopy migrate: {e}");
        return false;
    }
    m.set_pass_limit(args.pass_limit);
    true
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Show a live progress bar until the migration finishes; returns the final info.
///
/// On a terminal the bar is redrawn every 200 ms; when stderr is not a terminal (and not
/// `quiet`), the same status line is printed once a second, so a slow (rate-limited)
/// migration still shows that it is alive and how far it got.
pub(crate) fn follow(m: &Migrator, total: u64, quiet: bool) -> MigrationInfo {
    let tty = std::io::stderr().is_terminal();
    let lines = !quiet && !tty;
    let bar = if quiet || !tty {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    let started = std::time::Instant::now();
    let mut next_line = Duration::from_secs(1);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let st = m.wait_for_status(MigrationStatus::Completed, Duration::from_millis(200));
        let info = m.query();
        if let Some(ram) = &info.ram {
            bar.set_position(ram.total.saturating_sub(ram.remaining));
            let msg = format!(
                "{} | pass {} | sent {} | remaining {} | {:.3} mbps | dirty {} pages/s | throttle {}%",
                st,
                ram.dirty_sync_count,
                HumanBytes(ram.transferred),
                HumanBytes(ram.remaining),
                ram.mbps,
                ram.dirty_pages_rate,
                info.cpu_throttle_percentage.unwrap_or(0)
            );
            if lines && started.elapsed() >= next_line && !st.is_finished() {
                next_line += Duration::from_secs(1);
                eprintln!("[{:>4}s] {msg}", started.elapsed().as_secs());
            }
            bar.set_message(msg);
        } else {
            bar.set_message(st.to_string());
        }
        bar.tick();
        if st.is_finished() {
            break;
        }
    }
    bar.finish_and_clear();
    m.wait().unwrap_or_else(|_| m.query())
}

fn kib(b: u64) -> u64 {
    b / 1024
}

/// Print a summary in the manner of QEMU's `info migrate`.
pub(crate) fn print_summary(
    info: &MigrationInfo,
    params: &MigrationParameters,
    caps: &Capabilities,
    verified: Option<bool>,
) {
    let onoff = |b: bool| if b { "on" } else { "off" };
    println!(
        "capabilities: xbzrle: {} auto-converge: {} x-parallel-encoding: {}",
        onoff(caps.xbzrle),
        onoff(caps.auto_converge),
        onoff(caps.x_parallel_encoding)
    );
    println!("Migration status: {}", info.status);
    if let Some(e) = &info.error_desc {
        println!("error: {e}");
    }
    if let Some(t) = info.total_time {
        println!("total time: {t} ms");
    }
    if let Some(d) = info.downtime {
        println!(
            "downtime: {d} ms (downtime-limit {} ms)",
            params.downtime_limit
        );
    }
    if let Some(s) = info.setup_time {
        println!("setup: {s} ms");
    }
    if let Some(r) = &info.ram {
        println!("transferred ram: {} kbytes", kib(r.transferred));
        println!("throughput: {:.2} mbps", r.mbps);
        println!("remaining ram: {} kbytes", kib(r.remaining));
        println!("total ram: {} kbytes", kib(r.total));
        println!("duplicate: {} pages", r.duplicate);
        println!("normal: {} pages", r.normal);
        println!("normal bytes: {} kbytes", kib(r.normal_bytes));
        println!("dirty sync count: {}", r.dirty_sync_count);
        println!("page size: {} kbytes", kib(r.page_size));
        println!("precopy ram: {} kbytes", kib(r.precopy_bytes));
        println!("downtime ram: {} kbytes", kib(r.downtime_bytes));
    }
    if let Some(x) = &info.xbzrle_cache {
        println!("cache size: {} bytes", x.cache_size);
        println!("xbzrle transferred: {} kbytes", kib(x.bytes));
        println!("xbzrle pages: {} pages", x.pages);
        println!("xbzrle cache miss: {} pages", x.cache_miss);
        println!("xbzrle cache miss rate: {:.2}", x.cache_miss_rate);
        println!("xbzrle encoding rate: {:.2}", x.encoding_rate);
        println!("xbzrle overflow: {}", x.overflow);
    }
    if let Some(t) = info.cpu_throttle_percentage {
        println!("cpu throttle percentage: {t}");
    }
    if info.status != MigrationStatus::Completed {
        println!(
            "verified: no (the migration {}, nothing to verify)",
            info.status
        );
        return;
    }
    match verified {
        Some(true) => println!("verified: yes (destination RAM equals source RAM)"),
        Some(false) => println!("verified: NO (destination RAM differs from source RAM)"),
        None => println!("verified: by the destination (see `precopy incoming`)"),
    }
}

/// The `--json` line: the query-migrate object plus `"verified"` (true/false when this
/// process verified, null when only an external destination can).
pub(crate) fn json_line(info: &MigrationInfo, verified: Option<bool>) -> String {
    let mut v = serde_json::to_value(info).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("verified".into(), serde_json::json!(verified));
    }
    v.to_string()
}

/// Destination RAM equals the (stopped) source's RAM, page by page.
pub(crate) fn same_ram(guest: &dyn GuestRam, r: &Received) -> bool {
    let blocks = guest.blocks();
    let image = r.image.blocks();
    if blocks.len() != image.len() {
        return false;
    }
    let mut page = [0u8; xbzrle::PAGE_SIZE];
    for (i, (b, d)) in blocks.iter().zip(image).enumerate() {
        if b.name != d.name() || b.used_length != d.len() {
            return false;
        }
        for (p, chunk) in d.data().chunks_exact(xbzrle::PAGE_SIZE).enumerate() {
            if guest.read_page(i, p as u64, &mut page).is_err() || page[..] != chunk[..] {
                return false;
            }
        }
    }
    true
}

/// The receiving thread of an in-process destination.
pub(crate) type DestinationThread = std::thread::JoinHandle<Result<Received, IncomingError>>;

/// Starts an in-process destination listening on a loopback TCP port, receiving in a
/// thread of its own; returns the URI to migrate to and that thread, or `None` after
/// printing why it could not start.
pub(crate) fn spawn_local_destination() -> Option<(String, DestinationThread)> {
    let l = match IncomingListener::bind("tcp:127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("precopy migrate: {e}");
            return None;
        }
    };
    let uri = l.local_uri();
    let d = Destination::new();
    match std::thread::Builder::new()
        .name("destination".into())
        .spawn(move || d.accept_and_receive(l, Limits::default()))
    {
        Ok(t) => Some((uri, t)),
        Err(e) => {
            eprintln!("precopy migrate: cannot start the destination: {e}");
            None
        }
    }
}

/// `precopy migrate`.
pub(crate) fn run(args: MigrateArgs) -> ExitCode {
    if let Some(Err(e)) = args.to.as_deref().map(str::parse::<MigrationUri>) {
        eprintln!("precopy migrate: {e}");
        return ExitCode::FAILURE;
    }
    if args.guest == GuestKind::Kvm {
        return crate::kvm_guest::migrate(&args);
    }
    let guest = match SimGuest::new(SimConfig {
        blocks: vec![("pc.ram".into(), args.mem)],
        workload: args.workload,
        dirty_rate: args.dirty_rate,
        vcpus: args.vcpus,
        seed: args.seed,
        initial_zero_percent: 25,
    }) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            eprintln!("precopy migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let m = Migrator::new(guest.clone());
    if !configure(&m, &args) {
        return ExitCode::FAILURE;
    }
    // In-process destination unless --to was given.
    let (uri, dest) = match &args.to {
        Some(u) => (u.clone(), None),
        None => match spawn_local_destination() {
            Some((uri, t)) => (uri, Some(t)),
            None => return ExitCode::FAILURE,
        },
    };
    if !args.json {
        eprintln!(
            "migrating {} guest ({} workload, {} pages/s dirty rate) to {uri} (xbzrle backend {:?})",
            mib(args.mem),
            args.workload,
            args.dirty_rate,
            xbzrle::Codec::new().backend()
        );
    }
    if let Err(e) = m.start(&uri) {
        eprintln!("precopy migrate: {e}");
        return ExitCode::FAILURE;
    }
    let info = follow(&m, args.mem, args.json);
    let completed = info.status == MigrationStatus::Completed;
    let verified = match dest {
        Some(t) => match t.join() {
            Ok(Ok(r)) => Some(completed && same_ram(&*guest, &r)),
            Ok(Err(e)) => {
                eprintln!("destination: {e}");
                Some(false)
            }
            Err(_) => Some(false),
        },
        None if !completed => Some(false),
        None => verify_file(&args, &guest, completed),
    };
    if args.json {
        println!("{}", json_line(&info, verified));
    } else {
        print_summary(&info, &m.parameters(), &m.capabilities(), verified);
    }
    if completed && verified != Some(false) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// For `--to file:PATH`, load the file back and compare; other remote URIs are verified by
/// the destination process.
fn verify_file(args: &MigrateArgs, guest: &SimGuest, completed: bool) -> Option<bool> {
    let path = args.to.as_deref()?.strip_prefix("file:")?;
    if !completed {
        return Some(false);
    }
    let d = Destination::new();
    Some(match std::fs::File::open(path) {
        Ok(f) => match d.receive(std::io::BufReader::new(f), Limits::default()) {
            Ok(r) => same_ram(guest, &r),
            Err(e) => {
                eprintln!("verify {path}: {e}");
                false
            }
        },
        Err(e) => {
            eprintln!("verify {path}: {e}");
            false
        }
    })
}

/// `precopy incoming URI`.
pub(crate) fn run_incoming(args: IncomingArgs) -> ExitCode {
    if args.guest == GuestKind::Kvm {
        return crate::kvm_guest::incoming(&args);
    }
    let limits = Limits {
        max_ram_bytes: args.max_ram,
        ..Limits::default()
    };
    let l = match IncomingListener::bind(&args.uri) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("precopy incoming: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("precopy incoming: waiting on {}", l.local_uri());
    let d = Destination::new().with_verify(args.verify.on());
    let r = d.accept_and_receive(l, limits);
    let ok = r.is_ok();
    if args.json {
        let v = match &r {
            Ok(r) => serde_json::json!({
                "status": "completed",
                "total-time": r.total_time_ms,
                "bytes": r.bytes,
                "ram-total": r.image.total_bytes(),
                "zero-pages": r.stats.zero.count,
                "normal-pages": r.stats.page.count,
                "xbzrle-pages": r.stats.xbzrle.count,
                "digest": r.digest,
                "verified": r.verified.then_some(true),
            }),
            Err(e) => serde_json::json!({
                "status": "failed",
                "error-desc": e.to_string(),
                "bytes": d.bytes_received(),
                "verified": false,
            }),
        };
        println!("{v}");
    } else {
        match &r {
            Ok(r) => {
                println!("Migration status: completed");
                println!("total time: {} ms", r.total_time_ms);
                println!("received: {} kbytes", r.bytes / 1024);
                println!("total ram: {} kbytes", r.image.total_bytes() / 1024);
                println!(
                    "pages: {} zero, {} normal, {} xbzrle",
                    r.stats.zero.count, r.stats.page.count, r.stats.xbzrle.count
                );
                if r.verified {
                    println!("verified: yes (RAM digest blake3 {})", r.digest);
                } else {
                    println!(
                        "verified: not checked (--verify off; RAM digest blake3 {})",
                        r.digest
                    );
                }
            }
            Err(e) => {
                println!("Migration status: failed");
                println!("error: {e}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(
            parse_size("1.5G")
                .unwrap_err()
                .contains("fractions are not accepted")
        );
    }
}
