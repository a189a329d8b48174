//! `precopy inspect FILE`: read a migration stream (ours or QEMU's) and summarise it.
//!
//! FILE may be `-` (stdin); xz and zstd compressed input is recognised by its
//! magic bytes (so `.xz` / `.zst` files and compressed stdin both work).
//! Reading goes through `precopy_stream::Loader`: RAM is rebuilt block by
//! block and hashed (SHA-256); reading stops at EOF or at the first device
//! section we cannot parse (QEMU's), after which the VM description is
//! located from the end of the stream. Errors print the byte offset and
//! exit with status 1; with `--json` they are `{"error-desc": ..., "offset": ...}`.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::process::ExitCode;

use precopy_stream::{KindStats, Limits, Loader, StopReason, StreamReader, find_vm_description};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::args::InspectArgs;
use crate::report::{ERROR_KEY, emit};

/// Names the command in messages.
const WHO: &str = "precopy inspect";

#[derive(Serialize)]
struct BlockReport {
    name: String,
    length: u64,
    sha256: String,
}

#[derive(Serialize)]
struct Records {
    page: u64,
    zero: u64,
    xbzrle: u64,
    eos: u64,
    mem_size: u64,
}

#[derive(Serialize)]
struct Sections {
    ram_start: u64,
    ram_part: u64,
    ram_end: u64,
    footers: u64,
    precopy_device: u64,
    /// `MIG_CMD_SWITCHOVER_START` commands (QEMU 10.0).
    switchover_start: u64,
}

#[derive(Serialize)]
struct XbzrleReport {
    pages: u64,
    delta_bytes: u64,
    record_bytes: u64,
}

#[derive(Serialize)]
struct SectionReport {
    kind: &'static str,
    name: String,
    section_id: u32,
    instance_id: u32,
    version_id: u32,
}

#[derive(Serialize)]
struct StoppedAt {
    offset: u64,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    section: Option<SectionReport>,
}

#[derive(Serialize)]
struct DeviceReport {
    offset: u64,
    name: String,
    section_id: u32,
    instance_id: u32,
    version_id: u32,
    length: usize,
}

#[derive(Serialize)]
struct VmDescReport {
    /// Offset of the VM description (its 0x06 byte, right after EOF).
    offset: Option<u64>,
    bytes: usize,
    devices: Option<usize>,
    found_by: &'static str,
}

#[derive(Serialize)]
struct Report {
    file: String,
    compression: &'static str,
    version: u32,
    machine_type: Option<String>,
    sections: Sections,
    blocks: Vec<BlockReport>,
    records: Records,
    record_bytes: Records,
    records_with_block_name: u64,
    records_with_continue: u64,
    xbzrle: XbzrleReport,
    bytes: u64,
    stopped_at: StoppedAt,
    device_states: Vec<DeviceReport>,
    vm_description: Option<VmDescReport>,
}

/// The input, decompressed if its first bytes are an xz or zstd magic.
fn open(path: &Path) -> io::Result<(Box<dyn Read>, &'static str)> {
    let raw: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(path)?)
    };
    let mut buf = BufReader::with_capacity(1 << 20, raw);
    let head = buf.fill_buf()?;
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Ok((
            Box::new(xz2::bufread::XzDecoder::new_multi_decoder(buf)),
            "xz",
        ))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok((
            Box::new(zstd::stream::read::Decoder::with_buffer(buf)?),
            "zstd",
        ))
    } else {
        Ok((Box::new(buf), "none"))
    }
}

pub(crate) fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn records(f: impl Fn(&KindStats) -> u64, s: &precopy_stream::LoadStats) -> Records {
    Records {
        page: f(&s.page),
        zero: f(&s.zero),
        xbzrle: f(&s.xbzrle),
        eos: f(&s.eos),
        mem_size: f(&s.mem_size),
    }
}

/// Largest stream tail read past a foreign section to find the VM description.
const MAX_TAIL: usize = 256 << 20;

