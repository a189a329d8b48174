//! The relay: between an unmodified QEMU source and a QEMU destination, re-encoding the RAM.
//!
//! [`relay`] reads a migration stream item by item ([`StreamReader`]) and writes a stream
//! the destination loads as if the source had written it:
//!
//! - the file header, the configuration section, every section header and footer, the
//!   MEM_SIZE and EOS records, and our own device sections are forwarded byte for byte;
//! - every page record (ZERO, PAGE, XBZRLE, and our COMPRESSED) is decoded onto the relay's own copy of the
//!   RAM (a [`Loader`] over a [`RamImage`](precopy_stream::RamImage), with all of the
//!   reader's checks) and written again by our encoder ([`Encoder::page_records_only`]): a
//!   ZERO record for a zero page; with XBZRLE on (the relay's choice, independent of the
//!   source's), for a page the relay has sent before, an XBZRLE record against the page's
//!   previous content, or nothing when the content did not change; a PAGE otherwise (first
//!   send, XBZRLE off, or a delta that does not fit a page);
//! - QEMU's device state after the RAM, EOF and the VM description are read to the end of
//!   the source's stream, checked to be complete ([`split_device_state`]), and forwarded
//!   unchanged.
//!
//! The relay's XBZRLE "cache" is its copy of the RAM itself. The relay forwards every page
//! record either with the same content or not at all when the content is unchanged, so
//! after every record the destination holds, for every page the relay has sent, exactly
//! the content of the relay's copy before the next record for that page is applied: the
//! page's previous content is the destination's copy, always, whatever the RAM size. That
//! is QEMU's XBZRLE with a cache as large as the RAM and never a miss on a re-sent page,
//! at no memory cost beyond the copy the relay needs anyway to decode the source's own
//! XBZRLE records. (A first version used a separate `xbzrle-cache-size` cache: with it the
//! relay re-sent as PAGE what the source had sent as XBZRLE, and wrote up to 44 % more
//! than it read on the QEMU vectors' stream.) A page never sent in this migration is sent
//! whole, since the destination's initial content (its own firmware, for ROM blocks) is
//! not known to the relay.
//!
//! Flow control is the sockets': one thread, blocking reads and writes, at most
//! [`OUT_BUFFER`] bytes buffered, so a slow destination slows the source. Any error ends
//! the relay and says which side it came from ([`RelayError::side`]); the caller then
//! drops both connections, so the destination sees its stream cut (and fails, without
//! loading a partial VM) and the source sees its writes fail (and keeps its guest
//! running).

use std::io::{self, Read, Write};
use std::time::Instant;

use precopy_stream::{
    Encoder, Item, Limits, Loader, RamRecord, StopReason, StreamReader, split_device_state,
};
use xbzrle::{Codec, PAGE_SIZE, Page};

/// Bytes the relay buffers before writing to the destination.
pub const OUT_BUFFER: usize = 256 * 1024;

/// What the relay does with the RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayOptions {
    /// Re-encode re-sent pages with XBZRLE against their previous content (QEMU's `xbzrle`
    /// capability, on the relay's side of the link; see the [module docs](self)).
    pub xbzrle: bool,
    /// Limits on what the source's stream may declare.
    pub limits: Limits,
}

impl Default for RelayOptions {
    /// XBZRLE off, default limits.
    fn default() -> Self {
        RelayOptions {
            xbzrle: false,
            limits: Limits::default(),
        }
    }
}

/// Page records by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PageCounts {
    /// ZERO records (QEMU's duplicate pages).
    pub zero: u64,
    /// PAGE records (QEMU's normal pages).
    pub normal: u64,
    /// XBZRLE records.
    pub xbzrle: u64,
    /// Our per-page compressed records (zstd, zlib: in only; the relay writes QEMU's
    /// record kinds).
    pub compressed: u64,
    /// Pages not sent: equal to their previous content, so the destination has them
    /// (out only, with XBZRLE on; QEMU's XBZRLE skips them the same way).
    pub skipped: u64,
}

