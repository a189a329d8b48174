//! The per-page pipeline: copy a page out of the guest once, decide ZERO / XBZRLE / PAGE /
//! unchanged against the XBZRLE cache, and write the record (the rules are in the
//! [`source`](super) docs). With the `x-parallel-encoding` capability the cache is split
//! into shards by page address, one per encoding thread, and a batch of pages is prepared in
//! parallel, then written in a fixed order (shard, then page), so the stream only depends
//! on the batch.

use precopy_pagecache::{CacheError, PageCache, Policy};
use precopy_stream::{StreamWriter, WriteError};
use rayon::prelude::*;
use xbzrle::{Codec, PAGE_SIZE, Page};

use super::stats::Counters;
use crate::guest::{Guest, GuestError};
use crate::params::{Capabilities, MigrationParameters};
use crate::transport::MigrationSink;

const PAGE: u64 = PAGE_SIZE as u64;

/// The stream writer of a migration.
pub(crate) type Writer = StreamWriter<Box<dyn MigrationSink>>;

/// One page to send: RAM block index, page index in the block, and its address in the
/// flat RAM address space (the XBZRLE cache key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Job {
    pub(crate) block: usize,
    pub(crate) page: u64,
    pub(crate) addr: u64,
}

/// Outcome of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Zero,
    Page,
    /// An XBZRLE record of this many delta bytes.
    Xbzrle(usize),
    Unchanged,
}

/// The page copy and the delta buffer of one page in flight.
struct Slot {
    page: Page,
    delta: Page,
}

impl Slot {
    fn new() -> Box<Slot> {
        Box::new(Slot {
            page: [0; PAGE_SIZE],
            delta: [0; PAGE_SIZE],
        })
    }
}

/// An XBZRLE cache (shard) and its overflow count.
struct Xbzrle {
    cache: Option<PageCache>,
    /// Deltas that did not fit in a page (sent whole).
    overflow: u64,
}

/// One cache shard with its batch work area (one per encoding thread).
struct Shard {
    xbzrle: Xbzrle,
    jobs: Vec<Job>,
    slots: Vec<Box<Slot>>,
    kinds: Vec<Kind>,
    error: Option<GuestError>,
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
    /// Copy page `job` out of the guest into `slot` and decide how to send it, updating
    /// the cache.
    fn process(
        &self,
        codec: &Codec,
        x: &mut Xbzrle,
        slot: &mut Slot,
        job: Job,
    ) -> Result<Kind, GuestError> {
        let cache = if self.use_cache {
            x.cache.as_mut()
        } else {
            None
        };
        self.guest.read_page(job.block, job.page, &mut slot.page)?;
        if codec.is_zero(&slot.page) {
            // As QEMU's xbzrle_cache_zero_page: an insert of the zero page, not a
            // lookup, so zero pages are neither cache hits nor cache misses. A
            // resident copy of this address is always replaced; a refused insert
            // (another fresh page holds the slot) leaves nothing cached for it.
            if let Some(cache) = cache
                && !self.last_stage
            {
                let _ = cache.insert(job.addr, &ZERO_PAGE, self.generation);
            }
            return Ok(Kind::Zero);
        }
        let Some(cache) = cache else {
            return Ok(Kind::Page);
        };
        match cache.lookup(job.addr, self.generation) {
            Some(cached) => {
                match codec.encode_and_update(cached, &slot.page, &mut slot.delta[..PAGE_SIZE - 1])
                {
                    Ok(0) => Ok(Kind::Unchanged),
                    Ok(n) => Ok(Kind::Xbzrle(n)),
                    Err(_) => {
                        x.overflow += 1;
                        Ok(Kind::Page)
                    }
                }
            }
            None => {
                if !self.last_stage {
                    let _ = cache.insert(job.addr, &slot.page, self.generation);
                }
                Ok(Kind::Page)
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
) -> Result<(), WriteError> {
    let offset = job.page * PAGE;
    match kind {
        Kind::Zero => {
            w.write_zero_page(job.block, offset)?;
            c.duplicate += 1;
        }
        Kind::Page => {
            w.write_page(job.block, offset, &slot.page)?;
            c.normal += 1;
        }
        Kind::Xbzrle(n) => {
            let before = w.bytes_written();
            w.write_xbzrle_page(job.block, offset, &slot.delta[..n])?;
            c.xbzrle_pages += 1;
            c.xbzrle_bytes += w.bytes_written() - before;
        }
        Kind::Unchanged => c.unchanged += 1,
    }
    c.handled += 1;
    Ok(())
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
}

/// The codec and the cache shards.
pub(crate) struct Pipeline {
    codec: Codec,
    shards: Vec<Shard>,
}

impl Pipeline {
    /// One shard per encoding thread (a power of two; 1 without `x-parallel-encoding`),
    /// each with an XBZRLE cache of its share of `xbzrle-cache-size` when XBZRLE is on.
    ///
    /// Errors: the cache cannot be built for that size.
    pub(crate) fn new(
        caps: &Capabilities,
        params: &MigrationParameters,
    ) -> Result<Pipeline, CacheError> {
        let n = if caps.x_parallel_encoding {
            let t = rayon::current_num_threads().max(1);
            1usize << (usize::BITS - 1 - t.leading_zeros())
        } else {
            1
        };
        let mut shards = Vec::with_capacity(n);
        for _ in 0..n {
            let cache = if caps.xbzrle {
                Some(PageCache::new(
                    params.xbzrle_cache_size / n as u64,
                    Policy::default(),
                )?)
            } else {
                None
            };
            shards.push(Shard {
                xbzrle: Xbzrle { cache, overflow: 0 },
                jobs: Vec::new(),
                slots: vec![Slot::new()],
                kinds: Vec::new(),
                error: None,
            });
        }
        Ok(Pipeline {
            codec: Codec::new(),
            shards,
        })
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
                c.resize(bytes / n)?;
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

    /// Send one page now (sequential path).
    pub(crate) fn send_one(
        &mut self,
        step: &Step<'_>,
        job: Job,
        w: &mut Writer,
        c: &mut Counters,
    ) -> Result<(), SendError> {
        let sh = &mut self.shards[0];
        let slot = &mut sh.slots[0];
        let kind = step.process(&self.codec, &mut sh.xbzrle, slot, job)?;
        emit(w, c, kind, slot, job)?;
        Ok(())
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
            self.shards[((job.addr / PAGE) % n) as usize].jobs.push(job);
        }
        let codec = &self.codec;
        self.shards.par_iter_mut().for_each(|sh| {
            while sh.slots.len() < sh.jobs.len() {
                sh.slots.push(Slot::new());
            }
            sh.kinds.clear();
            for (j, &job) in sh.jobs.iter().enumerate() {
                match step.process(codec, &mut sh.xbzrle, &mut sh.slots[j], job) {
                    Ok(k) => sh.kinds.push(k),
                    Err(e) => {
                        sh.error = Some(e);
                        return;
                    }
                }
            }
        });
        for sh in &mut self.shards {
            if let Some(e) = sh.error.take() {
                return Err(e.into());
            }
            for (j, &job) in sh.jobs.iter().enumerate() {
                emit(w, c, sh.kinds[j], &sh.slots[j], job)?;
            }
        }
        Ok(())
    }
}