/// Why inspecting failed, and the stream byte offset when the stream itself was at fault.
struct Failure {
    msg: String,
    offset: Option<u64>,
}

fn inspect(args: &InspectArgs) -> Result<Report, Failure> {
    let name = args.file.display().to_string();
    let at = |e: precopy_stream::Error| Failure {
        msg: format!("{name}: {e}"),
        offset: Some(e.offset()),
    };
    let (input, compression) = open(&args.file).map_err(|e| Failure {
        msg: format!("{name}: {e}"),
        offset: None,
    })?;
    let limits = Limits {
        max_ram_bytes: args.max_ram,
        ..Limits::default()
    };
    let mut reader = StreamReader::new(input, limits);
    let mut loader = Loader::new(limits);
    loader.load_from(&mut reader).map_err(at)?;

    // Past QEMU's device state, the VM description is found from the end.
    let mut vm_description = loader.vm_description().map(|j| VmDescReport {
        offset: None,
        bytes: j.len(),
        devices: count_devices(j),
        found_by: "read after EOF",
    });
    if let Some(StopReason::ForeignSection { .. }) = loader.stop_reason() {
        let (base, rest) = reader.read_rest(MAX_TAIL).map_err(at)?;
        vm_description = find_vm_description(&rest).map(|(eof_at, json)| VmDescReport {
            offset: Some(base + eof_at as u64 + 1),
            bytes: json.len(),
            devices: count_devices(json),
            found_by: "located from the end of the stream",
        });
    }
    let device_states = loader
        .device_states()
        .iter()
        .map(|d| DeviceReport {
            offset: d.offset,
            name: d.name.clone(),
            section_id: d.section_id,
            instance_id: d.instance_id,
            version_id: d.version_id,
            length: d.payload.len(),
        })
        .collect();
    let loaded = loader.finish().map_err(at)?;
    let s = &loaded.stats;
    let blocks = loaded
        .image
        .blocks()
        .iter()
        .map(|b| BlockReport {
            name: b.name().to_owned(),
            length: b.len(),
            sha256: hex(&Sha256::digest(b.data())),
        })
        .collect();
    let stopped_at = match &loaded.stop {
        StopReason::EndOfStream { offset, .. } => StoppedAt {
            offset: *offset,
            reason: "end of stream (EOF)",
            section: None,
        },
        StopReason::ForeignSection {
            offset,
            kind,
            section_id,
            name,
            instance_id,
            version_id,
        } => StoppedAt {
            offset: *offset,
            reason: "device section not parsed (QEMU device state)",
            section: Some(SectionReport {
                kind: kind.name(),
                name: name.clone(),
                section_id: *section_id,
                instance_id: *instance_id,
                version_id: *version_id,
            }),
        },
        _ => StoppedAt {
            offset: loaded.stop.offset(),
            reason: "stopped",
            section: None,
        },
    };
    Ok(Report {
        file: name,
        compression,
        version: loaded.file_version,
        machine_type: loaded.machine_type.clone(),
        sections: Sections {
            ram_start: s.ram_start,
            ram_part: s.ram_part,
            ram_end: s.ram_end,
            footers: s.footers,
            precopy_device: s.device_sections.count,
            switchover_start: s.switchover_start,
        },
        blocks,
        records: records(|k| k.count, s),
        record_bytes: records(|k| k.bytes, s),
        records_with_block_name: s.records_with_block_name,
        records_with_continue: s.records_with_continue,
        xbzrle: XbzrleReport {
            pages: s.xbzrle.count,
            delta_bytes: s.xbzrle_delta_bytes,
            record_bytes: s.xbzrle.bytes,
        },
        bytes: s.bytes,
        stopped_at,
        device_states,
        vm_description,
    })
}

fn count_devices(json: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    Some(v.get("devices")?.as_array()?.len())
}

