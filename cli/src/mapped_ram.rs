//! mapped-ram files in the CLI: `precopy inspect` of one (blocks, pages present, zero holes,
//! per-block SHA-256), `precopy migrate --to file:PATH --mapped-ram on` and
//! `precopy incoming file:PATH` of one. The format is `precopy_stream::mapped_ram`.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;

use precopy_stream::Limits;
use precopy_stream::mapped_ram::MappedRamFile;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::args::InspectArgs;
use crate::report::{ERROR_KEY, emit};

const WHO: &str = "precopy inspect";

#[derive(Serialize)]
struct BlockReport {
    name: String,
    length: u64,
    pages: u64,
    pages_present: u64,
    zero_holes: u64,
    header_offset: u64,
    bitmap_offset: u64,
    pages_offset: u64,
    sha256: String,
}

#[derive(Serialize)]
struct SectionReport {
    offset: u64,
    name: String,
    instance_id: u32,
    version_id: u32,
    /// Payload bytes of one of our sections; null for a QEMU device section (not parsed).
    length: Option<usize>,
}

#[derive(Serialize)]
struct Report {
    file: String,
    format: &'static str,
    machine_type: String,
    capabilities: Vec<String>,
    file_length: u64,
    disk_usage: u64,
    ram_bytes: u64,
    pages_present: u64,
    zero_holes: u64,
    blocks: Vec<BlockReport>,
    ram_end: u64,
    sections: Vec<SectionReport>,
    eof: bool,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of every block of `m` read from `f`, holes as zeros, 1 MiB at a time.
pub(crate) fn block_digests(
    m: &MappedRamFile,
    f: &File,
) -> Result<Vec<String>, precopy_stream::Error> {
    (0..m.blocks.len())
        .map(|i| {
            let mut h = Sha256::new();
            m.for_each_chunk(f, i, |c| h.update(c))?;
            Ok(hex(&h.finalize()))
        })
        .collect()
}

fn report(args: &InspectArgs, f: &File) -> Result<Report, (String, Option<u64>)> {
    let name = args.file.display().to_string();
    let limits = Limits {
        max_ram_bytes: args.max_ram,
        ..Limits::default()
    };
    let at = |e: precopy_stream::Error| (format!("{name}: {e}"), Some(e.offset()));
    let m = MappedRamFile::parse(f, &limits).map_err(at)?;
    let digests = block_digests(&m, f).map_err(at)?;
    let meta = f.metadata().map_err(|e| (format!("{name}: {e}"), None))?;
    let blocks: Vec<BlockReport> = m
        .blocks
        .iter()
        .zip(digests)
        .map(|(b, sha256)| BlockReport {
            name: b.info.name.clone(),
            length: b.info.used_length,
            pages: b.pages(),
            pages_present: b.present_pages(),
            zero_holes: b.pages() - b.present_pages(),
            header_offset: b.header_offset,
            bitmap_offset: b.header.bitmap_offset,
            pages_offset: b.header.pages_offset,
            sha256,
        })
        .collect();
    Ok(Report {
        file: name,
        format: "mapped-ram",
        machine_type: m.machine_type.clone(),
        capabilities: m.capabilities.clone(),
        file_length: m.file_len,
        disk_usage: meta.blocks() * 512,
        ram_bytes: m.total_bytes(),
        pages_present: blocks.iter().map(|b| b.pages_present).sum(),
        zero_holes: blocks.iter().map(|b| b.zero_holes).sum(),
        blocks,
        ram_end: m.ram_end,
        sections: m
            .sections
            .iter()
            .map(|s| SectionReport {
                offset: s.offset,
                name: s.name.clone(),
                instance_id: s.instance_id,
                version_id: s.version_id,
                length: s.payload.as_ref().map(Vec::len),
            })
            .collect(),
        eof: m.saw_eof,
    })
}

fn render_text(r: &Report) -> String {
    let mut o = String::new();
    let mut put = |s: String| {
        o.push_str(&s);
        o.push('\n');
    };
    put(format!("file: {} (format: mapped-ram)", r.file));
    put(format!(
        "machine type: {}, capabilities: {}",
        r.machine_type,
        r.capabilities.join(", ")
    ));
    put(format!(
        "file length: {} bytes, disk usage: {} bytes, RAM: {} bytes",
        r.file_length, r.disk_usage, r.ram_bytes
    ));
    put(format!(
        "pages present: {}, zero holes: {}",
        r.pages_present, r.zero_holes
    ));
    put(format!("RAM blocks: {}", r.blocks.len()));
    let w = r
        .blocks
        .iter()
        .map(|b| b.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    for b in &r.blocks {
        put(format!(
            "  {:<w$}  {:>12} bytes  {:>9} present  {:>9} holes  bitmap@{} pages@{}  {}",
            b.name,
            b.length,
            b.pages_present,
            b.zero_holes,
            b.bitmap_offset,
            b.pages_offset,
            b.sha256
        ));
    }
    for s in &r.sections {
        match s.length {
            Some(n) => put(format!(
                "device section {} (instance {}, version {}) at byte {}: {} bytes",
                s.name, s.instance_id, s.version_id, s.offset, n
            )),
            None => put(format!(
                "stopped at byte {}: device section '{}' (instance {}, version {}) not parsed (QEMU device state)",
                s.offset, s.name, s.instance_id, s.version_id
            )),
        }
    }
    if r.eof {
        put("end of stream (EOF)".to_owned());
    }
    o
}

/// `precopy inspect` of a mapped-ram file: `None` when FILE is not one (or is stdin, or
/// cannot be opened: the stream path reports that), so the stream inspector runs.
pub(crate) fn inspect(args: &InspectArgs) -> Option<ExitCode> {
    if args.file.as_os_str() == "-" {
        return None;
    }
    let f = File::open(&args.file).ok()?;
    if !MappedRamFile::sniff(&f) {
        return None;
    }
    Some(match report(args, &f) {
        Ok(r) if args.json => match serde_json::to_string_pretty(&r) {
            Ok(s) => emit(WHO, &(s + "\n")),
            Err(e) => {
                eprintln!("{WHO}: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(r) => emit(WHO, &render_text(&r)),
        Err((msg, offset)) => {
            eprintln!("{WHO}: {msg}");
            if args.json {
                emit(
                    WHO,
                    &format!(
                        "{}\n",
                        serde_json::json!({ ERROR_KEY: msg, "offset": offset })
                    ),
                );
            }
            ExitCode::FAILURE
        }
    })
}

/// `precopy migrate --mapped-ram on --to file:PATH`: the simulated guest saved live into a
/// mapped-ram file (pages copied while it runs, parallel positional writes, zero pages as
/// holes, then a pause for the final dirty pass; the guest stays stopped afterwards, as a
/// QEMU source does). Verified by reading the file back against the stopped guest's RAM.
pub(crate) fn migrate(args: &crate::args::MigrateArgs) -> Result<ExitCode, String> {
    use precopy_engine::snapshot::{SnapshotOptions, Snapshotter, load_full};
    use precopy_engine::{MigrationUri, SimConfig, SimGuest};

    if args.guest != crate::args::GuestKind::Sim {
        return Err("--mapped-ram on: only --guest sim is supported".into());
    }
    let path = match args.to.as_deref().map(str::parse::<MigrationUri>) {
        Some(Ok(MigrationUri::File(p))) => p,
        _ => return Err("--mapped-ram on needs --to file:PATH (a seekable file)".into()),
    };
    let guest = SimGuest::new(SimConfig {
        blocks: vec![("pc.ram".into(), args.mem)],
        workload: args.workload,
        dirty_rate: args.dirty_rate,
        vcpus: args.vcpus,
        seed: args.seed,
        initial_zero_percent: 25,
    })
    .map_err(|e| e.to_string())?;
    if !args.json {
        eprintln!(
            "saving {} guest ({} workload, {} pages/s) to {} (mapped-ram)",
            crate::report::mib(args.mem),
            args.workload,
            args.dirty_rate,
            path.display()
        );
    }
    let mut s = Snapshotter::new(
        &guest,
        SnapshotOptions {
            xbzrle_cache_bytes: 0,
            resume: false,
        },
    )
    .map_err(|e| e.to_string())?;
    let st = s.full(&path).map_err(|e| e.to_string())?;
    let limits = Limits {
        max_ram_bytes: u64::MAX,
        ..Limits::default()
    };
    let verified = match load_full(&path, &limits) {
        Ok(r) => {
            let snap = guest.snapshot();
            r.image.blocks().len() == snap.len()
                && r.image
                    .blocks()
                    .iter()
                    .zip(&snap)
                    .all(|(b, s)| b.data() == &s[..])
        }
        Err(e) => {
            eprintln!("precopy migrate: {e}");
            false
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "status": "completed",
                "total-time": st.total_ms,
                "downtime": st.pause_us / 1000,
                "downtime-us": st.pause_us,
                "mapped-ram": true,
                "ram": {"total": args.mem, "normal": st.raw, "duplicate": st.zero},
                "file-bytes": st.file_bytes,
                "disk-usage": st.disk_bytes,
                "verified": verified,
            })
        );
    } else {
        println!("capabilities: mapped-ram: on");
        println!("Migration status: completed");
        println!("total time: {} ms", st.total_ms);
        println!("downtime: {} ms ({} us)", st.pause_us / 1000, st.pause_us);
        println!(
            "pages: {} written, {} zero (holes); {} copied live, {} in the final pass",
            st.raw, st.zero, st.live_pages, st.final_pages
        );
        println!(
            "file: {} bytes long, {} bytes on disk (RAM {} bytes)",
            st.file_bytes, st.disk_bytes, args.mem
        );
        println!("verified: {}", if verified { "yes" } else { "NO" });
    }
    Ok(crate::report::exit_code(verified))
}

/// `precopy incoming file:PATH` of a mapped-ram file: `None` when URI is not `file:` or the
/// file is not mapped-ram (the stream path handles it). Loads the RAM (simulated guest),
/// checks the digest of our VM description unless `--verify off` (a QEMU file has none).
pub(crate) fn incoming(args: &crate::args::IncomingArgs) -> Option<ExitCode> {
    use precopy_engine::MigrationUri;
    use precopy_engine::snapshot::read_mapped_ram;
    use precopy_engine::vmdesc::{digest_from_vm_description, image_digest};

    let Ok(MigrationUri::File(path)) = args.uri.parse::<MigrationUri>() else {
        return None;
    };
    let f = File::open(&path).ok()?;
    if !MappedRamFile::sniff(&f) {
        return None;
    }
    let t0 = std::time::Instant::now();
    if args.guest != crate::args::GuestKind::Sim {
        return Some(crate::incoming::failed(
            args,
            "a mapped-ram file loads into --guest sim only",
            0,
        ));
    }
    let limits = Limits {
        max_ram_bytes: args.max_ram,
        ..Limits::default()
    };
    let m = match MappedRamFile::parse(&f, &limits) {
        Ok(m) => m,
        Err(e) => {
            return Some(crate::incoming::failed(
                args,
                &format!("{}: {e}", path.display()),
                0,
            ));
        }
    };
    let image = match read_mapped_ram(&m, &f, &path, &limits) {
        Ok(i) => i,
        Err(e) => return Some(crate::incoming::failed(args, &e.to_string(), 0)),
    };
    let saved = match &args.save_ram {
        None => Vec::new(),
        Some(dir) => match crate::save_ram::save_ram(&image, dir) {
            Ok(s) => s,
            Err(e) => return Some(crate::incoming::failed(args, &e, m.file_len)),
        },
    };
    let digest = image_digest(&image);
    let expected = m
        .vm_description
        .as_deref()
        .and_then(|j| serde_json::from_slice::<serde_json::Value>(j).ok())
        .and_then(|d| digest_from_vm_description(&d).map(str::to_owned));
    let verified = match (args.verify.on(), &expected) {
        (false, _) => None,
        (true, Some(e)) => Some(*e == digest),
        (true, None) => {
            return Some(crate::incoming::failed(
                args,
                "the mapped-ram file carries no RAM digest (a QEMU file): load it with --verify off",
                m.file_len,
            ));
        }
    };
    let present: u64 = m.blocks.iter().map(|b| b.present_pages()).sum();
    let pages: u64 = m.blocks.iter().map(|b| b.pages()).sum();
    let ms = t0.elapsed().as_millis() as u64;
    let status = if verified == Some(false) {
        "failed"
    } else {
        "completed"
    };
    if args.json {
        let mut v = serde_json::json!({
            "status": status,
            "total-time": ms,
            "mapped-ram": true,
            "bytes": m.file_len,
            "ram-total": m.total_bytes(),
            "zero-pages": pages - present,
            "normal-pages": present,
            "digest": digest,
            "verified": verified,
        });
        if verified == Some(false) {
            v[ERROR_KEY] = "RAM digest mismatch".into();
        }
        if args.save_ram.is_some() {
            v["ram-files"] = saved
                .iter()
                .map(crate::save_ram::SavedBlock::json)
                .collect();
        }
        println!("{v}");
    } else {
        println!("Migration status: {status}");
        println!("total time: {ms} ms");
        println!(
            "mapped-ram file: {} bytes; total ram: {} kbytes",
            m.file_len,
            m.total_bytes() / 1024
        );
        println!(
            "pages: {} zero (holes), {} normal",
            pages - present,
            present
        );
        for b in &saved {
            println!(
                "saved {} ({} bytes, sha256 {}) to {}",
                b.block,
                b.bytes,
                b.sha256,
                b.path.display()
            );
        }
        match verified {
            Some(true) => println!("verified: yes (RAM digest blake3 {digest})"),
            Some(false) => println!("verified: NO (RAM digest mismatch: blake3 {digest})"),
            None => println!("verified: not checked (--verify off; RAM digest blake3 {digest})"),
        }
    }
    Some(crate::report::exit_code(verified != Some(false)))
}
