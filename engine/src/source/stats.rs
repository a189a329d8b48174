//! The loop's counters and its two clocks: the 100 ms estimator (bandwidth, switchover
//! threshold, expected downtime; QEMU `migration_update_counters`) and the 1 s period (dirty
//! rate, cache miss rate, encoding rate, auto-converge; QEMU `migration_bitmap_sync`'s
//! period check), and the `query-migrate` they make up.

use std::time::{Duration, Instant};

use xbzrle::PAGE_SIZE;

use super::Source;
use super::pages::Pipeline;
use crate::info::{
    MethodStats, MigrationInfo, MigrationStatus, PageCompressionStats, RamStats, XbzrleCacheStats,
};
use crate::params::MigrationParameters;
use crate::policy;
use precopy_compress::Method;

const PAGE: u64 = PAGE_SIZE as u64;
/// QEMU `BUFFER_DELAY`: the estimation period.
pub(crate) const ESTIMATE_PERIOD: Duration = Duration::from_millis(100);
/// Auto-converge and rate periods: a sync at least this long after the last period end.
pub(crate) const SYNC_PERIOD: Duration = Duration::from_secs(1);

/// Page counters of the loop (cumulative over the migration).
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct Counters {
    /// ZERO records (`duplicate`).
    pub(crate) duplicate: u64,
    /// PAGE records (`normal`).
    pub(crate) normal: u64,
    /// XBZRLE records.
    pub(crate) xbzrle_pages: u64,
    /// Stream bytes of the XBZRLE records.
    pub(crate) xbzrle_bytes: u64,
    /// Pages found unchanged against the cache (nothing sent).
    pub(crate) unchanged: u64,
    /// Pages handled (all of the above).
    pub(crate) handled: u64,
    /// Stream bytes when the guest was stopped for the final pass.
    pub(crate) precopy_bytes: u64,
    /// (pages, stream bytes) sent per page compression method ([`Method::index`]).
    pub(crate) per_method: [(u64, u64); 4],
    /// ns spent writing page records (the link-rate measure of `auto`).
    pub(crate) emit_ns: u64,
}

impl Counters {
    /// Adds `o`'s page counts (a multifd channel's, since the last batch) and zeroes
    /// them there.
    pub(crate) fn absorb(&mut self, o: &mut Counters) {
        self.duplicate += o.duplicate;
        self.normal += o.normal;
        self.xbzrle_pages += o.xbzrle_pages;
        self.xbzrle_bytes += o.xbzrle_bytes;
        self.unchanged += o.unchanged;
        self.handled += o.handled;
        for (a, b) in self.per_method.iter_mut().zip(o.per_method) {
            a.0 += b.0;
            a.1 += b.1;
        }
        self.emit_ns += o.emit_ns;
        *o = Counters::default();
    }
}

/// The 100 ms estimator.
#[derive(Debug)]
pub(crate) struct Estimator {
    start: Instant,
    bytes: u64,
    handled: u64,
    /// Bytes that can be sent within the downtime limit.
    pub(crate) threshold: u64,
    /// ms the final pass would take now.
    pub(crate) expected_downtime: Option<u64>,
    /// Bandwidth in Mbit/s.
    pub(crate) mbps: f64,
    /// Pages handled per second.
    pub(crate) pages_per_second: u64,
}

impl Estimator {
    pub(crate) fn new(now: Instant) -> Estimator {
        Estimator {
            start: now,
            bytes: 0,
            handled: 0,
            threshold: 0,
            expected_downtime: None,
            mbps: 0.0,
            pages_per_second: 0,
        }
    }

    /// Restart the period at `now` (after setup), keeping the byte and page marks.
    pub(crate) fn restart(&mut self, now: Instant) {
        self.start = now;
    }

    /// Time since the period started.
    pub(crate) fn elapsed(&self, now: Instant) -> Duration {
        now - self.start
    }

    /// End the period at `now`: `bytes` is the stream's byte count, `handled` the pages
    /// handled so far, `dirty_bytes` what is left to send.
    pub(crate) fn update(
        &mut self,
        now: Instant,
        bytes: u64,
        handled: u64,
        dirty_bytes: u64,
        params: &MigrationParameters,
    ) {
        let ms = (now - self.start).as_secs_f64() * 1000.0;
        let e = policy::estimate(
            bytes - self.bytes,
            ms,
            dirty_bytes,
            params.downtime_limit,
            params.avail_switchover_bandwidth,
        );
        self.threshold = e.threshold_bytes;
        self.expected_downtime = e.expected_downtime_ms;
        self.mbps = e.mbps;
        self.pages_per_second = ((handled - self.handled) as f64 * 1000.0 / ms) as u64;
        self.start = now;
        self.bytes = bytes;
        self.handled = handled;
    }
}

/// The 1 s period, ended at the first sync at least [`SYNC_PERIOD`] after it started.
#[derive(Debug)]
pub(crate) struct Period {
    start: Instant,
    bytes: u64,
    dirty: u64,
    handled: u64,
    misses: u64,
    xbzrle_pages: u64,
    xbzrle_bytes: u64,
    /// Pages dirtied per second in the last period.
    pub(crate) dirty_pages_rate: u64,
    /// Cache misses per page handled in the last period.
    pub(crate) cache_miss_rate: f64,
    /// Page bytes per XBZRLE byte in the last period (0 when none was sent).
    pub(crate) encoding_rate: f64,
}

