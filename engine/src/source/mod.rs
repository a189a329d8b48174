//! The source side: the pre-copy loop that [`Migrator`](crate::Migrator) runs on a migration
//! thread.
//!
//! | file | what |
//! |---|---|
//! | this file | the thread: setup, iterate, complete, and restoring the source on failure |
//! | `control.rs` | the state shared by the control API and the thread |
//! | `pages.rs` | the per-page pipeline (zero / XBZRLE / page, parallel shards) |
//! | `bitmap.rs` | the migration bitmap with its tail mask, fetch-and-clear and cursor |
//! | `stats.rs` | counters, the 100 ms estimator and the 1 s period |
//!
//! # The loop (QEMU migration/migration.c `migration_thread`, migration/ram.c)
//!
//! 1. **setup**: open the transport, write the file header and the `ram` START section with
//!    MEM_SIZE, start the dirty log, mark every page dirty (the first pass sends every page,
//!    whatever the dirty log says), one dirty-bitmap sync (`dirty-sync-count` = 1).
//! 2. **active**: send dirty pages in `ram` PART sections under the rate limit (a byte budget
//!    per 100 ms slice from `max-bandwidth`). When the dirty bitmap is exhausted (pass end),
//!    sync the dirty log; one sync is one XBZRLE cache generation. Every 100 ms: bandwidth =
//!    bytes sent / time, threshold = bandwidth × `downtime-limit` (or
//!    `avail-switchover-bandwidth` × `downtime-limit` when set), `expected-downtime` =
//!    remaining / bandwidth. At a sync at least 1 s after the last one, auto-converge looks
//!    at the period ([`AutoConverge`]).
//! 3. **switchover**: when the remaining dirty bytes fall below the threshold (after a fresh
//!    sync), or nothing is dirty: stop the vCPUs, sync once more, send the rest in the `ram`
//!    END section without rate limit, EOF, then the VM description with the RAM digest
//!    → **completed**. The source guest stays stopped (the destination owns it now).
//!
//! Downtime is measured from the vCPU stop to the flush of EOF (all RAM on the wire). The RAM
//! digest (BLAKE3 of the stopped guest's RAM) is computed and sent after that, in the VM
//! description; it is a verification aid and not counted as downtime.
//!
//! # Per page
//!
//! The page is copied out of guest RAM once ([`GuestRam::read_page`](crate::GuestRam::read_page)); that copy is what is
//! tested, encoded, cached and sent.
//! * all zero → ZERO record; with XBZRLE, the zero page is inserted into the cache (as QEMU's
//!   `xbzrle_cache_zero_page`: no lookup, so not counted as a hit or a miss; not in the final
//!   pass);
//! * XBZRLE on (after the first pass) and cache hit → encode against the cached copy and
//!   update it in one pass: empty delta → unchanged, nothing sent; a delta shorter than a page
//!   → XBZRLE record; overflow (delta ≥ page) → PAGE record, the cache holds the bytes sent;
//! * XBZRLE on and cache miss → PAGE record, and the page is inserted (not in the final pass);
//! * otherwise → PAGE record.
//!
//! # multifd (capability `multifd`, parameter `multifd-channels`)
//!
//! The pages go on `multifd-channels` page connections beside the main one, in the layout
//! of [`precopy_stream::multifd`]. The pipeline has one shard per page channel: page `p`
//! (flat page index) is always on channel `1 + (p / 64) mod N` (runs of 64 pages), whose
//! shard has its own XBZRLE cache of `xbzrle-cache-size / N` bytes, at least one page
//! (resized in place with the rest), its own compressor and encoder state. A batch of
//! dirty pages (up to 512 per channel) is split by shard and each shard copies, encodes
//! and writes its records on its own thread, one per channel. The main channel carries
//! the header, MEM_SIZE, the sync points, the device state, EOF and the VM description.
//!
//! **Ordering.** A page sent twice goes twice on the same connection, so its copies (and
//! the XBZRLE deltas between them) arrive in order. On top of that, at the end of every
//! pass (before the dirty-bitmap sync) and after the last page, the source writes sync
//! point `k` on every page channel, then on the main channel, flushing each: the
//! destination holds every channel at `k` until all reached it, so every page of pass `k`
//! lands before any page of pass `k + 1`, and the main channel's END section is read only
//! after every page. The source closes the page channels (each waits for the destination
//! to close its end) before the main channel, so completed means everything was read.
//!
//! **Rate limit and stats.** The page channels' bytes are charged to the main writer's
//! rate limiter, so `max-bandwidth` bounds the sum; `transferred`, `mbps` and the
//! estimator count every connection; `multifd-bytes` counts the page channels'.
//!
//! # Failure and cancel
//!
//! A transport error, a guest error or a cancel ends the migration as failed or cancelled:
//! the throttle is set back to 0, the vCPUs are resumed if the loop stopped them, the dirty
//! log is stopped. Guest memory is only ever read. A new migration can start at once.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use precopy_stream::multifd::{HELLO_LEN, Hello};
use precopy_stream::{Encoder, StreamWriter};
use xbzrle::PAGE_SIZE;

