//! The per-page pipeline: copy a page out of the guest once, decide ZERO / XBZRLE / PAGE /
//! unchanged against the XBZRLE cache, and write the record (the rules are in the
//! [`source`](super) docs). With the `x-parallel-encoding` capability the cache is split
//! into shards by page address, one per encoding thread, and a batch of pages is prepared in
//! parallel, then written in a fixed order (shard, then page), so the stream only depends
//! on the batch.
//!
//! `page-compression` (ours): a page that would go as a PAGE record goes as our
//! COMPRESSED record (zstd or zlib, per page) when that is shorter; with `auto` each shard's
//! [`Selector`] picks, per page, among raw, XBZRLE (on a cache hit), zstd and zlib from the
//! measured CPU cost per method and the measured link rate ([`Pipeline::update_link`]).

use std::time::Instant;

use precopy_compress::select::{
    AUTO_CANDIDATES, Choice, DEFAULT_PROBE_MAX, DEFAULT_PROBE_MIN, Hint, Selector,
};
use precopy_compress::{CompressError, Levels, Method, PageCompressor};
use precopy_pagecache::{CacheError, PageCache, Policy};
use precopy_stream::{StreamWriter, WriteError};
use rayon::prelude::*;
use xbzrle::{Codec, PAGE_SIZE, Page};

use super::stats::Counters;
use crate::guest::{Guest, GuestError};
use crate::params::{Capabilities, MigrationParameters, PageCompression};
use crate::transport::MigrationSink;

/// Longest zstd/zlib frame worth sending: a COMPRESSED record (header + 3 + frame) must be
/// shorter than a PAGE record (header + 4096).
const MAX_FRAME: usize = PAGE_SIZE - 4;
/// `auto`'s first guess of the link rate when `max-bandwidth` is 0 (unlimited): 10 Gbit/s.
const UNLIMITED_GUESS: u64 = 1_250_000_000;

const PAGE: u64 = PAGE_SIZE as u64;
/// Pages per run of one shard: page `p` is shard `(p / RUN_PAGES) mod n`
/// ([`precopy_stream::multifd::RUN_PAGES`]).
const RUN_PAGES: u64 = precopy_stream::multifd::RUN_PAGES;
/// Batches of fewer pages are processed on the calling thread, shard after shard.
const SMALL_BATCH: usize = 64;

/// The stream writer of a migration.
pub(crate) type Writer = StreamWriter<Box<dyn MigrationSink>>;

/// One page to send: RAM block index, page index in the block, and its address in the
/// flat RAM address space (the XBZRLE cache key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Job {
    pub(crate) block: usize,
    pub(crate) page: u64,
    pub(crate) addr: u64,
    /// The page's key in its shard's XBZRLE cache: `addr` with one shard; with `n`
    /// shards the shard-local page number (the shard's runs of
    /// [`RUN_PAGES`] pages laid end to end), times 4096, so a shard's pages use all of
    /// its cache's slots, not one in n.
    pub(crate) key: u64,
}

/// Outcome of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Zero,
    Page,
    /// An XBZRLE record of this many delta bytes.
    Xbzrle(usize),
    /// A COMPRESSED record: the method and the frame's length (in `Slot::frame`).
    Compressed(Method, usize),
    Unchanged,
}

/// The page copy and the delta and frame buffers of one page in flight.
struct Slot {
    page: Page,
    delta: Page,
    frame: Page,
    /// A second frame for `auto`'s probes.
    frame2: Page,
}

impl Slot {
    fn new() -> Box<Slot> {
        Box::new(Slot {
            page: [0; PAGE_SIZE],
            delta: [0; PAGE_SIZE],
            frame: [0; PAGE_SIZE],
            frame2: [0; PAGE_SIZE],
        })
    }
}

/// One shard's compressor, `auto` selector and CPU time per method.
struct Compression {
    mode: PageCompression,
    comp: PageCompressor,
    selector: Option<Selector>,
    /// ns spent encoding, per [`Method::index`].
    cpu_ns: [u64; 4],
    /// `auto` on the sequential path: the thread's CPU time per page besides encoding.
    overhead: Option<Overhead>,
}

/// Pages between two readings of the thread's CPU time for [`Overhead`].
const OVERHEAD_WINDOW: u64 = 512;