/// What an ended period hands to auto-converge.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeriodEnd {
    /// Bytes dirtied in the period.
    pub(crate) dirty_bytes: u64,
    /// Stream bytes sent in the period.
    pub(crate) sent: u64,
}

impl Period {
    pub(crate) fn new(now: Instant) -> Period {
        Period {
            start: now,
            bytes: 0,
            dirty: 0,
            handled: 0,
            misses: 0,
            xbzrle_pages: 0,
            xbzrle_bytes: 0,
            dirty_pages_rate: 0,
            cache_miss_rate: 0.0,
            encoding_rate: 0.0,
        }
    }

    /// Restart the period at `now` (after setup), keeping the marks.
    pub(crate) fn restart(&mut self, now: Instant) {
        self.start = now;
    }

    /// At a sync that found `newly` newly dirtied pages: when the period is over, compute
    /// its rates, start the next one and return what auto-converge looks at. `bytes` is the
    /// stream's byte count, `misses` the XBZRLE cache misses so far.
    pub(crate) fn on_sync(
        &mut self,
        now: Instant,
        newly: u64,
        bytes: u64,
        c: &Counters,
        misses: u64,
    ) -> Option<PeriodEnd> {
        self.dirty += newly;
        let elapsed = now - self.start;
        if elapsed < SYNC_PERIOD {
            return None;
        }
        let ms = elapsed.as_secs_f64() * 1000.0;
        let end = PeriodEnd {
            dirty_bytes: self.dirty * PAGE,
            sent: bytes - self.bytes,
        };
        self.dirty_pages_rate = (self.dirty as f64 * 1000.0 / ms) as u64;
        let handled = c.handled - self.handled;
        if handled > 0 {
            self.cache_miss_rate = (misses - self.misses) as f64 / handled as f64;
        }
        let xp = c.xbzrle_pages - self.xbzrle_pages;
        let xb = c.xbzrle_bytes - self.xbzrle_bytes;
        // QEMU: 0 when no XBZRLE page went out in the period.
        self.encoding_rate = if xb > 0 && xp > 0 {
            (xp * PAGE) as f64 / xb as f64
        } else {
            0.0
        };
        self.start = now;
        self.bytes = bytes;
        self.dirty = 0;
        self.handled = c.handled;
        self.misses = misses;
        self.xbzrle_pages = c.xbzrle_pages;
        self.xbzrle_bytes = c.xbzrle_bytes;
        Some(end)
    }
}

impl Source<'_> {
    /// The `query-migrate` of this migration in state `status`.
    pub(super) fn info(&self, status: MigrationStatus) -> MigrationInfo {
        let transferred = self.transferred();
        let ram = RamStats {
            transferred,
            remaining: self.bitmap.dirty_pages() * PAGE,
            total: self.total,
            duplicate: self.c.duplicate,
            normal: self.c.normal,
            normal_bytes: self.c.normal * PAGE,
            dirty_pages_rate: self.period.dirty_pages_rate,
            mbps: self.est.mbps,
            dirty_sync_count: self.sync_count,
            page_size: PAGE,
            pages_per_second: self.est.pages_per_second,
            // As QEMU's precopy-bytes: everything sent before the final stage; until the
            // guest stops (and on a migration that failed before it), that is all of it.
            precopy_bytes: if self.stopped {
                self.c.precopy_bytes.min(transferred)
            } else {
                transferred
            },
            downtime_bytes: if self.stopped {
                transferred - self.c.precopy_bytes.min(transferred)
            } else {
                0
            },
            multifd_bytes: self.multifd_bytes(),
        };
        let p = self.pipeline.as_ref();
        let xbzrle_cache = self.settings.caps.xbzrle.then(|| XbzrleCacheStats {
            cache_size: self.settings.params.xbzrle_cache_size,
            bytes: self.c.xbzrle_bytes,
            pages: self.c.xbzrle_pages,
            cache_miss: p.map_or(0, Pipeline::cache_misses),
            cache_miss_rate: self.period.cache_miss_rate,
            encoding_rate: self.period.encoding_rate,
            overflow: p.map_or(0, Pipeline::overflows),
        });
        let method = |m: Method| MethodStats {
            pages: self.c.per_method[m.index()].0,
            bytes: self.c.per_method[m.index()].1,
            cpu_time_ns: p.map_or(0, |p| p.cpu_ns(m)),
        };
        let page_compression = Some(PageCompressionStats {
            method: self.settings.params.page_compression.name().to_owned(),
            none: method(Method::None),
            xbzrle: method(Method::Xbzrle),
            zstd: method(Method::Zstd),
            zlib: method(Method::Zlib),
            link_bandwidth: p.map_or(0, Pipeline::link_bandwidth),
        });
        MigrationInfo {
            status,
            page_compression,
            total_time: Some(self.start.elapsed().as_millis() as u64),
            setup_time: Some(self.setup_ms),
            downtime: None,
            expected_downtime: (status == MigrationStatus::Active)
                .then_some(self.est.expected_downtime)
                .flatten(),
            ram: Some(ram),
            xbzrle_cache,
            cpu_throttle_percentage: (self.throttle > 0).then_some(self.throttle),
            error_desc: None,
        }
    }

    /// Bytes of stream produced (all of it on the wire once the sink is closed).
    fn transferred(&self) -> u64 {
        self.closed_bytes + self.bytes_total()
    }

    /// Publish the current statistics to `query-migrate`.
    pub(super) fn publish(&self) {
        let mut ctl = self.shared.lock();
        let info = self.info(ctl.status());
        ctl.publish(info);
    }
}
