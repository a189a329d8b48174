//! `precopy snapshot`: incremental memory snapshots of the simulated guest (`take`), and
//! chain restore and merge of snapshot files written by any VMM using
//! `precopy_engine::snapshot` (`restore`, `merge`).
//!
//! `take` writes `DIR/snap-000.full` (mapped-ram) then `DIR/snap-NNN.diff` every
//! `--interval` while the guest runs, and finally checks that the chain restores exactly the
//! guest's RAM at the last snapshot (the guest is left stopped after each snapshot only long
//! enough to allow that check at the end).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use precopy_engine::snapshot::{
    SnapshotOptions, SnapshotStats, Snapshotter, merge_chain, restore_chain,
};
use precopy_engine::vmdesc::image_digest;
use precopy_engine::{SimConfig, SimGuest, SimWorkload, VcpuControl};
use precopy_stream::Limits;

use crate::report::{ERROR_KEY, exit_code};
use crate::size::parse_size;

/// Arguments of `precopy snapshot`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Subcommand, Debug, Clone)]
enum SnapshotCommand {
    /// Run the simulated guest and take a full snapshot, then a diff snapshot every
    /// --interval, --count snapshots in all; verify the chain against the guest at the end.
    Take {
        /// Folder for the files (snap-000.full, snap-001.diff, ...).
        #[arg(long)]
        dir: PathBuf,
        /// Snapshots in all (1 = the full one only).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Time between snapshots, ms.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Guest RAM size.
        #[arg(long, value_parser = parse_size, default_value = "256M")]
        mem: u64,
        /// Pages the guest dirties per second.
        #[arg(long, default_value_t = 20_000)]
        dirty_rate: u64,
        /// Workload of the simulated guest.
        #[arg(long, default_value = "hotset")]
        workload: SimWorkload,
        /// vCPUs (writer threads).
        #[arg(long, default_value_t = 2)]
        vcpus: usize,
        /// Seed of the guest.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Budget of the XBZRLE cache of the chain's pages (bytes; 0 = no XBZRLE).
        #[arg(long, value_parser = parse_size, default_value = "64M")]
        xbzrle_cache_size: u64,
        /// One JSON object per snapshot, then one for the check.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild RAM from a full snapshot and its diffs, in order; print its digest.
    Restore {
        /// The full snapshot.
        base: PathBuf,
        /// Diff snapshots, oldest first.
        diffs: Vec<PathBuf>,
        /// Write the RAM, blocks one after the other, to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Largest RAM a file may declare (bytes).
        #[arg(long, value_parser = parse_size, default_value = "16G")]
        max_ram: u64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Merge a full snapshot and its diffs into one full snapshot (mapped-ram).
    Merge {
        /// The full snapshot.
        base: PathBuf,
        /// Diff snapshots, oldest first.
        diffs: Vec<PathBuf>,
        /// The merged file.
        #[arg(long)]
        out: PathBuf,
        /// Largest RAM a file may declare (bytes).
        #[arg(long, value_parser = parse_size, default_value = "16G")]
        max_ram: u64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

fn fail(json: bool, why: &str) -> ExitCode {
    eprintln!("precopy snapshot: {why}");
    if json {
        println!(
            "{}",
            serde_json::json!({ "status": "failed", ERROR_KEY: why })
        );
    }
    ExitCode::FAILURE
}

fn print_stats(json: bool, label: &str, path: &std::path::Path, st: &SnapshotStats) {
    if json {
        let mut v = serde_json::to_value(st).unwrap_or_default();
        v["file"] = path.display().to_string().into();
        v["kind"] = label.into();
        println!("{v}");
    } else {
        println!(
            "{} #{} {}: {} ms, pause {} us, {} live + {} final pages, {} zero / {} raw / {} xbzrle, {} bytes ({} on disk)",
            label,
            st.sequence,
            path.display(),
            st.total_ms,
            st.pause_us,
            st.live_pages,
            st.final_pages,
            st.zero,
            st.raw,
            st.xbzrle,
            st.file_bytes,
            st.disk_bytes
        );
    }
}

/// `precopy snapshot`.
pub(crate) fn run(args: SnapshotArgs) -> ExitCode {
    match args.command {
        SnapshotCommand::Take {
            dir,
            count,
            interval_ms,
            mem,
            dirty_rate,
            workload,
            vcpus,
            seed,
            xbzrle_cache_size,
            json,
        } => {
            let guest = match SimGuest::new(SimConfig {
                blocks: vec![("pc.ram".into(), mem)],
                workload,
                dirty_rate,
                vcpus,
                seed,
                initial_zero_percent: 25,
            }) {
                Ok(g) => g,
                Err(e) => return fail(json, &e.to_string()),
            };
            if let Err(e) = std::fs::create_dir_all(&dir) {
                return fail(json, &format!("{}: {e}", dir.display()));
            }
            // A new chain never mixes with an old one: refuse a folder that holds one.
            let old: Vec<String> = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with("snap-"))
                        .collect()
                })
                .unwrap_or_default();
            if !old.is_empty() {
                return fail(
                    json,
                    &format!(
                        "{} already holds snapshot files ({}): use an empty folder",
                        dir.display(),
                        old.join(", ")
                    ),
                );
            }
            let mut s = match Snapshotter::new(
                &guest,
                SnapshotOptions {
                    xbzrle_cache_bytes: xbzrle_cache_size,
                    resume: false,
                },
            ) {
                Ok(s) => s,
                Err(e) => return fail(json, &e.to_string()),
            };
            let base = dir.join("snap-000.full");
            let mut diffs = Vec::new();
            for i in 0..count.max(1) {
                if i > 0 {
                    let _ = guest.resume();
                    std::thread::sleep(Duration::from_millis(interval_ms));
                }
                let path = if i == 0 {
                    base.clone()
                } else {
                    dir.join(format!("snap-{i:03}.diff"))
                };
                let r = if i == 0 { s.full(&path) } else { s.diff(&path) };
                match r {
                    Ok(st) => print_stats(json, if i == 0 { "full" } else { "diff" }, &path, &st),
                    Err(e) => return fail(json, &e.to_string()),
                }
                if i > 0 {
                    diffs.push(path);
                }
            }
            // The guest is stopped at its last snapshot: the chain must rebuild its RAM.
            let limits = Limits {
                max_ram_bytes: u64::MAX,
                ..Limits::default()
            };
            let ok = match restore_chain(&base, &diffs, &limits) {
                Ok(r) => {
                    let snap = guest.snapshot();
                    r.image
                        .blocks()
                        .iter()
                        .zip(&snap)
                        .all(|(b, s)| b.data() == &s[..])
                }
                Err(e) => return fail(json, &e.to_string()),
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"status": "completed", "verified": ok})
                );
            } else {
                println!(
                    "verified: {} (chain of {} restores the guest's RAM)",
                    if ok { "yes" } else { "NO" },
                    diffs.len() + 1
                );
            }
            exit_code(ok)
        }
        SnapshotCommand::Restore {
            base,
            diffs,
            out,
            max_ram,
            json,
        } => {
            let limits = Limits {
                max_ram_bytes: max_ram,
                ..Limits::default()
            };
            let r = match restore_chain(&base, &diffs, &limits) {
                Ok(r) => r,
                Err(e) => return fail(json, &e.to_string()),
            };
            if let Some(o) = &out {
                let mut bytes = Vec::new();
                for b in r.image.blocks() {
                    bytes.extend_from_slice(b.data());
                }
                if let Err(e) = std::fs::write(o, bytes) {
                    return fail(json, &format!("{}: {e}", o.display()));
                }
            }
            let digest = image_digest(&r.image);
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "status": "completed",
                        "id": r.id.to_hex(),
                        "sequence": r.sequence,
                        "ram-total": r.image.total_bytes(),
                        "digest": digest,
                        "device-sections": r.device_states.len(),
                    })
                );
            } else {
                println!(
                    "restored snapshot {} (#{}): {} bytes of RAM, digest blake3 {digest}",
                    r.id.to_hex(),
                    r.sequence,
                    r.image.total_bytes()
                );
            }
            ExitCode::SUCCESS
        }
        SnapshotCommand::Merge {
            base,
            diffs,
            out,
            max_ram,
            json,
        } => {
            let limits = Limits {
                max_ram_bytes: max_ram,
                ..Limits::default()
            };
            // Never overwrite a file of the chain being merged.
            let same = |a: &std::path::Path| {
                std::fs::canonicalize(a)
                    .ok()
                    .is_some_and(|a| std::fs::canonicalize(&out).ok().is_some_and(|o| o == a))
            };
            if same(&base) || diffs.iter().any(|d| same(d)) {
                return fail(
                    json,
                    &format!("--out {} is one of the files being merged", out.display()),
                );
            }
            match merge_chain(&base, &diffs, &out, &limits) {
                Ok(st) => {
                    print_stats(json, "merged", &out, &st);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(json, &e.to_string()),
            }
        }
    }
}