/// With one shard the thread that encodes also copies pages out of the guest and writes
/// the records (blocking while the link or its rate limit is behind). Every
/// [`OVERHEAD_WINDOW`] pages its CPU time besides encoding, per page, goes to the
/// selector ([`Selector::set_overhead_ns`]): a thread that never waits is the bottleneck
/// even when the time spent writing looks like link time.
struct Overhead {
    /// The thread's CPU ns at the start of the window.
    thread_ns: u64,
    /// ns spent encoding (and on hints) in the window.
    encode_ns: u64,
    /// Pages in the window.
    pages: u64,
    /// Smoothed overhead, ns per page (`None` before the first window).
    per_page: Option<f64>,
}

fn elapsed_ns(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

/// CPU ns the calling thread has run (`CLOCK_THREAD_CPUTIME_ID`); `None` where unknown.
fn thread_cpu_ns() -> Option<u64> {
    #[cfg(all(unix, not(miri)))]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call;
        // clock_gettime only writes it.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }
    #[cfg(not(all(unix, not(miri))))]
    {
        None
    }
}

impl Compression {
    fn new(params: &MigrationParameters, shards: usize) -> Result<Compression, CompressError> {
        let comp = PageCompressor::new(Levels {
            zstd: params.multifd_zstd_level,
            zlib: params.multifd_zlib_level,
        })?;
        let selector = (params.page_compression == PageCompression::Auto).then(|| {
            let guess = if params.max_bandwidth > 0 {
                params.max_bandwidth
            } else {
                UNLIMITED_GUESS
            };
            let mut s = Selector::new(
                guess,
                shards,
                DEFAULT_PROBE_MIN,
                DEFAULT_PROBE_MAX,
                AUTO_CANDIDATES,
            );
            // One shard: the thread that encodes also writes, and without a rate limit
            // its waits are the receiver's (see `Selector::set_serial`).
            s.set_serial(shards == 1 && params.max_bandwidth == 0);
            s
        });
        let overhead = (selector.is_some() && shards == 1)
            .then(thread_cpu_ns)
            .flatten()
            .map(|thread_ns| Overhead {
                thread_ns,
                encode_ns: 0,
                pages: 0,
                per_page: None,
            });
        Ok(Compression {
            mode: params.page_compression,
            comp,
            selector,
            cpu_ns: [0; 4],
            overhead,
        })
    }

    /// Compress the page with `m` into `frame`; `None` when it does not shrink enough.
    fn try_method(&mut self, m: Method, page: &Page, frame: &mut Page) -> Option<usize> {
        let t = Instant::now();
        let r = self.comp.compress(m, page, None, &mut frame[..MAX_FRAME]);
        let ns = elapsed_ns(t);
        self.cpu_ns[m.index()] += ns;
        if let Some(s) = &mut self.selector {
            s.record(m, *r.as_ref().unwrap_or(&PAGE_SIZE), ns);
        }
        r.ok()
    }

    fn compressed_or_page(&mut self, m: Method, slot: &mut Slot) -> Kind {
        match self.try_method(m, &slot.page, &mut slot.frame) {
            Some(n) => Kind::Compressed(m, n),
            None => Kind::Page,
        }
    }

    /// How to send a page that is not zero: `cached` is the XBZRLE cache's copy on a hit
    /// (updated to the page's content here, whatever is sent), `overflow` the XBZRLE
    /// overflow count.
    fn finish(
        &mut self,
        codec: &Codec,
        slot: &mut Slot,
        cached: Option<&mut Page>,
        overflow: &mut u64,
    ) -> Kind {
        if self.mode == PageCompression::Auto {
            return self.auto(codec, slot, cached, overflow);
        }
        let xbzrle = match cached {
            Some(c) => match self.xbzrle(codec, slot, c, overflow) {
                Ok(0) => return Kind::Unchanged,
                Ok(n) => Some(n),
                Err(()) => None,
            },
            None => None,
        };
        match self.mode {
            PageCompression::Zstd | PageCompression::Zlib => {
                if let Some(n) = xbzrle {
                    return Kind::Xbzrle(n);
                }
                let m = if self.mode == PageCompression::Zstd {
                    Method::Zstd
                } else {
                    Method::Zlib
                };
                self.compressed_or_page(m, slot)
            }
            _ => xbzrle.map_or(Kind::Page, Kind::Xbzrle),
        }
    }

    /// The XBZRLE delta of the page against `cached` into `slot.delta` (the cache copy
    /// then holds the page), timed; `Err` on overflow (counted).
    fn xbzrle(
        &mut self,
        codec: &Codec,
        slot: &mut Slot,
        cached: &mut Page,
        overflow: &mut u64,
    ) -> Result<usize, ()> {
        let t = Instant::now();
        let r = codec.encode_and_update(cached, &slot.page, &mut slot.delta[..PAGE_SIZE - 1]);
        let ns = elapsed_ns(t);
        self.cpu_ns[Method::Xbzrle.index()] += ns;
        let payload = *r.as_ref().unwrap_or(&PAGE_SIZE);
        if let Some(s) = &mut self.selector {
            s.record(Method::Xbzrle, payload, ns);
        }
        r.map_err(|_| *overflow += 1)
    }

    /// `auto`: the page's [`Hint`] class ([`Hint::Cached`] on a cache hit), then the
    /// selector's choice in that class (and, on a probe, one more method), the shorter
    /// sent; the page's CPU and bytes are reported to the selector.
    fn auto(
        &mut self,
        codec: &Codec,
        slot: &mut Slot,
        cached: Option<&mut Page>,
        overflow: &mut u64,
    ) -> Kind {
        if let Some(s) = &mut self.selector {
            // (The hint's ~50 ns are not timed: timing would cost as much. On the
            // sequential path they count in the thread's overhead.)
            s.set_hint(match cached {
                Some(_) => Hint::Cached,
                None => Hint::of(&slot.page),
            });
        }
        let before: u64 = self.cpu_ns.iter().sum();
        let kind = self.auto_choose(codec, slot, cached, overflow);
        let spent = self.cpu_ns.iter().sum::<u64>() - before;
        let payload = match kind {
            Kind::Page => PAGE_SIZE,
            Kind::Xbzrle(n) | Kind::Compressed(_, n) => n,
            Kind::Zero | Kind::Unchanged => 0,
        };
        if let Some(s) = &mut self.selector {
            s.account(spent, payload);
        }
        self.measure_overhead(spent);
        kind
    }

    /// Counts one `auto` page that cost `spent` ns of encoding; at the end of a window
    /// gives the selector the thread's CPU per page besides encoding (smoothed).
    fn measure_overhead(&mut self, spent: u64) {
        let (Some(o), Some(sel)) = (&mut self.overhead, &mut self.selector) else {
            return;
        };
        o.encode_ns += spent;
        o.pages += 1;
        if o.pages < OVERHEAD_WINDOW {
            return;
        }
        let Some(now) = thread_cpu_ns() else {
            return;
        };
        let other =
            now.saturating_sub(o.thread_ns).saturating_sub(o.encode_ns) as f64 / o.pages as f64;
        let per_page = o.per_page.map_or(other, |p| p + (other - p) / 4.0);
        o.per_page = Some(per_page);
        sel.set_overhead_ns(per_page as u64);
        o.thread_ns = now;
        o.encode_ns = 0;
        o.pages = 0;
    }

    fn auto_choose(
        &mut self,
        codec: &Codec,
        slot: &mut Slot,
        cached: Option<&mut Page>,
        overflow: &mut u64,
    ) -> Kind {
        let Some(sel) = self.selector.as_mut() else {
            return Kind::Page;
        };
        let (chosen, probe, try_xbzrle) = match sel.choose(cached.is_some()) {
            Choice::Use(m) => (m, None, false),
            Choice::Probe { chosen, probe } => (chosen, Some(probe), false),
            Choice::TryXbzrle { fallback } => (fallback, None, true),
        };
        let mut xbzrle = None;
        let x0 = self.cpu_ns[Method::Xbzrle.index()];
        if let Some(c) = cached {
            if try_xbzrle || chosen == Method::Xbzrle || probe == Some(Method::Xbzrle) {
                match self.xbzrle(codec, slot, c, overflow) {
                    Ok(0) => return Kind::Unchanged,
                    Ok(n) => xbzrle = Some(n),
                    Err(()) => {}
                }
            } else if c[..] == slot.page[..] {
                return Kind::Unchanged;
            } else {
                // Not encoded, but the cache must hold what the destination will have.
                c.copy_from_slice(&slot.page);
            }
        }
        let xbzrle_ns = self.cpu_ns[Method::Xbzrle.index()] - x0;
        if try_xbzrle
            && let Some(n) = xbzrle
            && self
                .selector
                .as_ref()
                .is_some_and(|s| s.keep_xbzrle(Some(n), chosen))
        {
            return Kind::Xbzrle(n);
        }
        // What chosen (frame) and probe (frame2) made of the page: payload (None = not
        // shrunk, sent raw) and CPU ns.
        let mut make = |m: Method, second: bool, this: &mut Self| -> (Method, Option<usize>, u64) {
            let before = this.cpu_ns[m.index()];
            let payload = match m {
                Method::None => Some(PAGE_SIZE),
                Method::Xbzrle => xbzrle,
                _ if second => this.try_method(m, &slot.page, &mut slot.frame2),
                _ => this.try_method(m, &slot.page, &mut slot.frame),
            };
            let ns = if m == Method::Xbzrle {
                xbzrle_ns
            } else {
                this.cpu_ns[m.index()] - before
            };
            (m, payload, ns)
        };
        let c = make(chosen, false, self);
        let winner = match probe {
            None => c,
            Some(p) => {
                let p = make(p, true, self);
                let send = match self.selector.as_mut() {
                    Some(sel) => sel.probe_done(c, p),
                    None => c.0,
                };
                if send == p.0 { p } else { c }
            }
        };
        let (m, n) = match winner {
            (m, Some(n), _) => (m, n),
            _ => return Kind::Page,
        };
        let second = probe == Some(m) && m != chosen;
        match m {
            Method::None => Kind::Page,
            Method::Xbzrle => Kind::Xbzrle(n),
            _ => {
                if second {
                    slot.frame[..n].copy_from_slice(&slot.frame2[..n]);
                }
                Kind::Compressed(m, n)
            }
        }
    }
}

/// An XBZRLE cache (shard) and its overflow count.
struct Xbzrle {
    cache: Option<PageCache>,
    /// Deltas that did not fit in a page (sent whole).
    overflow: u64,
}

/// One cache shard with its batch work area (one per encoding thread or multifd
/// channel). Aligned to 128 bytes (two cache lines, the adjacent-line prefetch unit) so
/// the per-page counters of one shard never share a line with its neighbour's fields.
#[repr(align(128))]
struct Shard {
    xbzrle: Xbzrle,
    comp: Compression,
    jobs: Vec<Job>,
    slots: Vec<Box<Slot>>,
    kinds: Vec<Kind>,
    error: Option<SendError>,
    /// multifd: this shard's page channel (its records go there, written on the shard's
    /// thread) and its counts since the last batch.
    out: Option<Writer>,
    c: Counters,
}

impl Shard {
    /// Process this shard's jobs of a batch. multifd: each record goes out on the shard's
    /// channel at once, so one slot serves every page (the page copy stays in L1);
    /// otherwise each page keeps its slot until the caller writes the batch in order.
    /// Stops at the first error (in `error`).
    fn process_batch(&mut self, index: usize, step: &Step<'_>, codec: &Codec, timed: bool) {
        let multifd = self.out.is_some();
        let need = if multifd { 1 } else { self.jobs.len() };
        while self.slots.len() < need {
            self.slots.push(Slot::new());
        }
        self.kinds.clear();
        for (j, &job) in self.jobs.iter().enumerate() {
            // Bring the next page in while this one is encoded.
            if let Some(next) = self.jobs.get(j + 1) {
                step.prefetch(&self.xbzrle, next);
            }
            let slot = &mut self.slots[if multifd { 0 } else { j }];
            let r = step
                .process(codec, &mut self.xbzrle, &mut self.comp, slot, job)
                .map_err(SendError::from)
                .and_then(|k| match &mut self.out {
                    // multifd: the record goes out on this shard's channel, now.
                    Some(out) => emit(out, &mut self.c, k, slot, job, timed)
                        .map(|()| k)
                        .map_err(|source| SendError::Channel {
                            channel: index + 1,
                            source,
                        }),
                    None => Ok(k),
                });
            match r {
                Ok(k) => self.kinds.push(k),
                Err(e) => {
                    self.error = Some(e);
                    return;
                }
            }
        }
    }
}

/// Prefetch every cache line of `page` into L1.
fn prefetch_bytes(page: &Page) {
    #[cfg(target_arch = "x86_64")]
    for line in page.chunks_exact(64) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of the x86_64 baseline, so the target feature is present;
        // a prefetch never faults and does not access memory in the language's sense.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = page;
}

/// What every page of one send step shares.
#[derive(Clone, Copy)]
pub(crate) struct Step<'a> {
    pub(crate) guest: &'a dyn Guest,
    /// The XBZRLE cache generation (the dirty-bitmap sync count).
    pub(crate) generation: u64,
    /// XBZRLE in use (after the bulk stage, with the capability on).
    pub(crate) use_cache: bool,
    /// The final pass (guest stopped): nothing is inserted into the cache any more.
    pub(crate) last_stage: bool,
}

