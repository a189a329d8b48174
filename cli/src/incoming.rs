//! `precopy incoming URI` (issues 5 and 6): receive one migration straight into the RAM of
//! a guest of the kind asked for, check the RAM digest the source put in the VM description
//! (unless `--verify off`), make the guest from it (a KVM guest is built around its loaded
//! memory and resumed), and report.

use std::process::ExitCode;

use precopy_engine::{Destination, IncomingListener, Received};
use precopy_stream::{Limits, RamTarget};
use serde_json::{Value, json};

use crate::args::IncomingArgs;
use crate::guest_kind::IncomingGuest;
use crate::report::{ERROR_KEY, exit_code, kib};
use crate::save_ram::{SavedBlock, save_ram};

/// `precopy incoming URI`. Exit status 1 when nothing was received, the stream was bad or
/// unverified, or the guest could not be loaded or failed its check.
pub(crate) fn run(args: IncomingArgs) -> ExitCode {
    // A --save-ram folder that cannot be written fails now, not after the source has
    // sent (and stopped) its guest.
    if let Some(dir) = &args.save_ram
        && let Err(e) = crate::save_ram::prepare(dir)
    {
        return failed(&args, &e, 0);
    }
    if let Some(code) = crate::mapped_ram::incoming(&args) {
        return code;
    }
    args.guest.incoming(&args)
}

/// `precopy incoming` into `guest`: the one path of every guest kind.
pub(crate) fn receive<G: IncomingGuest>(args: &IncomingArgs, mut guest: G) -> ExitCode {
    // A multifd source takes a connection per channel, and strays take theirs until they
    // are refused: room for them beyond a soft limit of 1024 open files.
    if let Err(e) = precopy_engine::transport::raise_open_files_limit() {
        eprintln!("precopy incoming: warning: cannot raise the open files limit: {e}");
    }
    let l = match IncomingListener::bind(&args.uri) {
        Ok(l) => l,
        Err(e) => return failed(args, &e.to_string(), 0),
    };
    eprintln!("{}", guest.waiting(&l.local_uri()));
    let limits = Limits {
        max_ram_bytes: args.max_ram,
        ..Limits::default()
    };
    let d = Destination::new().with_verify(args.verify.on());
    // A stray connection (a port scan, a wrong peer) is refused and the wait goes on: say
    // so as it happens, not only in the final report.
    let refusals = d.subscribe_refusals();
    std::thread::spawn(move || {
        for e in refusals {
            eprintln!("precopy incoming: {e}");
        }
    });
    let r = match d.accept_and_receive_into(l, limits, guest.ram()) {
        Ok(r) => r,
        Err(e) => {
            return failed_refused(
                args,
                &e.to_string(),
                d.bytes_received(),
                &d.refused_connections(),
            );
        }
    };
    // What is reported of the stream, taken before the guest takes its RAM.
    let mut v = completed_json(&r);
    let mut lines = summary_lines(&r);
    let saved = match &args.save_ram {
        None => Vec::new(),
        Some(dir) => match save_ram(&r.image, dir) {
            Ok(s) => s,
            Err(e) => return failed(args, &e, r.bytes),
        },
    };
    if let Some(o) = v.as_object_mut()
        && args.save_ram.is_some()
    {
        o.insert(
            "ram-files".into(),
            saved.iter().map(SavedBlock::json).collect(),
        );
    }
    for b in &saved {
        lines.push(format!(
            "saved {} ({} bytes, sha256 {}) to {}",
            b.block,
            b.bytes,
            b.sha256,
            b.path.display()
        ));
    }
    let loaded = guest.load(r.image, &r.device_states);
    // true: digest checked and the guest is good; null: loaded, digest not checked.
    let verified = match &loaded {
        Ok(true) => r.verified.then_some(true),
        Ok(false) | Err(_) => Some(false),
    };
    let error = loaded.err();
    // A guest that could not be built from the stream is a failed migration,
    // whatever the stream itself was.
    let status = if error.is_some() {
        "failed"
    } else {
        "completed"
    };
    if args.json {
        if let Some(o) = v.as_object_mut() {
            o.insert("status".into(), json!(status));
            o.insert("verified".into(), json!(verified));
            guest.add_json(o);
            if let Some(e) = &error {
                eprintln!("precopy incoming: {e}");
                o.insert(ERROR_KEY.into(), json!(e));
            }
        }
        println!("{v}");
    } else {
        println!("Migration status: {status}");
        for l in &lines {
            println!("{l}");
        }
        match (&error, r.verified) {
            (Some(e), _) => println!("verified: NO (the guest could not be built: {e})"),
            (None, true) => println!("verified: yes (RAM digest blake3 {})", r.digest),
            (None, false) => println!(
                "verified: not checked (--verify off; RAM digest blake3 {})",
                r.digest
            ),
        }
        if let Some(e) = &error {
            println!("error: {e}");
        }
        guest.print_details();
    }
    exit_code(verified != Some(false))
}