/// What the relay moved, in QEMU's `query-migrate` spirit.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RelayStats {
    /// Stream bytes read from the source.
    pub bytes_in: u64,
    /// Stream bytes written to the destination.
    pub bytes_out: u64,
    /// Page records read, by kind.
    pub pages_in: PageCounts,
    /// Page records written, by kind.
    pub pages_out: PageCounts,
    /// XBZRLE encodes that did not fit a page (sent as PAGE).
    pub xbzrle_overflow: u64,
    /// Pages sent for the first time in this migration with XBZRLE on (sent whole: the
    /// destination has no copy to encode against; QEMU would count a cache miss).
    pub xbzrle_cache_miss: u64,
    /// Bytes of XBZRLE records written (headers included).
    pub xbzrle_bytes: u64,
    /// `ram` sections forwarded (START, PART, END).
    pub ram_sections: u64,
    /// Bytes of QEMU device state forwarded (sections after the RAM).
    pub device_state_bytes: u64,
    /// QEMU device sections in it (0 when they could not be split).
    pub device_sections: u64,
    /// ms from the first byte read to the last byte written (`total-time`, as QEMU's
    /// query-migrate).
    #[serde(rename = "total-time")]
    pub total_time_ms: u64,
}

/// Which side of the relay an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelaySide {
    /// The migration source (reading its stream).
    Source,
    /// The destination (writing to it).
    Destination,
}

/// Why a relay failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The source's stream is malformed, truncated, unsupported, or reading it failed;
    /// the error carries the source stream's byte offset.
    #[error("source: {0}")]
    Source(#[source] precopy_stream::Error),
    /// Writing to the destination failed after `bytes` bytes.
    #[error("destination: {source} (after {bytes} bytes)")]
    Destination {
        /// Bytes written before the failure.
        bytes: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The relay's encoder refused a record (a bug, or a block list it cannot write).
    #[error("relay: encoding a record at source offset {offset}: {source}")]
    Encode {
        /// Source stream offset of the record.
        offset: u64,
        /// The encoder's error.
        #[source]
        source: precopy_stream::WriteError,
    },
}

impl RelayError {
    /// The side the error came from; None for the relay's own failures.
    pub fn side(&self) -> Option<RelaySide> {
        match self {
            RelayError::Source(_) => Some(RelaySide::Source),
            RelayError::Destination { .. } => Some(RelaySide::Destination),
            RelayError::Encode { .. } => None,
        }
    }
}

/// A failed relay: the error and the stats up to it.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct RelayFailure {
    /// Why.
    #[source]
    pub error: RelayError,
    /// What had been moved (boxed: the error stays small).
    pub stats: Box<RelayStats>,
}

/// The destination side: a buffer in front of `W`, counting what reached it.
struct Out<W> {
    inner: W,
    buf: Vec<u8>,
    written: u64,
}