static ZERO_PAGE: Page = [0; PAGE_SIZE];

impl Step<'_> {
    /// Start bringing `job`'s guest page and, with XBZRLE in use, its cached copy into
    /// the CPU caches: called one page ahead, so neither copy-out nor encoding waits for
    /// memory.
    fn prefetch(&self, x: &Xbzrle, job: &Job) {
        self.guest.prefetch_page(job.block, job.page);
        if self.use_cache
            && let Some(c) = &x.cache
            && let Some(p) = c.peek(job.key)
        {
            prefetch_bytes(p);
        }
    }

    /// Copy page `job` out of the guest into `slot` and decide how to send it, updating
    /// the cache.
    fn process(
        &self,
        codec: &Codec,
        x: &mut Xbzrle,
        comp: &mut Compression,
        slot: &mut Slot,
        job: Job,
    ) -> Result<Kind, GuestError> {
        let use_cache = self.use_cache;
        self.guest.read_page(job.block, job.page, &mut slot.page)?;
        if codec.is_zero(&slot.page) {
            // As QEMU's xbzrle_cache_zero_page: an insert of the zero page, not a
            // lookup, so zero pages are neither cache hits nor cache misses. A
            // resident copy of this address is always replaced; a refused insert
            // (another fresh page holds the slot) leaves nothing cached for it.
            if let Some(cache) = x.cache.as_mut().filter(|_| use_cache)
                && !self.last_stage
            {
                let _ = cache.insert(job.key, &ZERO_PAGE, self.generation);
            }
            return Ok(Kind::Zero);
        }
        let Xbzrle { cache, overflow } = x;
        let Some(cache) = cache.as_mut().filter(|_| use_cache) else {
            return Ok(comp.finish(codec, slot, None, overflow));
        };
        match cache.lookup(job.key, self.generation) {
            Some(cached) => Ok(comp.finish(codec, slot, Some(cached), overflow)),
            None => {
                if !self.last_stage {
                    let _ = cache.insert(job.key, &slot.page, self.generation);
                }
                Ok(comp.finish(codec, slot, None, overflow))
            }
        }
    }
}