use crate::guest::{Guest, RamBlockInfo, SharedGuest};
use crate::info::{MigrationInfo, MigrationStatus};
use crate::params::{Capabilities, MigrationParameters};
use crate::policy::{self, AutoConverge};
use crate::transport::MigrationSink;
use crate::vmdesc;

mod bitmap;
pub(crate) mod control;
mod error;
mod pages;
mod stats;

use bitmap::DirtyBitmap;
use control::Shared;
use error::{SourceError, Stop};
use pages::{Job, Pipeline, PipelineError, Step, Writer};
use stats::{Counters, ESTIMATE_PERIOD, Estimator, Period};

const PAGE: u64 = PAGE_SIZE as u64;
/// Longest time one PART section keeps sending before the loop looks around again.
const MAX_ITERATION_TIME: Duration = Duration::from_millis(50);
/// Pages per shard per batch with parallel encoding or multifd: each batch wakes the
/// shard threads once, so it must carry far more work than a wake-up costs.
const BATCH_PER_SHARD: usize = 512;
/// Machine type written in the configuration section.
pub const MACHINE_TYPE: &str = "precopy-sim";

/// What a migration runs with, fixed at start (parameters may change while it runs).
pub(crate) struct Settings {
    pub(crate) params: MigrationParameters,
    pub(crate) caps: Capabilities,
    pub(crate) pass_limit: Option<u64>,
    /// multifd page channels' sinks (empty: one stream).
    pub(crate) channels: Vec<Box<dyn MigrationSink>>,
    /// multifd: the hellos, with this migration id, were written when connecting.
    pub(crate) hellos_sent: Option<[u8; 16]>,
}

/// The migration thread's state.
struct Source<'a> {
    guest: &'a dyn Guest,
    shared: &'a Shared,
    w: Writer,
    settings: Settings,
    blocks: Vec<RamBlockInfo>,
    /// Flat RAM address of each block's first byte (the XBZRLE cache key space).
    base: Vec<u64>,
    /// Bytes of RAM.
    total: u64,
    bitmap: DirtyBitmap,
    pipeline: Option<Pipeline>,
    /// XBZRLE in use (after the bulk stage).
    xbzrle_active: bool,
    /// No page was sent since the last sync.
    synced_clean: bool,
    /// Dirty-bitmap syncs so far (also the XBZRLE cache generation).
    sync_count: u64,
    c: Counters,
    start: Instant,
    setup_ms: u64,
    est: Estimator,
    period: Period,
    ac: AutoConverge,
    throttle: u8,
    /// The loop stopped the vCPUs.
    stopped: bool,
    /// Bytes of the stream once the sink was closed.
    closed_bytes: u64,
    /// multifd page channels' sinks until setup wraps them (empty: one stream).
    channel_sinks: Vec<Box<dyn MigrationSink>>,
    /// multifd: the last sync point's number.
    multifd_seq: u64,
    /// multifd: page-channel bytes already charged to the main writer's rate limiter.
    charged: u64,
    /// multifd: hello bytes written when connecting (before the writers existed), all
    /// connections, and the page channels' share of them.
    hello_bytes: u64,
    channel_hello_bytes: u64,
}

