//! `precopy relay --from URI --to URI`: accept one migration from a QEMU source, forward it
//! to a QEMU destination (started with `-incoming`), re-encoding every RAM page record with
//! our writer (`precopy_engine::relay`), and report what moved.

use std::process::ExitCode;

use std::io::{self, Write};

use precopy_engine::{
    IncomingListener, MigrationUri, Outgoing, RelayError, RelayFailure, RelayOptions, RelaySide,
    RelayStats, relay,
};
use precopy_stream::Limits;
use serde_json::{Map, Value, json};

use crate::args::RelayArgs;
use crate::report::{ERROR_KEY, kib};

/// `precopy relay`. Exit status 0 when the whole stream was relayed, 1 otherwise (the
/// message says which side failed).
pub(crate) fn run(args: RelayArgs) -> ExitCode {
    let opts = RelayOptions {
        xbzrle: args.xbzrle.on(),
        limits: Limits {
            max_ram_bytes: args.max_ram,
            ..Limits::default()
        },
    };
    // A destination URI that cannot work is refused before anyone connects.
    if let Err(e) = args.to.parse::<MigrationUri>() {
        let why = format!("destination: {e}");
        return report(&args, Err((Some(RelaySide::Destination), why, None)));
    }
    let l = match IncomingListener::bind(&args.from) {
        Ok(l) => l,
        Err(e) => return report(&args, Err((Some(RelaySide::Source), e.to_string(), None))),
    };
    eprintln!("precopy relay: waiting for a source on {}", l.local_uri());
    let source = match l.accept() {
        Ok(s) => s,
        Err(e) => return report(&args, Err((Some(RelaySide::Source), e.to_string(), None))),
    };
    // The destination is connected at the relay's first write, once the source's stream
    // has shown a valid header, configuration and RAM setup (the first 256 KiB of output
    // or the whole stream): a port probe or a stray connection on --from never reaches a
    // QEMU destination, which would give up on a stream that is not one.
    let mut dest = LazyDestination {
        uri: args.to.clone(),
        out: None,
    };
    let r = match relay(source, &mut dest, &opts) {
        // Flush and close our side, and wait for the destination to close its end.
        Ok(stats) => match dest.out.take().map(Outgoing::finish).transpose() {
            Ok(_) => Ok(stats),
            Err(e) => Err(RelayFailure {
                error: RelayError::Destination {
                    bytes: stats.bytes_out,
                    source: e,
                },
                stats: Box::new(stats),
            }),
        },
        Err(f) => Err(f),
    };
    // Both connections are closed by now (the source's when `relay` returned): on a
    // failure the destination sees its stream cut, the source its writes fail.
    report(
        &args,
        r.map_err(|f| (f.error.side(), f.error.to_string(), Some(*f.stats))),
    )
}

/// The destination, connected at the first write.
struct LazyDestination {
    uri: String,
    out: Option<Outgoing>,
}

impl LazyDestination {
    fn get(&mut self) -> io::Result<&mut Outgoing> {
        if self.out.is_none() {
            let o = Outgoing::open(&self.uri).map_err(io::Error::other)?;
            eprintln!("precopy relay: connected to {}", self.uri);
            self.out = Some(o);
        }
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("no destination"))
    }
}

impl Write for LazyDestination {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.get()?.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}

type Outcome = Result<RelayStats, (Option<RelaySide>, String, Option<RelayStats>)>;

/// Prints the outcome (text, or one JSON line with `--json`) and returns the exit status.
fn report(args: &RelayArgs, r: Outcome) -> ExitCode {
    let (status, side, error, stats) = match r {
        Ok(s) => ("completed", None, None, s),
        Err((side, e, s)) => ("failed", side, Some(e), s.unwrap_or_default()),
    };
    if let Some(e) = &error {
        eprintln!("precopy relay: {e}");
    }
    if args.json {
        let mut o = Map::new();
        o.insert("status".into(), json!(status));
        if let Some(e) = &error {
            o.insert(ERROR_KEY.into(), json!(e));
        }
        o.insert("failed-side".into(), json!(side));
        o.insert("xbzrle".into(), json!(args.xbzrle.on()));
        if let Ok(Value::Object(s)) = serde_json::to_value(&stats) {
            o.extend(s);
        }
        println!("{}", Value::Object(o));
    } else {
        println!("Relay status: {status}");
        if let Some(e) = &error {
            println!("error: {e}");
        }
        println!(
            "received: {} kbytes, sent: {} kbytes ({:.1} % of received)",
            kib(stats.bytes_in),
            kib(stats.bytes_out),
            100.0 * stats.bytes_out as f64 / stats.bytes_in.max(1) as f64
        );
        let p = |c: &precopy_engine::relay::PageCounts| {
            format!("{} zero, {} normal, {} xbzrle", c.zero, c.normal, c.xbzrle)
        };
        println!("pages in: {}", p(&stats.pages_in));
        println!(
            "pages out: {}, {} skipped (unchanged)",
            p(&stats.pages_out),
            stats.pages_out.skipped
        );
        if args.xbzrle.on() {
            println!(
                "xbzrle: {} first sends (whole), {} overflows, {} kbytes",
                stats.xbzrle_cache_miss,
                stats.xbzrle_overflow,
                kib(stats.xbzrle_bytes)
            );
        }
        println!(
            "device state: {} bytes in {} sections, forwarded unchanged",
            stats.device_state_bytes, stats.device_sections
        );
        println!("total time: {} ms", stats.total_time_ms);
    }
    if error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
