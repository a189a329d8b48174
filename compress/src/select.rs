//! The adaptive per-page method selector (`--page-compression auto`, an
//! extension of ours; QEMU's users pick one method by hand).
//!
//! # Model
//!
//! Getting one page across costs CPU on an encoding thread and time on the
//! link. With `cores` encoding threads and a link of `B` bytes/s, the
//! estimated time of method `m` for a page is
//!
//! ```text
//! t(m) = cpu_ns(m) / cores  +  wire_bytes(m) / B
//! ```
//!
//! where `cpu_ns(m)` and `wire_bytes(m)` are moving averages (weight
//! [`Selector::ALPHA`] for the newest page) of what `m` really cost on
//! recent pages. The selector picks the method with the least `t`.
//!
//! XBZRLE is only a candidate on a cache hit, and then its delta is already
//! made (it is needed to update the cache anyway), so its exact size is
//! known and its CPU is spent: it competes with `wire_bytes / B` alone.
//!
//! # Re-measuring
//!
//! The link rate comes from the engine's bandwidth estimate (every 100 ms,
//! [`Selector::set_bandwidth`]). A method that is not being chosen is not
//! measured, so every [`probe_every`](Selector::new)-th page is a probe:
//! the caller compresses it with every method (recording each with
//! [`Selector::record`]) and sends the smallest-time result. Before a method
//! has a measurement its estimate is optimistic (never measured = probed
//! first), so the first page is always a probe.
//!
//! Decisions depend only on the recorded measurements, so they are
//! deterministic under injected measurements (see the tests).

use crate::{Method, PAGE_SIZE};

/// Wire bytes of a record header for one page besides its payload (be64
/// header, method and length bytes); block names are ignored.
pub const RECORD_OVERHEAD: u64 = 11;

/// What one method has cost on recent pages.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    /// Pages measured so far.
    pub samples: u64,
    /// Average CPU nanoseconds per page to encode.
    pub cpu_ns: f64,
    /// Average bytes per page on the wire (payload + [`RECORD_OVERHEAD`]).
    pub wire_bytes: f64,
}

/// A selector's choice for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Send with this method.
    Use(Method),
    /// Compress with every candidate, record each, send the best
    /// ([`Selector::best_of`]).
    Probe,
}

/// The adaptive selector. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Selector {
    bandwidth: f64,
    cores: f64,
    probe_every: u64,
    pages: u64,
    est: [Estimate; 4],
    candidates: [bool; 4],
}

impl Selector {
    /// Weight of the newest page in the moving averages.
    pub const ALPHA: f64 = 1.0 / 16.0;

    /// A selector for a link of `bandwidth` bytes/s (a first guess, updated
    /// by [`set_bandwidth`](Self::set_bandwidth)), `cores` encoding threads,
    /// probing every `probe_every`-th page (at least 1), choosing among
    /// `candidates` (methods other than `none` and `xbzrle`; `none` is always a
    /// candidate, `xbzrle` is one on every cache hit).
    pub fn new(bandwidth: u64, cores: usize, probe_every: u64, candidates: &[Method]) -> Self {
        let mut c = [false; 4];
        c[Method::None.index()] = true;
        for m in candidates {
            c[m.index()] = *m != Method::Xbzrle;
        }
        Selector {
            bandwidth: bandwidth.max(1) as f64,
            cores: cores.max(1) as f64,
            probe_every: probe_every.max(1),
            pages: 0,
            est: [Estimate::default(); 4],
            candidates: c,
        }
    }

    /// The link rate in bytes/s (measured by the caller).
    pub fn set_bandwidth(&mut self, bytes_per_sec: u64) {
        self.bandwidth = bytes_per_sec.max(1) as f64;
    }

    /// The link rate in use, bytes/s.
    pub fn bandwidth(&self) -> u64 {
        self.bandwidth as u64
    }

    /// The current estimate of `method`.
    pub fn estimate(&self, method: Method) -> Estimate {
        self.est[method.index()]
    }

    /// Records what `method` cost on one page: `payload` bytes (the
    /// compressed size; 4096 for `none`) and `cpu_ns` of encoding.
    pub fn record(&mut self, method: Method, payload: usize, cpu_ns: u64) {
        let e = &mut self.est[method.index()];
        let bytes = payload as f64 + RECORD_OVERHEAD as f64;
        if e.samples == 0 {
            e.cpu_ns = cpu_ns as f64;
            e.wire_bytes = bytes;
        } else {
            e.cpu_ns += Self::ALPHA * (cpu_ns as f64 - e.cpu_ns);
            e.wire_bytes += Self::ALPHA * (bytes - e.wire_bytes);
        }
        e.samples += 1;
    }

    /// Estimated nanoseconds to get a page across with `method` (see the
    /// model); `None` before it was measured.
    pub fn time_ns(&self, method: Method) -> Option<f64> {
        let e = &self.est[method.index()];
        (e.samples > 0).then(|| self.time_of(e.cpu_ns, e.wire_bytes))
    }

    fn time_of(&self, cpu_ns: f64, wire_bytes: f64) -> f64 {
        cpu_ns / self.cores + wire_bytes * 1e9 / self.bandwidth
    }

    /// Nanoseconds on the link for `payload` bytes (CPU already spent).
    pub fn link_ns(&self, payload: usize) -> f64 {
        self.time_of(0.0, payload as f64 + RECORD_OVERHEAD as f64)
    }

