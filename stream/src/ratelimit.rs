//! QEMU's migration rate limit: a byte budget per 100 ms slice.
//!
//! Source: QEMU 7.2 `migration/migration.c` (`migration_rate_limit`,
//! `BUFFER_DELAY` = 100 ms, `XFER_LIMIT_RATIO` = 1000 / `BUFFER_DELAY`) and
//! `migration/qemu-file.c` (`qemu_file_rate_limit`). `max-bandwidth` is in
//! bytes per second; each 100 ms slice may carry `max-bandwidth / 10` bytes.
//! Once a slice's bytes pass the budget, the sender waits for the slice to
//! end; a new slice starts with a fresh budget (the overshoot of the last
//! record is not carried over, as in QEMU). A `max-bandwidth` of 0 means no
//! limit. Changing the bandwidth takes effect at once, in the current slice.

use std::time::{Duration, Instant};

/// Length of one rate-limit slice (QEMU `BUFFER_DELAY`).
pub const RATE_LIMIT_SLICE: Duration = Duration::from_millis(100);

/// Slices per second (QEMU `XFER_LIMIT_RATIO`).
const SLICES_PER_SEC: u64 = 10;

/// A byte budget per [`RATE_LIMIT_SLICE`]. Methods taking `now` make it
/// testable without sleeping; the others read the clock.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    max_bandwidth: u64,
    slice_start: Instant,
    slice_bytes: u64,
}

impl RateLimiter {
    /// A limiter for `max_bandwidth` bytes/s (0 = unlimited); the first
    /// slice starts now.
    pub fn new(max_bandwidth: u64) -> Self {
        RateLimiter {
            max_bandwidth,
            slice_start: Instant::now(),
            slice_bytes: 0,
        }
    }

    /// `max-bandwidth` in bytes/s; 0 means unlimited.
    pub fn max_bandwidth(&self) -> u64 {
        self.max_bandwidth
    }

    /// Sets `max-bandwidth` (bytes/s; 0 = unlimited). Takes effect in the
    /// current slice, as QEMU's `qemu_file_set_rate_limit`.
    pub fn set_max_bandwidth(&mut self, bytes_per_sec: u64) {
        self.max_bandwidth = bytes_per_sec;
    }

    /// Bytes allowed per slice (`max-bandwidth / 10`, at least 1), or `None` when unlimited.
    pub fn slice_budget(&self) -> Option<u64> {
        (self.max_bandwidth != 0).then(|| (self.max_bandwidth / SLICES_PER_SEC).max(1))
    }

    /// Bytes counted in the current slice.
    pub fn slice_bytes(&self) -> u64 {
        self.slice_bytes
    }

    /// Counts `bytes` sent in the current slice.
    pub fn record(&mut self, bytes: u64) {
        self.slice_bytes = self.slice_bytes.saturating_add(bytes);
    }

    fn roll(&mut self, now: Instant) {
        if now.saturating_duration_since(self.slice_start) >= RATE_LIMIT_SLICE {
            self.slice_start = now;
            self.slice_bytes = 0;
        }
    }

    /// True when the current slice's budget is used up at time `now`
    /// (starting a new slice first if the current one has ended).
    pub fn exceeded_at(&mut self, now: Instant) -> bool {
        self.roll(now);
        match self.slice_budget() {
            Some(budget) => self.slice_bytes >= budget,
            None => false,
        }
    }

    /// [`exceeded_at`](Self::exceeded_at) now.
    pub fn exceeded(&mut self) -> bool {
        self.exceeded_at(Instant::now())
    }

    /// How long to wait at `now` before sending may go on: zero when the
    /// budget is not used up, else the time to the end of the slice.
    pub fn delay_at(&mut self, now: Instant) -> Duration {
        if !self.exceeded_at(now) {
            return Duration::ZERO;
        }
        (self.slice_start + RATE_LIMIT_SLICE).saturating_duration_since(now)
    }

    /// Sleeps until sending may go on (returns at once when it may), then
    /// starts the new slice. Returns the time slept.
    pub fn wait(&mut self) -> Duration {
        let d = self.delay_at(Instant::now());
        if !d.is_zero() {
            std::thread::sleep(d);
            self.roll(Instant::now());
        }
        d
    }
}