/// The migration thread: setup, iterate, complete; on failure or cancel, restore the source.
/// Publishes the final `query-migrate` and state.
pub(crate) fn run(
    guest: SharedGuest,
    shared: Arc<Shared>,
    sink: Box<dyn MigrationSink>,
    settings: Settings,
) {
    let mut settings = settings;
    let channel_sinks = std::mem::take(&mut settings.channels);
    // `page-compression=xbzrle|auto` needs the XBZRLE cache.
    settings.caps.xbzrle |= settings.params.page_compression.needs_xbzrle_cache();
    let now = Instant::now();
    let mut w = StreamWriter::new(sink);
    w.set_max_bandwidth(settings.params.max_bandwidth);
    let mut src = Source {
        guest: &*guest,
        shared: &shared,
        w,
        settings,
        blocks: Vec::new(),
        base: Vec::new(),
        total: 0,
        bitmap: DirtyBitmap::all_dirty(&[]),
        pipeline: None,
        xbzrle_active: false,
        synced_clean: false,
        sync_count: 0,
        c: Counters::default(),
        start: now,
        setup_ms: 0,
        est: Estimator::new(now),
        period: Period::new(now),
        ac: AutoConverge::new(),
        throttle: 0,
        stopped: false,
        closed_bytes: 0,
        channel_sinks,
        multifd_seq: 0,
        charged: 0,
        hello_bytes: 0,
        channel_hello_bytes: 0,
    };
    let result = src.setup().and_then(|()| src.iterate());
    let (final_status, downtime, error) = match result {
        Ok(d) => {
            let _ = src.guest.set_throttle(0);
            let _ = src.guest.log_stop();
            (MigrationStatus::Completed, Some(d), None)
        }
        Err(stop) => {
            // Restore the source: no throttle, vCPUs running, dirty log off.
            let _ = src.guest.set_throttle(0);
            if src.stopped {
                let _ = src.guest.resume();
            }
            let _ = src.guest.log_stop();
            match stop {
                Stop::Failed(e) if !shared.cancelled() => {
                    (MigrationStatus::Failed, None, Some(e.to_string()))
                }
                _ => (MigrationStatus::Cancelled, None, None),
            }
        }
    };
    let mut info = src.info(final_status);
    info.downtime = downtime;
    info.error_desc = error;
    if final_status == MigrationStatus::Completed {
        completed_mbps(&mut info);
    }
    let mut ctl = shared.lock();
    ctl.publish(info);
    ctl.abort = None;
    shared.set_status(&mut ctl, final_status);
}

/// multifd: charge the page channels' new bytes to the main writer's rate limiter, so
/// `max-bandwidth` bounds the total over all connections.
fn charge(pipeline: &Pipeline, w: &mut Writer, charged: &mut u64) {
    let b = pipeline.channel_bytes();
    if b > *charged {
        w.rate_limiter_mut().record(b - *charged);
        *charged = b;
    }
}

/// A migration id for the multifd hellos: unique per process and start (BLAKE3 of the
/// process id, the time and a counter).
pub(crate) fn new_migration_id() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(&now.to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
}

/// As QEMU at completion: `mbps` becomes the mean over the whole transfer,
/// every byte sent over the time after setup (Mbit/s, 10^6 bits), so a
/// migration shorter than one estimate period does not report 0.
fn completed_mbps(info: &mut MigrationInfo) {
    let transfer_ms = info
        .total_time
        .unwrap_or(0)
        .saturating_sub(info.setup_time.unwrap_or(0));
    if let Some(ram) = info.ram.as_mut()
        && transfer_ms > 0
    {
        ram.mbps = ram.transferred as f64 * 8.0 / transfer_ms as f64 / 1000.0;
    }
}