impl<W: Write> Out<W> {
    fn push(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        self.buf.extend_from_slice(bytes);
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> Result<(), RelayError> {
        if self.buf.len() >= OUT_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), RelayError> {
        let r = self
            .inner
            .write_all(&self.buf)
            .and_then(|()| self.inner.flush());
        r.map_err(|source| RelayError::Destination {
            bytes: self.written,
            source,
        })?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// The relay's RAM state: its copy of the RAM (through the loader) and its encoder.
struct Ram {
    loader: Loader,
    codec: Codec,
    xbzrle: bool,
    encoder: Option<Encoder>,
    /// Flat page index of each block's first page.
    bases: Vec<u64>,
    /// One bit per page (flat index): sent in this migration, so the destination holds
    /// the relay's copy of it.
    sent: Vec<u64>,
    /// The current record's page before the record was applied.
    old: Box<Page>,
    /// Whether `old` holds that page (false for non-page items).
    old_valid: bool,
    delta: Box<Page>,
}

/// Block and page offset of a page record.
fn page_of(rec: &RamRecord<'_>) -> Option<(usize, u64)> {
    match *rec {
        RamRecord::Zero { block, offset, .. }
        | RamRecord::Page { block, offset, .. }
        | RamRecord::Xbzrle { block, offset, .. }
        | RamRecord::Compressed { block, offset, .. } => Some((block, offset)),
        _ => None,
    }
}

impl Ram {
    /// Before a page record is applied: keep the page's current content.
    fn keep_old(&mut self, item: &Item<'_>) {
        self.old_valid = false;
        if let Item::Ram(rec) = item
            && let Some((block, page)) = page_of(rec)
            && let Some(p) = self.loader.image().page(block, page)
        {
            self.old.copy_from_slice(p);
            self.old_valid = true;
        }
    }

    /// Re-encodes the page record `rec` (already applied to the RAM) into `out`.
    fn reencode<W: Write>(
        &mut self,
        offset: u64,
        rec: &RamRecord<'_>,
        out: &mut Out<W>,
        stats: &mut RelayStats,
    ) -> Result<(), RelayError> {
        let Some((block, page)) = page_of(rec) else {
            return Ok(());
        };
        match rec {
            RamRecord::Zero { .. } => stats.pages_in.zero += 1,
            RamRecord::Page { .. } => stats.pages_in.normal += 1,
            RamRecord::Xbzrle { .. } => stats.pages_in.xbzrle += 1,
            _ => stats.pages_in.compressed += 1,
        }
        let enc_err = |source| RelayError::Encode { offset, source };
        let (Some(enc), Some(data)) =
            (self.encoder.as_mut(), self.loader.image().page(block, page))
        else {
            // The loader checked the record against MEM_SIZE, so both exist.
            return Err(enc_err(precopy_stream::WriteError::NoSuchBlock { block }));
        };
        let index = self.bases.get(block).copied().unwrap_or(0) + page / PAGE_SIZE as u64;
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        let sent_before = self.sent.get(word).is_some_and(|w| w & bit != 0);
        if let Some(w) = self.sent.get_mut(word) {
            *w |= bit;
        }
        let before = out.buf.len();
        if self.codec.is_zero(data) {
            enc.zero_page(&mut out.buf, block, page).map_err(enc_err)?;
            stats.pages_out.zero += 1;
        } else if self.xbzrle && sent_before && self.old_valid {
            match self
                .codec
                .encode(&self.old, data, &mut self.delta[..PAGE_SIZE - 1])
            {
                Ok(0) => stats.pages_out.skipped += 1,
                Ok(n) => {
                    enc.xbzrle_page(&mut out.buf, block, page, &self.delta[..n])
                        .map_err(enc_err)?;
                    stats.pages_out.xbzrle += 1;
                    stats.xbzrle_bytes += (out.buf.len() - before) as u64;
                }
                Err(_) => {
                    stats.xbzrle_overflow += 1;
                    enc.page(&mut out.buf, block, page, data).map_err(enc_err)?;
                    stats.pages_out.normal += 1;
                }
            }
        } else {
            if self.xbzrle {
                stats.xbzrle_cache_miss += 1;
            }
            enc.page(&mut out.buf, block, page, data).map_err(enc_err)?;
            stats.pages_out.normal += 1;
        }
        out.maybe_flush()
    }
}

/// Relays one migration from `source` to `destination` (see the [module docs](self)),
/// until the source's stream ends; flushes `destination` but does not close it.
///
/// Returns the stats of a relayed stream: every byte of it was read from the source and
/// the re-encoded stream was written and flushed to the destination.
///
/// # Errors
/// A [`RelayFailure`]: [`RelayError::Source`] for a source stream that is malformed,
/// truncated (the source died), over `options.limits`, or holds what the relay cannot
/// re-encode (postcopy commands, compressed pages, a device section before the RAM's
/// END); [`RelayError::Destination`] when a write fails (the destination refused or
/// died). Nothing after the failing
/// item is written.
pub fn relay<R: Read, W: Write>(
    source: R,
    destination: W,
    options: &RelayOptions,
) -> Result<RelayStats, RelayFailure> {
    let mut stats = RelayStats::default();
    let start = Instant::now();
    let mut reader = StreamReader::new(source, options.limits);
    let mut out = Out {
        inner: destination,
        buf: Vec::with_capacity(OUT_BUFFER + 2 * PAGE_SIZE),
        written: 0,
    };
    let r = run(&mut reader, &mut out, options, &mut stats);
    // After the device state was read whole, bytes_in already counts it.
    stats.bytes_in = stats.bytes_in.max(reader.decoder().position());
    stats.bytes_out = out.written;
    stats.total_time_ms = start.elapsed().as_millis() as u64;
    match r {
        Ok(()) => Ok(stats),
        Err(error) => Err(RelayFailure {
            error,
            stats: Box::new(stats),
        }),
    }
}

fn run<R: Read, W: Write>(
    reader: &mut StreamReader<R>,
    out: &mut Out<W>,
    options: &RelayOptions,
    stats: &mut RelayStats,
) -> Result<(), RelayError> {
    let mut ram = Ram {
        loader: Loader::new(options.limits),
        codec: Codec::new(),
        encoder: None,
        bases: Vec::new(),
        xbzrle: options.xbzrle,
        sent: Vec::new(),
        old: Box::new([0; PAGE_SIZE]),
        old_valid: false,
        delta: Box::new([0; PAGE_SIZE]),
    };
    // The header of QEMU's first device section, as read: forwarded with the rest.
    let mut foreign_header: Option<Vec<u8>> = None;
    loop {
        let step = reader
            .next_raw_with(|offset, item, raw| -> Result<bool, RelayError> {
                ram.keep_old(item);
                let control = ram
                    .loader
                    .apply(offset, item, raw.len())
                    .map_err(RelayError::Source)?;
                match item {
                    Item::Ram(
                        rec @ (RamRecord::Zero { .. }
                        | RamRecord::Page { .. }
                        | RamRecord::Xbzrle { .. }
                        | RamRecord::Compressed { .. }),
                    ) => ram.reencode(offset, rec, out, stats)?,
                    Item::Ram(RamRecord::MemSize { blocks, .. }) => {
                        ram.bases = blocks
                            .iter()
                            .scan(0u64, |base, b| {
                                let at = *base;
                                *base += b.used_length / PAGE_SIZE as u64;
                                Some(at)
                            })
                            .collect();
                        let pages: u64 = blocks
                            .iter()
                            .map(|b| b.used_length / PAGE_SIZE as u64)
                            .sum();
                        ram.sent = vec![0; pages.div_ceil(64) as usize];
                        ram.encoder = Some(Encoder::page_records_only(blocks));
                        out.push(raw)?;
                    }
                    Item::Section(_) => {
                        stats.ram_sections += 1;
                        out.push(raw)?;
                    }
                    // Forwarded with the rest of the stream, once that is known complete.
                    Item::ForeignSection(_) => foreign_header = Some(raw.to_vec()),
                    _ => out.push(raw)?,
                }
                Ok(control == precopy_stream::Control::Stop)
            })
            .map_err(RelayError::Source)?;
        match step {
            None => break,
            Some(r) => {
                if r? {
                    break;
                }
            }
        }
    }
    if let (Some(StopReason::ForeignSection { offset, .. }), Some(header)) =
        (ram.loader.stop_reason().cloned(), foreign_header)
    {
        forward_device_state(reader, &ram.loader, offset, header, options, out, stats)?;
    }
    out.flush()
}

/// After the decoder stopped at QEMU's first device section (stream `offset`, its header
/// bytes `header`): reads the rest of the source's stream, checks that it is complete
/// (device sections, EOF, VM description), and forwards it unchanged.
fn forward_device_state<R: Read, W: Write>(
    reader: &mut StreamReader<R>,
    loader: &Loader,
    offset: u64,
    header: Vec<u8>,
    options: &RelayOptions,
    out: &mut Out<W>,
    stats: &mut RelayStats,
) -> Result<(), RelayError> {
    let l = loader.stats();
    if l.ram_start > 0 && l.ram_end == 0 {
        return Err(RelayError::Source(precopy_stream::Error::Format {
            offset,
            kind: precopy_stream::FormatError::Unsupported {
                what: "a device section before the ram section's END (RAM records after it cannot be read)",
            },
        }));
    }
    let max = options
        .limits
        .max_device_state_bytes
        .saturating_add(options.limits.max_vm_description_bytes);
    let (rest_at, rest) = reader.read_rest(max).map_err(RelayError::Source)?;
    stats.bytes_in = rest_at + rest.len() as u64;
    let mut tail = header;
    tail.extend_from_slice(&rest);
    let (dev, _) = split_device_state(offset, &tail).map_err(RelayError::Source)?;
    stats.device_state_bytes = dev.bytes.len() as u64;
    stats.device_sections = dev.sections.len() as u64;
    out.push(&tail)
}