/// Write the record for one processed page and count it.
fn emit(
    w: &mut Writer,
    c: &mut Counters,
    kind: Kind,
    slot: &Slot,
    job: Job,
    timed: bool,
) -> Result<(), WriteError> {
    let offset = job.page * PAGE;
    let before = w.bytes_written();
    // Timed only for `auto`'s link-rate measure: two clock reads per page cost ~4 % of
    // the per-page time otherwise.
    let t = timed.then(Instant::now);
    let method = match kind {
        Kind::Zero => {
            w.write_zero_page(job.block, offset)?;
            c.duplicate += 1;
            None
        }
        Kind::Page => {
            w.write_page(job.block, offset, &slot.page)?;
            c.normal += 1;
            Some(Method::None)
        }
        Kind::Xbzrle(n) => {
            w.write_xbzrle_page(job.block, offset, &slot.delta[..n])?;
            c.xbzrle_pages += 1;
            c.xbzrle_bytes += w.bytes_written() - before;
            Some(Method::Xbzrle)
        }
        Kind::Compressed(m, n) => {
            w.write_compressed_page(job.block, offset, m, &slot.frame[..n])?;
            Some(m)
        }
        Kind::Unchanged => {
            c.unchanged += 1;
            None
        }
    };
    if let Some(m) = method {
        let s = &mut c.per_method[m.index()];
        s.0 += 1;
        s.1 += w.bytes_written() - before;
        if let Some(t) = t {
            c.emit_ns += elapsed_ns(t);
        }
    }
    c.handled += 1;
    Ok(())
}