impl Source<'_> {
    fn check_cancel(&self) -> Result<(), Stop> {
        if self.shared.cancelled() {
            Err(Stop::Cancelled)
        } else {
            Ok(())
        }
    }

    fn setup(&mut self) -> Result<(), Stop> {
        self.blocks = self.guest.blocks();
        if self.blocks.is_empty() {
            return Err(SourceError::NoRamBlocks.into());
        }
        let mut base = 0;
        for b in &self.blocks {
            self.base.push(base);
            base += b.used_length;
        }
        self.total = base;
        self.bitmap = DirtyBitmap::all_dirty(&self.blocks);
        let channels = self.open_channels()?;
        self.pipeline = Some(
            Pipeline::new(&self.settings.caps, &self.settings.params, channels).map_err(
                |e| match e {
                    PipelineError::Cache(e) => SourceError::Cache(e),
                    PipelineError::Compress(e) => SourceError::Compress(e),
                },
            )?,
        );
        self.check_cancel()?;
        self.w.write_header(MACHINE_TYPE)?;
        self.w.ram_setup(&self.blocks)?;
        self.w.flush()?;
        self.guest.log_start()?;
        // The setup sync (QEMU ram_init_bitmaps): the bitmap is all set already.
        self.sync()?;
        self.setup_ms = self.start.elapsed().as_millis() as u64;
        let now = Instant::now();
        self.est.restart(now);
        self.period.restart(now);
        let mut ctl = self.shared.lock();
        if ctl.status() == MigrationStatus::Setup {
            self.shared.set_status(&mut ctl, MigrationStatus::Active);
        }
        drop(ctl);
        self.check_cancel()
    }

    /// multifd: a new migration id, the main channel's hello, and a writer with its hello
    /// on every page channel ([`precopy_stream::multifd`]). Nothing without multifd.
    fn open_channels(&mut self) -> Result<Vec<Writer>, Stop> {
        let sinks = std::mem::take(&mut self.channel_sinks);
        if sinks.is_empty() {
            return Ok(Vec::new());
        }
        let channels = sinks.len() as u16;
        if self.settings.hellos_sent.is_some() {
            // Counted with the bytes sent: the main channel's and each page channel's.
            self.hello_bytes = HELLO_LEN as u64 * (u64::from(channels) + 1);
            self.channel_hello_bytes = HELLO_LEN as u64 * u64::from(channels);
            return Ok(sinks
                .into_iter()
                .map(|sink| {
                    StreamWriter::with_encoder(sink, Encoder::page_records_only(&self.blocks))
                })
                .collect());
        }
        let id = new_migration_id();
        let hello = |index| {
            Hello {
                migration_id: id,
                index,
                channels,
            }
            .to_bytes()
        };
        self.w.write_raw(&hello(0))?;
        let mut out = Vec::with_capacity(sinks.len());
        for (i, sink) in sinks.into_iter().enumerate() {
            let mut w = StreamWriter::with_encoder(sink, Encoder::page_records_only(&self.blocks));
            let channel = i + 1;
            w.write_raw(&hello(channel as u16))
                .and_then(|()| w.flush())
                .map_err(|source| SourceError::Channel { channel, source })?;
            out.push(w);
        }
        Ok(out)
    }

    /// Stream bytes written so far: the main channel's and, with multifd, the page
    /// channels'.
    fn bytes_total(&self) -> u64 {
        self.w.bytes_written()
            + self.pipeline.as_ref().map_or(0, Pipeline::channel_bytes)
            + self.hello_bytes
    }

    /// Bytes written on the page channels (open or closed).
    fn multifd_bytes(&self) -> u64 {
        self.pipeline.as_ref().map_or(0, Pipeline::channel_bytes) + self.channel_hello_bytes
    }

    fn multifd(&self) -> bool {
        self.pipeline.as_ref().is_some_and(Pipeline::is_multifd)
    }

    /// multifd: the next sync point, on every page channel, then in the main channel's
    /// open `ram` section; every connection flushed.
    fn multifd_sync(&mut self) -> Result<(), Stop> {
        self.multifd_seq += 1;
        let seq = self.multifd_seq;
        self.pipeline()
            .channels_sync(seq)
            .map_err(SourceError::from)?;
        self.w.write_multifd_flush(seq)?;
        self.w.flush()?;
        Ok(())
    }

    fn pipeline(&mut self) -> &mut Pipeline {
        self.pipeline.as_mut().expect("set up")
    }

    /// Take parameters changed by `migrate-set-parameters` into use.
    fn apply_params(&mut self) -> Result<(), Stop> {
        let new = {
            let mut ctl = self.shared.lock();
            if !ctl.params_changed {
                return Ok(());
            }
            ctl.params_changed = false;
            ctl.params.clone()
        };
        if new.max_bandwidth != self.settings.params.max_bandwidth {
            self.w.set_max_bandwidth(new.max_bandwidth);
        }
        if new.xbzrle_cache_size != self.settings.params.xbzrle_cache_size {
            self.pipeline()
                .resize_cache(new.xbzrle_cache_size)
                .map_err(SourceError::CacheResize)?;
        }
        self.settings.params = new;
        Ok(())
    }

    /// One dirty-bitmap sync, then the 1 s period check (rates, auto-converge).
    fn sync(&mut self) -> Result<(), Stop> {
        let count = self.bitmap.sync(self.guest)?;
        self.sync_count += 1;
        if std::env::var_os("PRECOPY_TRACE").is_some() {
            eprintln!(
                "trace: sync {} at {:.3}s dirty {} new {} sent {} threshold {} throttle {}",
                self.sync_count,
                self.start.elapsed().as_secs_f64(),
                count.dirty,
                count.newly,
                self.bytes_total(),
                self.est.threshold,
                self.throttle
            );
        }
        self.synced_clean = true;
        let misses = self.pipeline.as_ref().map_or(0, Pipeline::cache_misses);
        let end = self.period.on_sync(
            Instant::now(),
            count.newly,
            self.bytes_total(),
            &self.c,
            misses,
        );
        if let Some(end) = end
            && self.settings.caps.auto_converge
            && let Some(t) = self.ac.on_period(
                &self.settings.params,
                end.dirty_bytes,
                end.sent,
                self.throttle,
            )
        {
            self.guest.set_throttle(t)?;
            self.throttle = t;
        }
        Ok(())
    }

    /// Every 100 ms: bandwidth, threshold, expected downtime (QEMU migration_update_counters).
    fn update_counters(&mut self, now: Instant) {
        let bytes = self.bytes_total();
        let max_bandwidth = self.settings.params.max_bandwidth;
        if let Some(p) = self.pipeline.as_mut() {
            p.update_link(&self.c, bytes, max_bandwidth);
        }
        self.est.update(
            now,
            self.bytes_total(),
            self.c.handled,
            self.bitmap.dirty_pages() * PAGE,
            &self.settings.params,
        );
        self.publish();
    }

    /// Send dirty pages until the rate limit, the end of the pass, or
    /// [`MAX_ITERATION_TIME`]. Returns true at the end of the pass.
    fn send_some(&mut self, last_stage: bool) -> Result<bool, Stop> {
        let t = Instant::now();
        let pipeline = self.pipeline.as_mut().expect("set up");
        let parallel = pipeline.is_parallel();
        let job = |base: &[u64], (block, page): (usize, u64)| {
            let addr = base[block] + page * PAGE;
            Job {
                block,
                page,
                addr,
                key: addr,
            }
        };
        let step = Step {
            guest: self.guest,
            generation: self.sync_count,
            use_cache: self.xbzrle_active,
            last_stage,
        };
        let batch_max = BATCH_PER_SHARD * pipeline.shards();
        let mut batch = Vec::with_capacity(batch_max);
        let mut n = 0u32;
        loop {
            if !last_stage {
                if self.w.rate_limit_exceeded() {
                    return Ok(false);
                }
                n += 1;
                if n.is_multiple_of(16) && t.elapsed() >= MAX_ITERATION_TIME {
                    return Ok(false);
                }
            }
            if parallel {
                // A batch no larger than what is left of the rate-limit slice (at a page
                // per 4 KiB, the most a page costs): the budget is checked between
                // batches, and a whole batch over a small budget would overshoot the
                // limit by up to a MiB per slice.
                let cap = match self.w.rate_limiter().slice_budget() {
                    Some(b) if !last_stage => {
                        let left = b.saturating_sub(self.w.rate_limiter().slice_bytes());
                        (left / PAGE + 1).min(batch_max as u64) as usize
                    }
                    _ => batch_max,
                };
                batch.clear();
                while batch.len() < cap {
                    match self.bitmap.next_dirty() {
                        Some(p) => batch.push(job(&self.base, p)),
                        None => break,
                    }
                }
                let end = batch.len() < cap;
                if !batch.is_empty() {
                    self.synced_clean = false;
                    pipeline
                        .send_batch(&step, &batch, &mut self.w, &mut self.c)
                        .map_err(SourceError::from)?;
                    charge(pipeline, &mut self.w, &mut self.charged);
                }
                if end {
                    return Ok(true);
                }
            } else {
                match self.bitmap.next_dirty() {
                    Some(p) => {
                        // Bring the next page in while this one is encoded.
                        if let Some(q) = self.bitmap.peek_dirty() {
                            pipeline.prefetch(&step, &job(&self.base, q));
                        }
                        self.synced_clean = false;
                        pipeline
                            .send_one(&step, job(&self.base, p), &mut self.w, &mut self.c)
                            .map_err(SourceError::from)?;
                        charge(pipeline, &mut self.w, &mut self.charged);
                    }
                    None => return Ok(true),
                }
            }
        }
    }

    /// The active phase, then the switchover. Returns the downtime in ms.
    fn iterate(&mut self) -> Result<u64, Stop> {
        loop {
            self.check_cancel()?;
            self.apply_params()?;
            let now = Instant::now();
            if self.est.elapsed(now) >= ESTIMATE_PERIOD {
                self.update_counters(now);
            }
            let pending = self.bitmap.dirty_pages() * PAGE;
            if policy::should_switchover(pending, self.est.threshold) {
                if !self.synced_clean {
                    self.sync()?;
                }
                if policy::should_switchover(self.bitmap.dirty_pages() * PAGE, self.est.threshold) {
                    return self.complete();
                }
            }
            if let Some(limit) = self.settings.pass_limit
                && self.sync_count > limit
            {
                return Err(SourceError::NotConverged(limit).into());
            }
            self.w.begin_ram_iteration()?;
            let pass_end = self.send_some(false)?;
            if pass_end && self.multifd() {
                // Every page of this pass lands before any of the next one.
                self.multifd_sync()?;
            }
            self.w.end_ram_section()?;
            if pass_end {
                // The bulk stage is over: XBZRLE from now on (QEMU xbzrle_enabled).
                self.xbzrle_active = self.settings.caps.xbzrle;
                self.sync()?;
            }
            if self.w.rate_limit_exceeded() {
                self.w.wait_for_rate_limit()?;
                // A new rate-limit slice starts now: estimate over the slice that ended, so
                // the period holds exactly one slice's budget (QEMU does both at
                // iteration_start_time).
                let now = Instant::now();
                if self.est.elapsed(now) >= ESTIMATE_PERIOD / 2 {
                    self.update_counters(now);
                }
            }
        }
    }

    /// Stop the guest, send the rest, device states, EOF, then the VM description.
    fn complete(&mut self) -> Result<u64, Stop> {
        self.c.precopy_bytes = self.bytes_total();
        let stop_at = Instant::now();
        self.guest.stop()?;
        self.stopped = true;
        self.check_cancel()?;
        self.sync()?;
        self.w.begin_ram_complete()?;
        // The cursor may be mid-bitmap (a sync happened mid-pass), so one sweep to the end
        // can miss pages before it: go round until no dirty page is left (QEMU
        // ram_save_complete loops until ram_find_and_save_block finds nothing).
        while !self.send_some(true)? || self.bitmap.dirty_pages() > 0 {}
        if self.multifd() {
            // The last sync point, then the end of every page channel: the destination
            // reads the END section only once every page has landed.
            self.multifd_sync()?;
            self.pipeline().channels_end().map_err(SourceError::from)?;
        }
        self.w.end_ram_section()?;
        for (name, instance, version, payload) in self.guest.device_states()? {
            self.w
                .write_device_state(&name, instance, version, &payload)?;
        }
        self.w.write_eof()?;
        self.w.flush()?;
        let downtime = stop_at.elapsed().as_millis() as u64;
        self.check_cancel()?;
        let digest = vmdesc::ram_digest(self.guest, &self.blocks)?;
        let desc = vmdesc::vm_description(&self.blocks, &digest);
        self.w.write_vm_description(desc.as_bytes())?;
        self.w.flush()?;
        // Page channels first: the destination closes the main channel only once it has
        // read every channel to its end.
        if let Some(p) = self.pipeline.as_mut() {
            p.close_channels()?;
        }
        // Hand the sink back (finish flushes) and close it; keep the byte count.
        let w = std::mem::replace(&mut self.w, StreamWriter::new(Box::new(io::sink())));
        self.closed_bytes = w.bytes_written();
        w.finish()?.close().map_err(SourceError::Close)?;
        self.publish();
        Ok(downtime)
    }
}