/// Appends one formatted line to a `String`.
macro_rules! put {
    ($o:expr, $($t:tt)*) => {{
        $o.push_str(&format!($($t)*));
        $o.push('\n');
    }};
}

fn render_text(r: &Report) -> String {
    let mut o = String::new();
    put!(o, "file: {} (compression: {})", r.file, r.compression);
    put!(
        o,
        "version: {}, machine type: {}",
        r.version,
        r.machine_type
            .as_deref()
            .unwrap_or("(no configuration section)")
    );
    put!(
        o,
        "sections: ram START {}, PART {}, END {}; footers {}; precopy device sections {}{}",
        r.sections.ram_start,
        r.sections.ram_part,
        r.sections.ram_end,
        r.sections.footers,
        r.sections.precopy_device,
        match r.sections.switchover_start {
            0 => String::new(),
            n => format!("; switchover-start commands {n}"),
        }
    );
    let total: u64 = r.blocks.iter().map(|b| b.length).sum();
    put!(o, "RAM blocks: {} ({} bytes)", r.blocks.len(), total);
    let w = r
        .blocks
        .iter()
        .map(|b| b.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    for b in &r.blocks {
        put!(o, "  {:<w$}  {:>12}  {}", b.name, b.length, b.sha256);
    }
    put!(o, "records:      count         bytes");
    for (k, c, b) in [
        ("MEM_SIZE", r.records.mem_size, r.record_bytes.mem_size),
        ("ZERO", r.records.zero, r.record_bytes.zero),
        ("PAGE", r.records.page, r.record_bytes.page),
        ("XBZRLE", r.records.xbzrle, r.record_bytes.xbzrle),
        ("EOS", r.records.eos, r.record_bytes.eos),
    ] {
        put!(o, "  {k:<8} {c:>9} {b:>13}");
    }
    put!(
        o,
        "XBZRLE: {} pages, {} delta bytes; records with block name {}, with CONTINUE {}",
        r.xbzrle.pages,
        r.xbzrle.delta_bytes,
        r.records_with_block_name,
        r.records_with_continue
    );
    for d in &r.device_states {
        put!(
            o,
            "device section {} (id {}, instance {}, version {}) at byte {}: {} bytes",
            d.name,
            d.section_id,
            d.instance_id,
            d.version_id,
            d.offset,
            d.length
        );
    }
    match &r.stopped_at.section {
        Some(s) => put!(
            o,
            "stopped at byte {}: {} section '{}' (id {}, instance {}, version {}): {}",
            r.stopped_at.offset,
            s.kind,
            s.name,
            s.section_id,
            s.instance_id,
            s.version_id,
            r.stopped_at.reason
        ),
        None => put!(
            o,
            "stopped at byte {}: {}",
            r.stopped_at.offset,
            r.stopped_at.reason
        ),
    }
    match &r.vm_description {
        Some(v) => put!(
            o,
            "VM description: {} bytes{}{}, {}",
            v.bytes,
            v.offset
                .map(|o| format!(" at byte {o}"))
                .unwrap_or_default(),
            v.devices
                .map(|n| format!(", {n} devices"))
                .unwrap_or_default(),
            v.found_by
        ),
        None => put!(o, "VM description: none"),
    }
    put!(o, "stream bytes read: {}", r.bytes);
    o
}

/// `precopy inspect`. Exit status 1 on any error (printed with its stream byte offset).
pub(crate) fn run(args: InspectArgs) -> ExitCode {
    if let Some(code) = crate::mapped_ram::inspect(&args) {
        return code;
    }
    match inspect(&args) {
        Ok(report) if args.json => match serde_json::to_string_pretty(&report) {
            Ok(s) => emit(WHO, &(s + "\n")),
            Err(e) => {
                eprintln!("precopy inspect: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(report) => emit(WHO, &render_text(&report)),
        Err(Failure { msg, offset }) => {
            eprintln!("precopy inspect: {msg}");
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
    }
}
