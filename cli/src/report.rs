//! What the commands print: the `info migrate`-style summary, the `--json` lines (one error
//! key everywhere: QEMU's `error-desc`), writing to stdout, exit codes.

use std::io::{self, Write as _};
use std::process::ExitCode;

use precopy_engine::{Capabilities, MigrationInfo, MigrationParameters, MigrationStatus};

/// The JSON key every command uses for why it failed: QEMU's `error-desc` (query-migrate).
pub(crate) const ERROR_KEY: &str = "error-desc";

/// `bytes` in MiB with one decimal, for messages.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// `b` bytes in whole KiB, as `info migrate` prints kbytes.
pub(crate) fn kib(b: u64) -> u64 {
    b / 1024
}

/// Print a summary in the manner of QEMU's `info migrate`.
pub(crate) fn print_summary(
    info: &MigrationInfo,
    params: &MigrationParameters,
    caps: &Capabilities,
    verified: Option<bool>,
    verify_error: Option<&str>,
) {
    let onoff = |b: bool| if b { "on" } else { "off" };
    println!(
        "capabilities: xbzrle: {} auto-converge: {} x-parallel-encoding: {} multifd: {}",
        onoff(caps.xbzrle),
        onoff(caps.auto_converge),
        onoff(caps.x_parallel_encoding),
        onoff(caps.multifd)
    );
    if caps.multifd {
        println!("multifd-channels: {}", params.multifd_channels);
    }
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
        if caps.multifd {
            println!("multifd: {} kbytes", kib(r.multifd_bytes));
        }
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
    crate::compression::print_page_compression(info);
    if info.status != MigrationStatus::Completed {
        println!(
            "verified: no (the migration {}, nothing to verify)",
            info.status
        );
        return;
    }
    match verified {
        _ if verify_error.is_some() => println!(
            "verified: NO (the destination's RAM could not be read back: {})",
            verify_error.unwrap_or_default()
        ),
        Some(true) => println!("verified: yes (destination RAM equals source RAM)"),
        Some(false) => println!("verified: NO (destination RAM differs from source RAM)"),
        None => println!("verified: by the destination (see `precopy incoming`)"),
    }
}

/// The `--json` object of `precopy migrate`: the query-migrate object (its failure reason
/// under `error-desc`) plus `"verified"` (true/false when this process verified, null when
/// only an external destination can).
pub(crate) fn migrate_json(info: &MigrationInfo, verified: Option<bool>) -> serde_json::Value {
    let mut v = serde_json::to_value(info).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("verified".into(), serde_json::json!(verified));
    }
    v
}

/// The `--json` object of a command that failed before it had anything else to report:
/// `{"status": "failed", "error-desc": why, "verified": false}`.
pub(crate) fn failed_json(why: &str) -> serde_json::Value {
    serde_json::json!({ "status": "failed", ERROR_KEY: why, "verified": false })
}

/// `SUCCESS` when `ok`, else `FAILURE` (exit status 1).
pub(crate) fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error. `who` names the
/// command in the message printed when writing fails otherwise.
pub(crate) fn emit(who: &str, text: &str) -> ExitCode {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{who}: writing the report: {e}");
            ExitCode::FAILURE
        }
    }
}