/// One shard's XBZRLE cache budget: its share of `total`, at least one page (a cache
/// that works with one stream must work split over `shards` too).
fn shard_cache_size(total: u64, shards: u64) -> u64 {
    (total / shards.max(1)).max(PAGE)
}

/// Why the pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PipelineError {
    /// The XBZRLE cache.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The page compressor (levels, zstd context).
    #[error("page compression: {0}")]
    Compress(#[from] CompressError),
}

/// Why closing a multifd page channel failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelCloseError {
    /// Flushing its last bytes.
    #[error("multifd channel {channel}: {source}")]
    Write {
        channel: usize,
        #[source]
        source: WriteError,
    },
    /// Closing it (the destination did not confirm, or the socket failed).
    #[error("multifd channel {channel}: {source}")]
    Close {
        channel: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Why sending a page failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// Copying the page out of the guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Writing its record.
    #[error(transparent)]
    Stream(#[from] WriteError),
    /// Writing its record on multifd page channel `channel`.
    #[error("multifd channel {channel}: {source}")]
    Channel {
        channel: usize,
        #[source]
        source: WriteError,
    },
}

/// The codec and the cache shards.
pub(crate) struct Pipeline {
    codec: Codec,
    shards: Vec<Shard>,
    /// Stream bytes and emit ns at the last [`Pipeline::update_link`].
    link_mark: (u64, u64),
    /// The link rate last given to the selectors, bytes/s (0 without `auto`).
    link_bandwidth: u64,
    /// multifd: bytes of the page channels already closed.
    closed_channel_bytes: u64,
}

impl Pipeline {
    /// One shard per multifd page channel (`channels`, each shard writing its records
    /// there), else one per encoding thread (a power of two; 1 without
    /// `x-parallel-encoding`), each with an XBZRLE cache of its share of
    /// `xbzrle-cache-size` when XBZRLE is on. Page `p` (flat page index) belongs to shard
    /// `(p / RUN_PAGES) mod n`, which is multifd page channel `1 +` that.
    ///
    /// Errors: the cache cannot be built for that size.
    pub(crate) fn new(
        caps: &Capabilities,
        params: &MigrationParameters,
        channels: Vec<Writer>,
    ) -> Result<Pipeline, PipelineError> {
        let n = if !channels.is_empty() {
            channels.len()
        } else if caps.x_parallel_encoding {
            let t = rayon::current_num_threads().max(1);
            1usize << (usize::BITS - 1 - t.leading_zeros())
        } else {
            1
        };
        let mut shards = Vec::with_capacity(n);
        let mut channels = channels.into_iter();
        for _ in 0..n {
            let cache = if caps.xbzrle {
                Some(PageCache::new(
                    shard_cache_size(params.xbzrle_cache_size, n as u64),
                    Policy::default(),
                )?)
            } else {
                None
            };
            shards.push(Shard {
                xbzrle: Xbzrle { cache, overflow: 0 },
                comp: Compression::new(params, n)?,
                jobs: Vec::new(),
                slots: vec![Slot::new()],
                kinds: Vec::new(),
                error: None,
                out: channels.next(),
                c: Counters::default(),
            });
        }
        let link_bandwidth = shards[0]
            .comp
            .selector
            .as_ref()
            .map_or(0, Selector::bandwidth);
        Ok(Pipeline {
            codec: Codec::new(),
            shards,
            link_mark: (0, 0),
            link_bandwidth,
            closed_channel_bytes: 0,
        })
    }

    /// Every estimation period: the link rate seen by the writes since the last call
    /// (stream bytes over the time spent writing records, which includes waiting for the
    /// transport), capped at `max-bandwidth` when that is set, goes to the `auto`
    /// selectors. `bytes` is the stream's byte count now.
    pub(crate) fn update_link(&mut self, c: &Counters, bytes: u64, max_bandwidth: u64) {
        let (b0, ns0) = self.link_mark;
        self.link_mark = (bytes, c.emit_ns);
        let (db, dns) = (bytes.saturating_sub(b0), c.emit_ns.saturating_sub(ns0));
        if self.shards[0].comp.selector.is_none() || db < 64 * PAGE || dns == 0 {
            return;
        }
        let mut rate = (db as u128 * 1_000_000_000 / dns as u128).min(u64::MAX as u128) as u64;
        if max_bandwidth > 0 {
            rate = rate.min(max_bandwidth);
        }
        self.link_bandwidth = rate;
        // `max-bandwidth` may have changed while migrating: a rate-limited sender's waits
        // are sleeps, slack for the CPU; an unlimited one's are the receiver's.
        let serial = self.shards.len() == 1 && max_bandwidth == 0;
        for s in &mut self.shards {
            if let Some(sel) = &mut s.comp.selector {
                sel.set_bandwidth(rate);
                sel.set_serial(serial);
            }
        }
    }

    /// The link rate the `auto` selectors use, bytes/s (0 without `auto`).
    pub(crate) fn link_bandwidth(&self) -> u64 {
        self.link_bandwidth
    }

    /// ns spent encoding with `m`, summed over the shards.
    pub(crate) fn cpu_ns(&self, m: Method) -> u64 {
        self.shards.iter().map(|s| s.comp.cpu_ns[m.index()]).sum()
    }

    /// Whether record writes are timed (`auto` measures the link by them).
    fn link_timed(&self) -> bool {
        self.shards[0].comp.selector.is_some()
    }

    /// multifd: bytes written on the page channels so far, open or closed (0 without
    /// multifd).
    pub(crate) fn channel_bytes(&self) -> u64 {
        self.closed_channel_bytes
            + self
                .shards
                .iter()
                .filter_map(|s| s.out.as_ref())
                .map(Writer::bytes_written)
                .sum::<u64>()
    }

    /// multifd: true when the pages go on page channels.
    pub(crate) fn is_multifd(&self) -> bool {
        self.shards.iter().any(|s| s.out.is_some())
    }

    /// multifd: sync point `seq` on every page channel, each flushed (the main channel's
    /// follows, written by the caller: [`precopy_stream::multifd`]).
    pub(crate) fn channels_sync(&mut self, seq: u64) -> Result<(), SendError> {
        self.each_channel(|out| out.write_multifd_flush(seq).and_then(|()| out.flush()))
    }

    fn each_channel(
        &mut self,
        mut f: impl FnMut(&mut Writer) -> Result<(), WriteError>,
    ) -> Result<(), SendError> {
        for (i, sh) in self.shards.iter_mut().enumerate() {
            if let Some(out) = &mut sh.out {
                f(out).map_err(|source| SendError::Channel {
                    channel: i + 1,
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// multifd: the closing EOS on every page channel, flushed.
    pub(crate) fn channels_end(&mut self) -> Result<(), SendError> {
        self.each_channel(|out| out.write_multifd_channel_end().and_then(|()| out.flush()))
    }

    /// multifd: close every page channel ([`MigrationSink::close`]: a socket waits for the
    /// destination to close its end). Their bytes stay counted in
    /// [`channel_bytes`](Self::channel_bytes), whether closing succeeds or not.
    pub(crate) fn close_channels(&mut self) -> Result<(), ChannelCloseError> {
        for (i, sh) in self.shards.iter_mut().enumerate() {
            if let Some(out) = sh.out.take() {
                self.closed_channel_bytes += out.bytes_written();
                let channel = i + 1;
                let mut sink = out
                    .finish()
                    .map_err(|e| ChannelCloseError::Write { channel, source: e })?;
                sink.close()
                    .map_err(|e| ChannelCloseError::Close { channel, source: e })?;
            }
        }
        Ok(())
    }

    /// Number of shards (encoding threads or multifd page channels).
    pub(crate) fn shards(&self) -> usize {
        self.shards.len()
    }

    /// More than one shard: pages go in batches.
    pub(crate) fn is_parallel(&self) -> bool {
        self.shards.len() > 1
    }

    /// `migrate-set-parameters xbzrle-cache-size` during a migration: resize every shard's
    /// cache in place to its share.
    pub(crate) fn resize_cache(&mut self, bytes: u64) -> Result<(), CacheError> {
        let n = self.shards.len() as u64;
        for s in &mut self.shards {
            if let Some(c) = &mut s.xbzrle.cache {
                c.resize(shard_cache_size(bytes, n))?;
            }
        }
        Ok(())
    }

    /// XBZRLE cache misses so far (the caches' own count).
    pub(crate) fn cache_misses(&self) -> u64 {
        self.shards
            .iter()
            .filter_map(|s| s.xbzrle.cache.as_ref())
            .map(|c| c.stats().misses)
            .sum()
    }

    /// XBZRLE overflows so far.
    pub(crate) fn overflows(&self) -> u64 {
        self.shards.iter().map(|s| s.xbzrle.overflow).sum()
    }

    /// Sequential path: start bringing `job` (the next page) in, see [`Step::prefetch`].
    pub(crate) fn prefetch(&self, step: &Step<'_>, job: &Job) {
        step.prefetch(&self.shards[0].xbzrle, job);
    }

    /// Send one page now (sequential path).
    pub(crate) fn send_one(
        &mut self,
        step: &Step<'_>,
        job: Job,
        w: &mut Writer,
        c: &mut Counters,
    ) -> Result<(), SendError> {
        let timed = self.link_timed();
        let sh = &mut self.shards[0];
        let slot = &mut sh.slots[0];
        let kind = step.process(&self.codec, &mut sh.xbzrle, &mut sh.comp, slot, job)?;
        match &mut sh.out {
            Some(out) => emit(out, c, kind, slot, job, timed)
                .map_err(|source| SendError::Channel { channel: 1, source }),
            None => Ok(emit(w, c, kind, slot, job, timed)?),
        }
    }

    /// Send a batch of pages with the shards working in parallel.
    pub(crate) fn send_batch(
        &mut self,
        step: &Step<'_>,
        jobs: &[Job],
        w: &mut Writer,
        c: &mut Counters,
    ) -> Result<(), SendError> {
        let n = self.shards.len() as u64;
        for s in &mut self.shards {
            s.jobs.clear();
        }
        for &job in jobs {
            // Runs of RUN_PAGES pages per shard (the multifd channel layout): round-robin
            // by single pages made two threads contend (1.3x on 2 cores; runs: 1.7x).
            let p = job.addr / PAGE;
            let (run, off) = (p / RUN_PAGES, p % RUN_PAGES);
            self.shards[(run % n) as usize].jobs.push(Job {
                key: ((run / n) * RUN_PAGES + off) * PAGE,
                ..job
            });
        }
        let codec = &self.codec;
        let timed = self.link_timed();
        if jobs.len() < SMALL_BATCH {
            // A few pages (the end of a rate-limit slice): not worth waking threads.
            for (i, sh) in self.shards.iter_mut().enumerate() {
                sh.process_batch(i, step, codec, timed);
            }
        } else if self.shards.iter().any(|s| s.out.is_some()) {
            // multifd: one thread per channel for the whole batch, shard 0 on this one
            // (rayon's pool lets an idle worker sleep through a two-way split, and the
            // other worker then runs both halves).
            let (first, rest) = self.shards.split_at_mut(1);
            std::thread::scope(|s| {
                for (i, sh) in rest.iter_mut().enumerate() {
                    s.spawn(move || sh.process_batch(i + 1, step, codec, timed));
                }
                first[0].process_batch(0, step, codec, timed);
            });
        } else {
            self.shards
                .par_iter_mut()
                .enumerate()
                .for_each(|(i, sh)| sh.process_batch(i, step, codec, timed));
        }
        for sh in &mut self.shards {
            c.absorb(&mut sh.c);
            if let Some(e) = sh.error.take() {
                return Err(e);
            }
            if sh.out.is_none() {
                for (j, &job) in sh.jobs.iter().enumerate() {
                    emit(w, c, sh.kinds[j], &sh.slots[j], job, timed)?;
                }
            }
        }
        Ok(())
    }
}