/// Nothing usable was received: says why (stdout: the summary, or the JSON object with
/// `error-desc` and the message on stderr too) and fails.
pub(crate) fn failed(args: &IncomingArgs, why: &str, bytes: u64) -> ExitCode {
    failed_refused(args, why, bytes, &[])
}

/// As [`failed`], after the destination refused `refused` (listed under
/// `refused-connections` with --json).
fn failed_refused(
    args: &IncomingArgs,
    why: &str,
    bytes: u64,
    refused: &[precopy_engine::ChannelRefused],
) -> ExitCode {
    if args.json {
        eprintln!("precopy incoming: {why}");
        println!(
            "{}",
            json!({
                "status": "failed",
                ERROR_KEY: why,
                "bytes": bytes,
                "verified": false,
                "refused-connections": refused.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        );
    } else {
        println!("Migration status: failed");
        println!("error: {why}");
    }
    ExitCode::FAILURE
}

/// The `--json` object of a received stream, before `verified` and the guest kind's keys.
/// `device-state` (QEMU's device sections, kept as bytes, not loaded): total bytes and one
/// `{"name", "instance-id", "version", "bytes"}` per section; null for our own streams.
fn completed_json<T: RamTarget>(r: &Received<T>) -> Value {
    let device_state = r.foreign_device_state.as_ref().map(|f| {
        json!({
            "bytes": f.bytes.len(),
            "sections": f.sections.iter().map(|s| json!({
                "name": s.name,
                "instance-id": s.instance_id,
                "version": s.version_id,
                "bytes": s.len,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "device-state": device_state,
        "status": "completed",
        "total-time": r.total_time_ms,
        "bytes": r.bytes,
        "ram-total": r.image.total_bytes(),
        "zero-pages": r.stats.zero.count,
        "normal-pages": r.stats.page.count,
        "xbzrle-pages": r.stats.xbzrle.count,
        "digest": r.digest,
        "multifd-channels": r.multifd_channels,
        "refused-connections": r
            .refused_connections
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
    })
}

/// The text summary of a received stream: the lines between the status and
/// the verification line.
fn summary_lines<T: RamTarget>(r: &Received<T>) -> Vec<String> {
    let mut lines = vec![
        format!("total time: {} ms", r.total_time_ms),
        format!("received: {} kbytes", kib(r.bytes)),
        format!("total ram: {} kbytes", kib(r.image.total_bytes())),
        format!(
            "pages: {} zero, {} normal, {} xbzrle",
            r.stats.zero.count, r.stats.page.count, r.stats.xbzrle.count
        ),
    ];
    if r.multifd_channels > 0 {
        lines.push(format!(
            "multifd: main channel and {} page channels",
            r.multifd_channels
        ));
    }
    for refused in &r.refused_connections {
        lines.push(refused.to_string());
    }
    if let Some(f) = &r.foreign_device_state {
        let names: Vec<_> = f.sections.iter().map(|s| s.name.as_str()).collect();
        lines.push(format!(
            "device state: {} bytes in {} QEMU device sections, kept, not loaded ({})",
            f.bytes.len(),
            f.sections.len(),
            names.join(", ")
        ));
    }
    lines
}