    /// The choice for the next page. `xbzrle` is the size of the page's
    /// XBZRLE delta when the cache had it (already encoded), else `None`.
    pub fn choose(&mut self, xbzrle: Option<usize>) -> Choice {
        self.pages += 1;
        let unmeasured = self
            .candidates
            .iter()
            .zip(&self.est)
            .any(|(&c, e)| c && e.samples == 0);
        if unmeasured || self.pages.is_multiple_of(self.probe_every) {
            return Choice::Probe;
        }
        let mut best = (Method::None, f64::INFINITY);
        for m in Method::ALL {
            if let Some(t) = self.candidates[m.index()]
                .then(|| self.time_ns(m))
                .flatten()
                && t < best.1
            {
                best = (m, t);
            }
        }
        if let Some(n) = xbzrle
            && self.link_ns(n) <= best.1
        {
            return Choice::Use(Method::Xbzrle);
        }
        Choice::Use(best.0)
    }

    /// The method to send after a probe, given every candidate's measured
    /// `(method, payload bytes, cpu ns)` on this page (CPU already spent,
    /// so only the link time counts).
    pub fn best_of(&self, measured: &[(Method, usize, u64)]) -> Method {
        measured
            .iter()
            .min_by(|a, b| self.link_ns(a.1).total_cmp(&self.link_ns(b.1)))
            .map_or(Method::None, |m| m.0)
    }

    /// Methods the selector may pick besides XBZRLE.
    pub fn candidates(&self) -> impl Iterator<Item = Method> + '_ {
        Method::ALL
            .into_iter()
            .filter(|m| self.candidates[m.index()])
    }
}

/// Pages per probe by default.
pub const DEFAULT_PROBE_EVERY: u64 = 64;

/// A page of 4096 bytes as the `none` payload.
pub const RAW_PAYLOAD: usize = PAGE_SIZE;

#[cfg(test)]
mod tests {
    use super::*;

    fn warmed(bw: u64, cores: usize) -> Selector {
        let mut s = Selector::new(bw, cores, 1000, &[Method::Zstd, Method::Zlib]);
        // Injected measurements: none is free on the CPU and big; zstd costs
        // 5 µs and halves the page; zlib costs 40 µs for a little more.
        s.record(Method::None, 4096, 300);
        s.record(Method::Zstd, 1500, 5_000);
        s.record(Method::Zlib, 1300, 40_000);
        s
    }

    #[test]
    fn unmeasured_candidates_force_a_probe() {
        let mut s = Selector::new(125_000_000, 1, 1000, &[Method::Zstd]);
        assert_eq!(s.choose(None), Choice::Probe);
        s.record(Method::None, 4096, 300);
        assert_eq!(s.choose(None), Choice::Probe);
        s.record(Method::Zstd, 1000, 5000);
        assert_eq!(s.choose(None), Choice::Use(Method::Zstd));
    }

    #[test]
    fn slow_link_prefers_the_smallest_page() {
        // 1 Gbit/s = 125 MB/s: none 32.9 µs, zstd 5+12.1 µs, zlib 40+10.5 µs.
        let mut s = warmed(125_000_000, 1);
        assert_eq!(s.choose(None), Choice::Use(Method::Zstd));
        // 1 MB/s: zlib's 200 bytes less (200 µs) now outweigh its 35 µs more CPU.
        s.set_bandwidth(1_000_000);
        assert_eq!(s.choose(None), Choice::Use(Method::Zlib));
    }

    #[test]
    fn fast_link_with_one_core_sends_raw() {
        // 25 Gbit/s = 3.125 GB/s: none 1.6 µs, zstd 5.5 µs.
        let mut s = warmed(3_125_000_000, 1);
        assert_eq!(s.choose(None), Choice::Use(Method::None));
    }

    #[test]
    fn more_cores_shift_towards_compression() {
        // 3.125 GB/s: zstd at 2 cores is 2.5 + 0.48 µs, at 4 cores 1.25 + 0.48 µs
        // against none's 1.31 + 0.075 µs.
        let mut s = warmed(3_125_000_000, 4);
        assert_eq!(s.choose(None), Choice::Use(Method::None));
        let mut s = warmed(3_125_000_000, 8);
        assert_eq!(s.choose(None), Choice::Use(Method::Zstd));
    }

    #[test]
    fn small_xbzrle_delta_wins_big_one_loses() {
        let mut s = warmed(125_000_000, 1);
        assert_eq!(s.choose(Some(40)), Choice::Use(Method::Xbzrle));
        assert_eq!(s.choose(Some(3000)), Choice::Use(Method::Zstd));
    }

    #[test]
    fn probes_come_every_nth_page_and_remeasure() {
        let mut s = Selector::new(125_000_000, 1, 4, &[Method::Zstd]);
        s.record(Method::None, 4096, 300);
        s.record(Method::Zstd, 1500, 5000);
        let choices: Vec<_> = (0..8).map(|_| s.choose(None)).collect();
        assert_eq!(choices[3], Choice::Probe);
        assert_eq!(choices[7], Choice::Probe);
        assert_eq!(choices[0], Choice::Use(Method::Zstd));
        // Pages turn incompressible: probes record zstd at full size, and the
        // average moves until raw wins.
        let mut turns = 0;
        while s.choose(None) != Choice::Use(Method::None) {
            s.record(Method::Zstd, 4096 + 13, 6000);
            s.record(Method::None, 4096, 300);
            turns += 1;
            assert!(turns < 200, "never switched to none");
        }
        assert!(s.estimate(Method::Zstd).wire_bytes > 3300.0);
    }

    #[test]
    fn best_of_a_probe_is_the_shortest_on_the_wire() {
        let s = warmed(125_000_000, 1);
        let m = s.best_of(&[
            (Method::None, 4096, 300),
            (Method::Zstd, 900, 5000),
            (Method::Zlib, 800, 40_000),
        ]);
        assert_eq!(m, Method::Zlib);
        assert_eq!(s.best_of(&[]), Method::None);
    }
}
