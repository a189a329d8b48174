//! Memory snapshots of a running guest: a full snapshot in QEMU's mapped-ram layout, then
//! incremental diff snapshots of the pages dirtied since the previous one; chain restore and
//! merge. Library API for a VMM (no CLI needed).
//!
//! | file | what it holds |
//! |---|---|
//! | full snapshot | a mapped-ram file ([`precopy_stream::mapped_ram`]): every non-zero page at its fixed offset, zero pages as holes, our device sections, and after EOF a VM description whose `precopy` object holds the RAM digest (BLAKE3, [`crate::vmdesc`]) and `snapshot: {id, sequence: 0}` |
//! | diff snapshot | our [`diff`] format: id, parent id, sequence, then ZERO / XBZRLE / RAW records, device sections, a BLAKE3 trailer |
//!
//! Taking a snapshot ([`Snapshotter`]) copies pages while the guest runs, then stops the
//! vCPUs, fetches the dirty log once more, copies what was dirtied meanwhile into memory
//! (in parallel) with the device state, and resumes: the guest's pause is that copy only;
//! encoding and writing those pages happen after the guest runs again. The dirty log stays on
//! between snapshots, so the next diff holds exactly the pages written since this pause.
//! XBZRLE deltas are against the page as the chain left it, kept in an XBZRLE page cache
//! (`precopy-pagecache`, bounded budget); a page not in the cache goes RAW.
//!
//! Crash safety: every file is written under a temporary name in the same directory,
//! fsynced, renamed over the final name, and the directory fsynced. On restore a diff whose
//! trailer does not match (torn or corrupted) is refused ([`SnapshotError::Torn`]) before any
//! record is applied; a diff whose parent is not the snapshot it is applied onto is refused
//! ([`SnapshotError::WrongBase`]); the full snapshot's RAM digest is checked.

pub mod diff;

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use precopy_pagecache::{PageCache, Policy};
use precopy_stream::mapped_ram::{self, MappedRamFile, MappedRamWriter};
use precopy_stream::{Limits, RamImage};
use rayon::prelude::*;
use xbzrle::{PAGE_SIZE, Page};

use crate::guest::{DeviceStateEntry, Guest, GuestError, RamBlockInfo, block_pages};
use crate::vmdesc;
pub use diff::{DiffFile, DiffRecord, DiffRecordKind};

/// Machine type written in snapshot files.
pub const SNAPSHOT_MACHINE_TYPE: &str = "precopy-snapshot";

/// A snapshot's identity (16 random-ish bytes: time, process, counter, hashed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// A fresh id.
    pub fn new() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = blake3::Hasher::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        h.update(&now.as_nanos().to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        SnapshotId(id)
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(SnapshotId(id))
    }
}

impl Default for SnapshotId {
    fn default() -> Self {
        Self::new()
    }
}

/// Why taking, restoring or merging snapshots failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// An error of one file of a chain ([`restore_chain`], [`merge_chain`]), naming it.
    #[error("{path}: {source}")]
    InFile {
        /// The file (a full snapshot or a diff).
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<SnapshotError>,
    },
    /// The guest failed.
    #[error("guest: {0}")]
    Guest(#[from] GuestError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The mapped-ram full snapshot is malformed.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The reader's error (with its byte offset).
        source: precopy_stream::Error,
    },
    /// Writing the mapped-ram file was refused.
    #[error("writing the snapshot: {0}")]
    Write(#[from] precopy_stream::WriteError),
    /// A diff file's field is invalid.
    #[error("diff snapshot corrupt at byte {offset}: {why}")]
    Corrupt {
        /// File offset of the field.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A diff file's trailer is missing or its checksum does not match (torn write or corruption).
    #[error("diff snapshot torn or corrupted: trailer at byte {offset} does not match")]
    Torn {
        /// Offset where the trailer should start.
        offset: u64,
    },
    /// A diff applied onto another snapshot than its parent.
    #[error("diff {diff} applies onto snapshot {expected}, not onto {found}")]
    WrongBase {
        /// The diff's id.
        diff: String,
        /// The diff's parent id.
        expected: String,
        /// The id of the chain so far.
        found: String,
    },
    /// A full snapshot without our VM description (id and digest), e.g. QEMU's file.
    #[error("{path}: not a precopy full snapshot (no snapshot id in the VM description)")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
    },
    /// The RAM restored from a full snapshot does not match its digest.
    #[error("{path}: RAM digest mismatch (file says {expected}, RAM is {found})")]
    DigestMismatch {
        /// The file.
        path: PathBuf,
        /// The digest in the file.
        expected: String,
        /// The digest of the loaded RAM.
        found: String,
    },
    /// The block list of a diff differs from the chain's.
    #[error("diff block list differs from the base's")]
    BlockMismatch,
    /// A diff was asked for before any full snapshot.
    #[error("no previous snapshot: take a full snapshot first")]
    NoBase,
    /// An XBZRLE record does not apply onto its page.
    #[error("diff record at byte {offset}: XBZRLE delta refused: {source}")]
    Xbzrle {
        /// File offset of the record.
        offset: u64,
        /// The decoder's error.
        source: xbzrle::DecodeError,
    },
    /// Allocating the RAM image failed, or it is over the limit.
    #[error("cannot allocate {bytes} bytes of RAM image")]
    Alloc {
        /// Bytes asked for.
        bytes: u64,
    },
}

