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