impl SnapshotError {
    /// This error, naming the chain file `path` it concerns (an error that already names
    /// its file, [`SnapshotError::Io`] or [`SnapshotError::InFile`], is kept as it is).
    pub fn in_file(self, path: &Path) -> SnapshotError {
        match self {
            e @ (SnapshotError::Io { .. } | SnapshotError::InFile { .. }) => e,
            e => SnapshotError::InFile {
                path: path.to_owned(),
                source: Box::new(e),
            },
        }
    }
}

/// What one snapshot took (JSON keys in kebab-case, as the other commands' `--json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotStats {
    /// This snapshot's id (hex).
    pub id: String,
    /// 0 for a full snapshot, then 1, 2, ...
    pub sequence: u64,
    /// Wall time from start to the renamed, fsynced file (ms).
    pub total_ms: u64,
    /// The guest's pause: vCPUs stopped to resumed (µs).
    pub pause_us: u64,
    /// Pages copied while the guest ran.
    pub live_pages: u64,
    /// Pages copied while it was stopped.
    pub final_pages: u64,
    /// Records (diff) or present pages (full) by kind.
    pub zero: u64,
    /// Pages stored whole.
    pub raw: u64,
    /// Pages stored as XBZRLE deltas.
    pub xbzrle: u64,
    /// File length (bytes).
    pub file_bytes: u64,
    /// Blocks allocated on disk (bytes, `st_blocks × 512`): less than the length for a sparse file.
    pub disk_bytes: u64,
}

/// Options of a [`Snapshotter`].
#[derive(Clone, Copy, Debug)]
pub struct SnapshotOptions {
    /// Budget of the XBZRLE cache of pages as the chain left them (bytes; 0 = no XBZRLE,
    /// every dirtied page RAW or ZERO).
    pub xbzrle_cache_bytes: u64,
    /// Resume the guest after the final pass (false leaves it stopped).
    pub resume: bool,
}

impl Default for SnapshotOptions {
    /// 64 MiB of XBZRLE cache; resume.
    fn default() -> Self {
        SnapshotOptions {
            xbzrle_cache_bytes: 64 << 20,
            resume: true,
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `dir/.name.tmp-PID`: the temporary name a snapshot is written under.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// fsync the file, rename it over `path`, fsync the directory.
fn commit(file: &File, tmp: &Path, path: &Path) -> Result<(), SnapshotError> {
    file.sync_all().map_err(io_err(tmp))?;
    fs::rename(tmp, path).map_err(io_err(path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir))
}

/// Creates (truncating) the temporary file that a snapshot bound for `path` is written to
/// before `commit` renames it; returns it, opened read-write, and its path.
fn create_temp(path: &Path) -> Result<(File, PathBuf), SnapshotError> {
    let tmp = temp_path(path);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    Ok((file, tmp))
}

/// Writes `bytes` to `path` crash-safely (temporary name, fsync, rename, fsync dir).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let tmp = temp_path(path);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    commit(&f, &tmp, path)
}

fn disk_bytes(f: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

fn fresh_bitmaps(blocks: &[RamBlockInfo], ones: bool) -> Vec<Vec<u64>> {
    blocks
        .iter()
        .map(|b| {
            let pages = block_pages(b);
            let mut v = vec![if ones { u64::MAX } else { 0 }; pages.div_ceil(64) as usize];
            if ones && !pages.is_multiple_of(64) {
                *v.last_mut().expect("non-empty") = (1u64 << (pages % 64)) - 1;
            }
            v
        })
        .collect()
}

fn fetch_dirty(guest: &dyn Guest, blocks: &[RamBlockInfo]) -> Result<Vec<Vec<u64>>, GuestError> {
    let mut maps = fresh_bitmaps(blocks, false);
    for (i, m) in maps.iter_mut().enumerate() {
        guest.fetch_and_clear(i, m)?;
    }
    Ok(maps)
}

fn count(maps: &[Vec<u64>]) -> u64 {
    maps.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// Pages copied out of the guest: `(block, page)` and their bytes, 4096 each, in order.
struct Copied {
    index: Vec<(usize, u64)>,
    data: Vec<u8>,
}

impl Copied {
    fn page(&self, i: usize) -> &Page {
        (&self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
            .try_into()
            .expect("page-sized")
    }
}

/// Copies every page whose bit is set out of the guest into memory, in parallel (rayon).
/// This is all a snapshot does while the guest is stopped: encoding and writing happen after
/// it resumes.
fn copy_out(guest: &dyn Guest, maps: &[Vec<u64>], mut data: Vec<u8>) -> Result<Copied, GuestError> {
    let mut index = Vec::new();
    for (b, m) in maps.iter().enumerate() {
        for (wi, &word) in m.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                index.push((b, wi as u64 * 64 + u64::from(w.trailing_zeros())));
                w &= w - 1;
            }
        }
    }
    // `data` is a buffer kept from the last snapshot (already faulted in): it only grows.
    if data.len() < index.len() * PAGE_SIZE {
        data.resize(index.len() * PAGE_SIZE, 0);
    }
    data[..index.len() * PAGE_SIZE]
        .par_chunks_mut(PAGE_SIZE)
        .zip(index.par_iter())
        .try_for_each(|(c, &(b, p))| {
            let page: &mut Page = c.try_into().expect("page-sized");
            guest.read_page(b, p, page)
        })?;
    Ok(Copied { index, data })
}

/// Copies every page whose bit is set into the mapped-ram file, in parallel (rayon): runs of
/// up to 256 dirty pages are read from the guest and written with one positional write per
/// non-zero run (zero pages stay holes). Returns the pages written with data.
fn copy_to_mapped_ram(
    guest: &dyn Guest,
    w: &MappedRamWriter<'_>,
    maps: &[Vec<u64>],
) -> Result<u64, SnapshotError> {
    const CHUNK: u64 = 256;
    let mut chunks = Vec::new();
    for (b, m) in maps.iter().enumerate() {
        let pages = m.len() as u64 * 64;
        let mut p = 0;
        while p < pages {
            let words = &m[(p / 64) as usize..((p + CHUNK) / 64).min(m.len() as u64) as usize];
            if words.iter().any(|&x| x != 0) {
                chunks.push((b, p));
            }
            p += CHUNK;
        }
    }
    let written = AtomicU64::new(0);
    chunks.par_iter().try_for_each_init(
        || vec![0u8; CHUNK as usize * PAGE_SIZE],
        |buf, &(b, p0)| -> Result<(), SnapshotError> {
            let m = &maps[b];
            let pages = w.layout().blocks[b].0.used_length / PAGE_SIZE as u64;
            let end = (p0 + CHUNK).min(pages);
            let bit = |p: u64| m[(p / 64) as usize] >> (p % 64) & 1 == 1;
            let mut p = p0;
            while p < end {
                if !bit(p) {
                    p += 1;
                    continue;
                }
                let q = (p..end).find(|&q| !bit(q)).unwrap_or(end);
                for k in p..q {
                    let s = ((k - p) as usize) * PAGE_SIZE;
                    let page: &mut Page =
                        (&mut buf[s..s + PAGE_SIZE]).try_into().expect("page-sized");
                    guest.read_page(b, k, page)?;
                }
                let n = w.write_pages(
                    b,
                    p * PAGE_SIZE as u64,
                    &buf[..((q - p) as usize) * PAGE_SIZE],
                )?;
                written.fetch_add(n, Ordering::Relaxed);
                p = q;
            }
            Ok(())
        },
    )?;
    Ok(written.into_inner())
}

/// The RAM digest ([`vmdesc`] layout) of a mapped-ram file's blocks, holes as zeros.
fn file_digest(m: &MappedRamFile, f: &File, path: &Path) -> Result<String, SnapshotError> {
    let mut h = blake3::Hasher::new();
    for (i, b) in m.blocks.iter().enumerate() {
        vmdesc::digest_block_header(&mut h, &b.info.name, b.info.used_length);
        m.for_each_chunk(f, i, |c| {
            h.update_rayon(c);
        })
        .map_err(|source| SnapshotError::Format {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The VM description of a full snapshot: our usual one plus `snapshot: {id, sequence}`.
fn full_vm_description(blocks: &[RamBlockInfo], digest: &str, id: SnapshotId, seq: u64) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&vmdesc::vm_description(blocks, digest)).expect("our own JSON");
    v[vmdesc::VMDESC_KEY]["snapshot"] = serde_json::json!({"id": id.to_hex(), "sequence": seq});
    v.to_string()
}

/// Finishes a mapped-ram full snapshot: tail + device sections, digest read back from the
/// file, VM description, fsync, rename.
fn finish_full(
    w: MappedRamWriter<'_>,
    file: &File,
    tmp: &Path,
    path: &Path,
    devices: &[DeviceStateEntry],
    id: SnapshotId,
    seq: u64,
) -> Result<(), SnapshotError> {
    let blocks: Vec<RamBlockInfo> = w.layout().blocks.iter().map(|(b, _)| b.clone()).collect();
    let sections: Vec<(&str, u32, u32, &[u8])> = devices
        .iter()
        .map(|(n, i, v, p)| (n.as_str(), *i, *v, &p[..]))
        .collect();
    w.finish(&sections)?;
    let limits = Limits {
        max_ram_bytes: u64::MAX,
        ..Limits::default()
    };
    let m = MappedRamFile::parse(file, &limits).map_err(|source| SnapshotError::Format {
        path: tmp.to_owned(),
        source,
    })?;
    let digest = file_digest(&m, file, tmp)?;
    mapped_ram::append_vm_description(
        file,
        full_vm_description(&blocks, &digest, id, seq).as_bytes(),
    )?;
    commit(file, tmp, path)
}

/// Takes snapshots of one guest: [`Snapshotter::full`], then [`Snapshotter::diff`] any
/// number of times. Keeps the dirty log running between them.
pub struct Snapshotter<'g> {
    guest: &'g dyn Guest,
    opts: SnapshotOptions,
    blocks: Vec<RamBlockInfo>,
    cache: Option<PageCache>,
    generation: u64,
    last: Option<SnapshotId>,
    sequence: u64,
    /// Page buffer of the final pass, kept between snapshots so the pause does not fault it in.
    buf: Vec<u8>,
}

impl<'g> Snapshotter<'g> {
    /// Grows the kept page buffer to `pages` pages before a pause (its faults happen now,
    /// while the guest runs) and hands it out.
    fn take_buf(&mut self, pages: u64) -> Vec<u8> {
        let want = pages as usize * PAGE_SIZE;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        std::mem::take(&mut self.buf)
    }

    /// A snapshotter for `guest` (nothing is taken yet).
    ///
    /// # Errors
    /// [`SnapshotError::Alloc`] when the XBZRLE cache cannot be built.
    pub fn new(guest: &'g dyn Guest, opts: SnapshotOptions) -> Result<Self, SnapshotError> {
        let cache = if opts.xbzrle_cache_bytes >= PAGE_SIZE as u64 {
            Some(
                PageCache::new(opts.xbzrle_cache_bytes, Policy::default()).map_err(|_| {
                    SnapshotError::Alloc {
                        bytes: opts.xbzrle_cache_bytes,
                    }
                })?,
            )
        } else {
            None
        };
        Ok(Snapshotter {
            guest,
            opts,
            blocks: guest.blocks(),
            cache,
            generation: 0,
            last: None,
            sequence: 0,
            buf: Vec::new(),
        })
    }

    /// The id of the last snapshot taken.
    pub fn last_id(&self) -> Option<SnapshotId> {
        self.last
    }

    fn stop(&self) -> Result<bool, SnapshotError> {
        let was = self.guest.is_running();
        self.guest.stop()?;
        Ok(was)
    }

    fn resume(&self, was_running: bool) -> Result<(), SnapshotError> {
        if was_running && self.opts.resume {
            self.guest.resume()?;
        }
        Ok(())
    }

    /// A full snapshot into `path` (mapped-ram; see the module docs). Starts the dirty log.
    ///
    /// # Errors
    /// Guest, I/O and format errors; on error the guest is resumed (if it ran) and nothing
    /// is left at `path`.
    pub fn full(&mut self, path: &Path) -> Result<SnapshotStats, SnapshotError> {
        let t0 = Instant::now();
        let (file, tmp) = create_temp(path)?;
        let r = self.full_into(&file, &tmp, path, t0);
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }

    fn full_into(
        &mut self,
        file: &File,
        tmp: &Path,
        path: &Path,
        t0: Instant,
    ) -> Result<SnapshotStats, SnapshotError> {
        let guest = self.guest;
        let w = MappedRamWriter::new(file, SNAPSHOT_MACHINE_TYPE, &self.blocks)?;
        guest.log_start()?;
        let all = fresh_bitmaps(&self.blocks, true);
        let live_pages = count(&all);
        copy_to_mapped_ram(guest, &w, &all)?;
        // A second live pass over what the guest dirtied during the first; the final pass
        // should see about as many pages again, so the buffer for it is sized (and faulted
        // in) now, while the guest runs.
        let second = fetch_dirty(guest, &self.blocks)?;
        let expect = count(&second);
        copy_to_mapped_ram(guest, &w, &second)?;
        let live_pages = live_pages + expect;
        let buf = self.take_buf(expect);
        let was = self.stop()?;
        let p0 = Instant::now();
        let r = (|| {
            let dirty = fetch_dirty(guest, &self.blocks)?;
            let copied = copy_out(guest, &dirty, buf)?;
            let devices = guest.device_states()?;
            Ok::<_, SnapshotError>((copied, devices))
        })();
        let resumed = self.resume(was);
        let pause = p0.elapsed();
        let (copied, devices) = r?;
        resumed?;
        let final_pages = copied.index.len() as u64;
        (0..copied.index.len()).into_par_iter().try_for_each(|i| {
            let (b, p) = copied.index[i];
            w.write_page(b, p * PAGE_SIZE as u64, copied.page(i))
                .map(|_| ())
        })?;
        self.buf = copied.data;
        let id = SnapshotId::new();
        finish_full(w, file, tmp, path, &devices, id, 0)?;
        if let Some(c) = &mut self.cache {
            c.clear();
        }
        self.last = Some(id);
        self.sequence = 0;
        let f = File::open(path).map_err(io_err(path))?;
        let m = MappedRamFile::parse(
            &f,
            &Limits {
                max_ram_bytes: u64::MAX,
                ..Limits::default()
            },
        )
        .map_err(|source| SnapshotError::Format {
            path: path.to_owned(),
            source,
        })?;
        let present: u64 = m.blocks.iter().map(|b| b.present_pages()).sum();
        let total: u64 = m.blocks.iter().map(|b| b.pages()).sum();
        Ok(SnapshotStats {
            id: id.to_hex(),
            sequence: 0,
            total_ms: t0.elapsed().as_millis() as u64,
            pause_us: pause.as_micros() as u64,
            live_pages,
            final_pages,
            zero: total - present,
            raw: present,
            xbzrle: 0,
            file_bytes: m.file_len,
            disk_bytes: disk_bytes(&f),
        })
    }

    /// Encodes the copied pages into `b`, in order, against the cache.
    fn encode(
        &mut self,
        b: &mut diff::DiffBuilder,
        copied: &Copied,
        st: &mut SnapshotStats,
    ) -> Result<(), SnapshotError> {
        self.generation += 1;
        let gen_ = self.generation;
        let mut out = vec![0u8; PAGE_SIZE];
        for (i, &(bi, p)) in copied.index.iter().enumerate() {
            let page = copied.page(i);
            let addr = ((bi as u64) << 48) | (p * PAGE_SIZE as u64);
            let zero = xbzrle::is_zero(&page[..]);
            let cached = self.cache.as_mut().and_then(|c| c.lookup(addr, gen_));
            match (zero, cached) {
                (true, Some(c)) => {
                    b.zero(bi, p);
                    st.zero += 1;
                    c.fill(0);
                }
                (true, None) => {
                    b.zero(bi, p);
                    st.zero += 1;
                }
                (false, Some(c)) => match xbzrle::encode_and_update(c, page, &mut out) {
                    Ok(0) => {} // unchanged since the chain's copy: no record
                    Ok(n) => {
                        b.xbzrle(bi, p, &out[..n]);
                        st.xbzrle += 1;
                    }
                    Err(_) => {
                        b.raw(bi, p, page);
                        st.raw += 1;
                    }
                },
                (false, None) => {
                    b.raw(bi, p, page);
                    st.raw += 1;
                    if let Some(c) = &mut self.cache {
                        let _ = c.insert(addr, page, gen_);
                    }
                }
            }
        }
        Ok(())
    }

    /// A diff snapshot into `path`: the pages dirtied since the previous snapshot (see the
    /// module docs).
    ///
    /// # Errors
    /// [`SnapshotError::NoBase`] before a full snapshot; guest and I/O errors (the guest is
    /// resumed and nothing is left at `path`). The pages of a failed diff are already gone
    /// from the dirty log, so no later diff could rebuild them: after an error the
    /// snapshotter has no base (the next `diff` is [`SnapshotError::NoBase`]) until the next
    /// [`Snapshotter::full`].
    pub fn diff(&mut self, path: &Path) -> Result<SnapshotStats, SnapshotError> {
        let t0 = Instant::now();
        let parent = self.last.ok_or(SnapshotError::NoBase)?;
        let id = SnapshotId::new();
        let seq = self.sequence + 1;
        let mut b = diff::DiffBuilder::new(id, parent, seq, &self.blocks);
        let mut st = SnapshotStats {
            id: id.to_hex(),
            sequence: seq,
            ..SnapshotStats::default()
        };
        let guest = self.guest;
        let r = (|| {
            let buf = self.take_buf(0);
            let live = copy_out(guest, &fetch_dirty(guest, &self.blocks)?, buf)?;
            st.live_pages = live.index.len() as u64;
            self.encode(&mut b, &live, &mut st)?;
            self.buf = live.data;
            // The final pass sees at most about what the live one did: size the buffer now.
            let buf = self.take_buf(st.live_pages);
            let was = self.stop()?;
            let p0 = Instant::now();
            let r = (|| {
                let dirty = fetch_dirty(guest, &self.blocks)?;
                let copied = copy_out(guest, &dirty, buf)?;
                Ok::<_, SnapshotError>((copied, guest.device_states()?))
            })();
            let resumed = self.resume(was);
            st.pause_us = p0.elapsed().as_micros() as u64;
            let (copied, devices) = r?;
            resumed?;
            st.final_pages = copied.index.len() as u64;
            self.encode(&mut b, &copied, &mut st)?;
            self.buf = copied.data;
            let bytes = b.finish(&devices);
            st.file_bytes = bytes.len() as u64;
            st.disk_bytes = st.file_bytes;
            write_atomic(path, &bytes)
        })();
        if let Err(e) = r {
            // The pages of this diff are lost from the log: the cache no longer matches
            // anything a restore can rebuild, and a later diff would miss them. Restart the
            // chain's cache; the caller must take a full snapshot to continue a valid chain.
            if let Some(c) = &mut self.cache {
                c.clear();
            }
            self.last = None;
            return Err(e);
        }
        self.last = Some(id);
        self.sequence = seq;
        st.total_ms = t0.elapsed().as_millis() as u64;
        Ok(st)
    }
}

/// RAM and device state rebuilt from a chain.
#[derive(Debug)]
pub struct Restored {
    /// The RAM at the last snapshot of the chain.
    pub image: RamImage,
    /// Device sections of the last snapshot.
    pub device_states: Vec<DeviceStateEntry>,
    /// The id of the last snapshot.
    pub id: SnapshotId,
    /// Its sequence number.
    pub sequence: u64,
}

/// Reads the RAM of a parsed mapped-ram file into a new [`RamImage`] (bounded by
/// `limits.max_ram_bytes`), 1 MiB chunks in parallel (rayon), holes as zeros.
///
/// # Errors
/// [`SnapshotError::Alloc`], [`SnapshotError::Format`] (read errors, with the offset).
pub fn read_mapped_ram(
    m: &MappedRamFile,
    f: &File,
    path: &Path,
    limits: &Limits,
) -> Result<RamImage, SnapshotError> {
    let infos = m.block_infos();
    let mut image = RamImage::new(&infos, limits.max_ram_bytes)
        .map_err(|bytes| SnapshotError::Alloc { bytes })?;
    const CHUNK: usize = 256 * PAGE_SIZE;
    for (i, b) in image.blocks_mut().iter_mut().enumerate() {
        b.data_mut()
            .par_chunks_mut(CHUNK)
            .enumerate()
            .try_for_each(|(k, c)| m.read_pages(f, i, (k * CHUNK / PAGE_SIZE) as u64, c))
            .map_err(|source| SnapshotError::Format {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(image)
}

/// Loads a full snapshot (mapped-ram with our VM description), checking its RAM digest.
///
/// # Errors
/// [`SnapshotError::Format`], [`SnapshotError::NotASnapshot`],
/// [`SnapshotError::DigestMismatch`], [`SnapshotError::Io`], [`SnapshotError::Alloc`].
pub fn load_full(path: &Path, limits: &Limits) -> Result<Restored, SnapshotError> {
    let f = File::open(path).map_err(io_err(path))?;
    let fmt = |source| SnapshotError::Format {
        path: path.to_owned(),
        source,
    };
    let m = MappedRamFile::parse(&f, limits).map_err(fmt)?;
    let not = || SnapshotError::NotASnapshot {
        path: path.to_owned(),
    };
    let desc: serde_json::Value = m
        .vm_description
        .as_deref()
        .and_then(|j| serde_json::from_slice(j).ok())
        .ok_or_else(not)?;
    let snap = &desc[vmdesc::VMDESC_KEY]["snapshot"];
    let id = snap["id"]
        .as_str()
        .and_then(SnapshotId::from_hex)
        .ok_or_else(not)?;
    let sequence = snap["sequence"].as_u64().ok_or_else(not)?;
    let expected = vmdesc::digest_from_vm_description(&desc)
        .ok_or_else(not)?
        .to_owned();
    let image = read_mapped_ram(&m, &f, path, limits)?;
    let found = vmdesc::image_digest(&image);
    if found != expected {
        return Err(SnapshotError::DigestMismatch {
            path: path.to_owned(),
            expected,
            found,
        });
    }
    let device_states = m
        .sections
        .iter()
        .filter_map(|s| {
            s.payload
                .as_ref()
                .map(|p| (s.name.clone(), s.instance_id, s.version_id, p.clone()))
        })
        .collect();
    Ok(Restored {
        image,
        device_states,
        id,
        sequence,
    })
}

/// Applies one diff file onto `r` (checked: trailer, fields, parent id, block list).
///
/// # Errors
/// [`SnapshotError::Torn`], [`SnapshotError::Corrupt`], [`SnapshotError::WrongBase`],
/// [`SnapshotError::BlockMismatch`], [`SnapshotError::Xbzrle`], [`SnapshotError::Io`].
/// On error `r` may hold part of the diff: restore from the start again.
pub fn apply_diff(r: &mut Restored, path: &Path, limits: &Limits) -> Result<(), SnapshotError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let d = DiffFile::parse(&bytes, limits)?;
    if d.parent != r.id {
        return Err(SnapshotError::WrongBase {
            diff: d.id.to_hex(),
            expected: d.parent.to_hex(),
            found: r.id.to_hex(),
        });
    }
    let same = d.blocks.len() == r.image.blocks().len()
        && d.blocks
            .iter()
            .zip(r.image.blocks())
            .all(|(a, b)| a.name == b.name() && a.used_length == b.len());
    if !same {
        return Err(SnapshotError::BlockMismatch);
    }
    for rec in &d.records {
        let page = r
            .image
            .page_mut(rec.block, rec.page * PAGE_SIZE as u64)
            .ok_or(SnapshotError::Corrupt {
                offset: rec.offset,
                why: "record page outside the RAM",
            })?;
        match rec.kind {
            DiffRecordKind::Zero => page.fill(0),
            DiffRecordKind::Raw => page.copy_from_slice(rec.data),
            DiffRecordKind::Xbzrle => {
                xbzrle::decode(rec.data, page).map_err(|source| SnapshotError::Xbzrle {
                    offset: rec.offset,
                    source,
                })?
            }
        }
    }
    r.device_states = d.device_states;
    r.id = d.id;
    r.sequence = d.sequence;
    Ok(())
}

/// Rebuilds the RAM of the last snapshot of a chain: the full snapshot `base`, then `diffs`
/// in order.
///
/// # Errors
/// As [`load_full`] and [`apply_diff`].
pub fn restore_chain(
    base: &Path,
    diffs: &[PathBuf],
    limits: &Limits,
) -> Result<Restored, SnapshotError> {
    let mut r = load_full(base, limits).map_err(|e| e.in_file(base))?;
    for d in diffs {
        apply_diff(&mut r, d, limits).map_err(|e| e.in_file(d))?;
    }
    Ok(r)
}

/// Writes `r` as one full snapshot at `path` (mapped-ram, parallel positional writes, zero
/// pages as holes), keeping the id and sequence of the last snapshot, so diffs taken after it
/// still apply onto the merged file.
///
/// # Errors
/// I/O and write errors.
pub fn write_full(r: &Restored, path: &Path) -> Result<SnapshotStats, SnapshotError> {
    let t0 = Instant::now();
    let (file, tmp) = create_temp(path)?;
    let infos: Vec<RamBlockInfo> = r
        .image
        .blocks()
        .iter()
        .map(|b| RamBlockInfo::new(b.name(), b.len()))
        .collect();
    let res = (|| {
        let w = MappedRamWriter::new(&file, SNAPSHOT_MACHINE_TYPE, &infos)?;
        let chunk = 256 * PAGE_SIZE;
        let written: u64 = r
            .image
            .blocks()
            .iter()
            .enumerate()
            .flat_map(|(bi, b)| {
                b.data()
                    .chunks(chunk)
                    .enumerate()
                    .map(move |(ci, c)| (bi, ci, c))
            })
            .collect::<Vec<_>>()
            .par_iter()
            .map(|&(bi, ci, c)| w.write_pages(bi, (ci * chunk) as u64, c))
            .try_reduce(|| 0, |a, b| Ok(a + b))?;
        finish_full(w, &file, &tmp, path, &r.device_states, r.id, r.sequence)?;
        Ok::<_, SnapshotError>(written)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let written = res?;
    let total: u64 = infos.iter().map(block_pages).sum();
    let f = File::open(path).map_err(io_err(path))?;
    Ok(SnapshotStats {
        id: r.id.to_hex(),
        sequence: r.sequence,
        total_ms: t0.elapsed().as_millis() as u64,
        pause_us: 0,
        live_pages: 0,
        final_pages: 0,
        zero: total - written,
        raw: written,
        xbzrle: 0,
        file_bytes: f.metadata().map(|m| m.len()).unwrap_or(0),
        disk_bytes: disk_bytes(&f),
    })
}

/// Merges a chain into one full snapshot at `out` ([`restore_chain`] then [`write_full`]).
///
/// # Errors
/// As both.
pub fn merge_chain(
    base: &Path,
    diffs: &[PathBuf],
    out: &Path,
    limits: &Limits,
) -> Result<SnapshotStats, SnapshotError> {
    let r = restore_chain(base, diffs, limits)?;
    write_full(&r, out)
}

/// How long a snapshot paused the guest, as a [`Duration`].
pub fn pause_of(st: &SnapshotStats) -> Duration {
    Duration::from_micros(st.pause_us)
}
