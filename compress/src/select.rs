//! The adaptive per-page method selector (`--page-compression auto`, an
//! extension of ours; QEMU's users pick one method by hand).
//!
//! # Model
//!
//! Getting pages across costs CPU on the encoding threads and time on the
//! link, and the two overlap (the transport sends while the next page is
//! encoded; a rate limiter sleeps while it waits for budget). So the time of
//! a run of pages is `max(CPU / cores, bytes / B)` for `cores` encoding
//! threads and a link of `B` bytes/s, and the selector keeps both sums over
//! recent pages (`C` and `L`, ns, decayed by [`Selector::DECAY`] per page;
//! the caller reports each page with [`Selector::account`]). The estimated
//! time after sending the next page with method `m` is
//!
//! ```text
//! t(m) = smax(C + (cpu_ns(m) + R) / cores,  L + wire_bytes(m) / B)
//! ```
//!
//! `smax(a, b) = (a^32 + b^32)^(1/32)` is a smooth maximum ([`Selector::SMOOTH`]),
//! within 2.2 % of `max`. With the plain maximum the choice swung between
//! extremes around the balance: once spare CPU had gone on zstd (12 µs of CPU
//! for 1 µs of link at 25 Gbit/s), the CPU side was the larger, and XBZRLE
//! hits went raw to save 0.2 µs of CPU each at 1 µs of link, so a 400-page
//! corpus of cc1 pages took 13 % longer than XBZRLE alone. The smooth maximum
//! weighs each side by its share, so a method that buys little link time for
//! much CPU stops being chosen a few percent before the CPU becomes the
//! bottleneck, and a cheap trade (a delta on a hit) is kept until a few percent
//! after. `R` reserves the CPU the probes of the page's class will take (each
//! measured method's CPU over its probe interval), which spare CPU spent now
//! would not leave them.
//!
//! where `cpu_ns(m)` and `wire_bytes(m)` are moving averages (weight
//! [`Selector::ALPHA`] for the newest page) of what `m` really cost on
//! recent pages (a page that `m` did not shrink counts as a raw page). So
//! while the link is the bottleneck, CPU is spent on smaller pages until it
//! becomes one; while the CPU is, pages go raw: a mix no fixed method has.
//! `none` costs no CPU here (writing the bytes is the link's share) and its
//! size is known, so it is measured from the start. XBZRLE is a candidate
//! only on a cache hit. The selector picks the method with the least `t`.
//!
//! XBZRLE deltas vary a lot from page to page (a counter bump, a rewritten
//! page), and the delta is cheap to make, so on a hit where XBZRLE is not the
//! choice but its estimate with its long-run mean CPU (so a few slow deltas do
//! not close the gate) is less than the choice's, the
//! selector says [`Choice::TryXbzrle`]: make the delta first and keep it if
//! its exact size beats the estimate of the fallback
//! ([`Selector::keep_xbzrle`]); else encode the fallback.
//!
//! The CPU side also counts what the encoding threads spend per page besides
//! encoding ([`Selector::set_overhead_ns`], measured by the caller): when the
//! thread that encodes also writes the records, time spent writing is its own
//! CPU time, not link time, unless it waits; and such a serial sender
//! ([`Selector::set_serial`]) only spends CPU where it saves at least as much
//! link time.
//!
//! # Hints
//!
//! Memory mixes pages that compress well (zeroes with a few words, tables of
//! small integers, text) with pages that do not (compressed or random data),
//! often page by page. A moving average over all pages would describe neither,
//! and a choice made from it would send most compressible pages raw. So before
//! choosing, the caller computes the page's [`Hint`] (equal bytes 8 apart in a
//! 512-byte sample, tens of ns, against ~10 µs for a zstd call) and
//! passes it to [`Selector::set_hint`]: each hint class has its own estimates,
//! probe intervals and page count, so zstd is tried exactly on the pages that
//! look as if they shrink, and each class is still measured and re-measured as
//! below. The link rate, the cores and the CPU and link sums are shared.
//!
//! # Re-measuring
//!
//! The link rate comes from the caller's measurement
//! ([`Selector::set_bandwidth`], every 100 ms in the engine). A method that
//! is not chosen is not measured, so now and then a page is a *probe*: the
//! caller encodes it with the chosen method **and** one other candidate,
//! records both, and reports both to [`Selector::probe_done`], which says
//! which to send (the shorter: the CPU is spent). Each method has its own
//! probe interval: it starts at `probe_min` pages; when a probe of that
//! method confirms the choice (by the model, on that page) and cost `k ≥ 2`
//! times the choice, it doubles (up to `probe_max`) and the next probe comes
//! `k` intervals later, at most `probe_max` pages (so probing spends about
//! `1/probe_min` of the time at most; cheap probes, like an XBZRLE delta, stay
//! frequent); it
//! falls back to `probe_min` when the probe
//! overturns it, the estimates of both then set to that page's figures so
//! the next page follows at once: cheap when the workload is steady, quick
//! when it changes. A candidate never measured is probed first; in a
//! [`Hint`] class it starts from the estimate of the class that measured it
//! most and is probed on its class's schedule.
//!
//! Decisions depend only on the recorded measurements and the page count, so
//! they are deterministic under injected measurements (see the tests).

use crate::{Method, PAGE_SIZE, Page};

/// Wire bytes of a record header for one page besides its payload (be64
/// header, method and length bytes); block names are ignored.
pub const RECORD_OVERHEAD: u64 = 11;

/// How compressible a page looks, from a sample of its bytes: a hint computed
/// before choosing, so the selector keeps separate estimates for pages that
/// look alike ([`Selector::set_hint`]) and compresses exactly the pages that
/// shrink, even when they are a minority scattered among random ones (a moving
/// average over all pages would stay near a raw page and send them raw).
///
/// [`Hint::of`] reads four runs of 16 little-endian 64-bit words spread over
/// the page ([`Hint::SAMPLE`] bytes) and counts the bytes equal to the byte 8
/// positions before (each word against the previous one in its run, 480 byte
/// pairs, eight at a time): an estimate of the probability that two bytes
/// match, which is what an entropy coder and a match finder live on. Uniformly
/// random bytes match with probability 1/256 (about 1.9 of 480, rarely more
/// than 8); text and code a few percent; zeroes, small integers, pointers and
/// padding (which line up in 8-byte words) most of the time. It costs about
/// 50 ns (no popcount instruction needed; the `compression` bench prints it),
/// against ~10 µs for a zstd call; it only sorts pages into classes, the
/// selector still measures what each method does in each class. Pages with a
/// cached copy are not sampled ([`Hint::Cached`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hint {
    /// Looks like random bytes (repeats < [`Hint::MIXED_AT`]): compressed
    /// data, keys, encrypted or random memory.
    Random,
    /// Some redundancy (repeats in `MIXED_AT..REDUNDANT_AT`), e.g. text or
    /// machine code. The class of every page until [`Selector::set_hint`] is
    /// called.
    #[default]
    Mixed,
    /// Much redundancy (repeats ≥ [`Hint::REDUNDANT_AT`]): mostly zero bytes,
    /// small integers, aligned pointers, repeated bytes.
    Redundant,
    /// Not sampled: the page has a previous copy in the XBZRLE cache (a hit).
    /// The delta, whose size depends on what was written rather than on the
    /// content, is the usual choice then and costs a few hundred ns, so the
    /// caller spares the sample and hit pages form a class of their own.
    Cached,
}

impl Hint {
    /// Number of classes.
    pub const CLASSES: usize = 4;
    /// Every class, in [`Hint::index`] order.
    pub const ALL: [Hint; Hint::CLASSES] =
        [Hint::Random, Hint::Mixed, Hint::Redundant, Hint::Cached];
    /// Bytes of the page [`Hint::of`] reads.
    pub const SAMPLE: usize = 4 * RUN_WORDS * 8;
    /// Byte pairs [`Hint::repeats`] compares.
    pub const PAIRS: u32 = 4 * (RUN_WORDS as u32 - 1) * 8;
    /// Repeats from which a sample is not random (2.5 % of the pairs; random
    /// bytes reach it with a probability below 1e-5).
    pub const MIXED_AT: u32 = 12;
    /// Repeats from which a sample is [`Hint::Redundant`] (a quarter of the
    /// pairs).
    pub const REDUNDANT_AT: u32 = Hint::PAIRS / 4;

    /// The class of `page` (see the [type docs](Hint)).
    pub fn of(page: &Page) -> Hint {
        Hint::from_repeats(Hint::repeats(page))
    }

    /// How many of the [`Hint::PAIRS`] sampled byte pairs 8 bytes apart are
    /// equal: four runs of [`RUN_WORDS`] words at byte offsets 0, 1320, 2640
    /// and 3968, each word compared with the one before it in its run.
    pub fn repeats(page: &Page) -> u32 {
        const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
        const LANES16: u64 = 0x00ff_00ff_00ff_00ff;
        // Per byte lane, the count of equal pairs (at most 4 × 15 = 60 each).
        let mut lanes = 0u64;
        for start in [0, 1320, 2640, PAGE_SIZE - RUN_WORDS * 8] {
            let mut words = page[start..start + RUN_WORDS * 8]
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
            let mut prev = words.next().unwrap_or(0);
            for w in words {
                let x = w ^ prev;
                // The high bit of each byte of `x` that is zero, exactly (no carry
                // crosses a byte): an equal pair.
                let zero = !(((x & LOW7) + LOW7) | x | LOW7);
                lanes += zero >> 7;
                prev = w;
            }
        }
        // Sum the eight byte lanes (in 16-bit lanes: the total reaches 480).
        let pairs = (lanes & LANES16) + ((lanes >> 8) & LANES16);
        (pairs.wrapping_mul(0x0001_0001_0001_0001) >> 48) as u32
    }

    /// The class of a sample with `repeats` (see [`Hint::repeats`]).
    pub fn from_repeats(repeats: u32) -> Hint {
        if repeats < Hint::MIXED_AT {
            Hint::Random
        } else if repeats < Hint::REDUNDANT_AT {
            Hint::Mixed
        } else {
            Hint::Redundant
        }
    }

    /// Index of the class, `0..CLASSES`.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Words per sampled run of [`Hint::repeats`].
pub const RUN_WORDS: usize = 16;

/// What one method has cost on recent pages.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    /// Pages measured so far.
    pub samples: u64,
    /// Average CPU nanoseconds per page to encode.
    pub cpu_ns: f64,
    /// Average bytes per page on the wire (payload + [`RECORD_OVERHEAD`]).
    pub wire_bytes: f64,
    /// Mean CPU nanoseconds per page over every sample (the long-run cost).
    pub cpu_ns_mean: f64,
}

/// A selector's choice for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Send with this method.
    Use(Method),
    /// Make the XBZRLE delta; if [`Selector::keep_xbzrle`] says so send it,
    /// else encode with `fallback`.
    TryXbzrle {
        /// The method to use when the delta is not kept.
        fallback: Method,
    },
    /// Encode with `chosen` and with `probe`, record both, send the shorter
    /// ([`Selector::best_of`]) and call [`Selector::probe_done`].
    Probe {
        /// The method the estimates choose.
        chosen: Method,
        /// The method measured besides it.
        probe: Method,
    },
}

/// What the selector knows of the pages of one [`Hint`] class.
#[derive(Clone, Copy, Debug)]
struct Class {
    /// Pages of this class chosen so far.
    pages: u64,
    est: [Estimate; 4],
    interval: [u64; 4],
    next_probe: [u64; 4],
}

/// The adaptive selector. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Selector {
    bandwidth: f64,
    cores: f64,
    probe_min: u64,
    probe_max: u64,
    /// The estimates and probe schedule of each [`Hint`] class.
    classes: [Class; Hint::CLASSES],
    /// The class of the page being chosen ([`Selector::set_hint`]).
    class: usize,
    candidates: [bool; 4],
    /// CPU ns per page besides encoding on the encoding threads.
    overhead_ns: f64,
    /// The encoding thread also writes ([`Selector::set_serial`]).
    serial: bool,
    /// Decayed CPU ns / cores of recent pages.
    cpu_total: f64,
    /// Decayed link ns of recent pages.
    link_total: f64,
    /// CPU ns per page the probes of the current class will take (each measured
    /// method's CPU over its probe interval), reserved on the CPU side.
    reserve_ns: f64,
}

impl Selector {
    /// Weight of the newest page in the moving averages.
    pub const ALPHA: f64 = 1.0 / 32.0;
    /// Per-page decay of the CPU and link sums (a window of about 1024 pages).
    pub const DECAY: f64 = 1.0 - 1.0 / 1024.0;
    /// The exponent of the smooth maximum of the CPU and link sums.
    pub const SMOOTH: i32 = 32;

    /// A selector for a link of `bandwidth` bytes/s (a first guess, updated
    /// by [`set_bandwidth`](Self::set_bandwidth)), `cores` encoding threads,
    /// probing every `probe_min`..=`probe_max` pages, choosing among `none`,
    /// `candidates` (zstd, zlib; others are ignored) and, on cache hits, `xbzrle`.
    pub fn new(
        bandwidth: u64,
        cores: usize,
        probe_min: u64,
        probe_max: u64,
        candidates: &[Method],
    ) -> Self {
        let mut c = [false; 4];
        c[Method::None.index()] = true;
        for m in candidates {
            c[m.index()] |= matches!(m, Method::Zstd | Method::Zlib);
        }
        let mut est = [Estimate::default(); 4];
        est[Method::None.index()] = Estimate {
            samples: 1,
            cpu_ns: 0.0,
            wire_bytes: (PAGE_SIZE as u64 + RECORD_OVERHEAD) as f64,
            cpu_ns_mean: 0.0,
        };
        let probe_min = probe_min.max(1);
        let class = Class {
            pages: 0,
            est,
            interval: [probe_min; 4],
            next_probe: [probe_min; 4],
        };
        Selector {
            bandwidth: bandwidth.max(1) as f64,
            cores: cores.max(1) as f64,
            probe_min,
            probe_max: probe_max.max(probe_min),
            classes: [class; Hint::CLASSES],
            class: Hint::default().index(),
            candidates: c,
            overhead_ns: 0.0,
            serial: false,
            cpu_total: 0.0,
            link_total: 0.0,
            reserve_ns: 0.0,
        }
    }

    /// The link rate in bytes/s (measured by the caller).
    pub fn set_bandwidth(&mut self, bytes_per_sec: u64) {
        self.bandwidth = bytes_per_sec.max(1) as f64;
    }

    fn cur(&self) -> &Class {
        &self.classes[self.class]
    }

    fn cur_mut(&mut self) -> &mut Class {
        &mut self.classes[self.class]
    }

    /// The class of the next page (from [`Hint::of`]): [`choose`](Self::choose),
    /// [`record`](Self::record), [`probe_done`](Self::probe_done),
    /// [`keep_xbzrle`](Self::keep_xbzrle), [`estimate`](Self::estimate),
    /// [`time_ns`](Self::time_ns) and [`probe_interval`](Self::probe_interval) use
    /// that class's estimates and probe schedule (each class is measured and
    /// probed on its own) until the next call. The link rate, the cores and the
    /// CPU and link sums of [`account`](Self::account) are shared.
    pub fn set_hint(&mut self, hint: Hint) {
        self.class = hint.index();
    }

    /// CPU ns per page that the encoding threads spend besides encoding (and the
    /// hint): copying the page out of the guest, the cache, and writing the record
    /// when the thread that encodes also writes (measured by the caller; 0 until
    /// set). It counts on the CPU side of the model for every page and method, so a
    /// thread that is busy all the time (a fast link written by the encoding thread
    /// itself) shows as the bottleneck and pages go raw, while one that mostly waits
    /// for the link (a rate limit, a slow network) still spends its slack on smaller
    /// pages.
    pub fn set_overhead_ns(&mut self, ns: u64) {
        self.overhead_ns = ns as f64;
    }

    /// Whether the one encoding thread also writes the records with no rate limit
    /// (the engine's sequential path at `max-bandwidth` 0; off by default). Then
    /// its waits are waits for the receiver (reading, decoding and storing pages),
    /// and the CPU it would spend in them is taken from the receiver or the guest
    /// when they share the host's cores, as on a loopback migration: measured on
    /// the simulated guest at unlimited bandwidth, spending that apparent slack on
    /// zstd made `auto` slower than sending raw. So a method is only chosen over
    /// raw when its CPU per page (over the cores) is at most the link time it
    /// saves, a trade that pays even without slack; on a slow link (zstd's ~10 µs
    /// against the 30 µs of a raw page at 128 MiB/s) nothing changes. Under a rate
    /// limit the waits are sleeps, real slack, and the rule is off: on a corpus of
    /// real pages at a modelled 1 Gbit/s with one core it kept `auto` 17 % behind
    /// zstd, whose 22 µs per page saved 21 µs of link but were spent while the
    /// link was busy anyway.
    pub fn set_serial(&mut self, serial: bool) {
        self.serial = serial;
    }

    /// Whether `e` is a trade a serial sender takes (see [`set_serial`](Self::set_serial)).
    fn pays_without_slack(&self, e: &Estimate) -> bool {
        let raw = (PAGE_SIZE as u64 + RECORD_OVERHEAD) as f64;
        !self.serial || e.cpu_ns / self.cores <= (raw - e.wire_bytes) * 1e9 / self.bandwidth
    }

    /// The class set by [`set_hint`](Self::set_hint).
    pub fn hint(&self) -> Hint {
        Hint::ALL[self.class]
    }

    /// The link rate in use, bytes/s.
    pub fn bandwidth(&self) -> u64 {
        self.bandwidth as u64
    }

    /// The current estimate of `method`.
    pub fn estimate(&self, method: Method) -> Estimate {
        self.cur().est[method.index()]
    }

    /// The current probe interval of `method`, pages.
    pub fn probe_interval(&self, method: Method) -> u64 {
        self.cur().interval[method.index()]
    }

    /// Records what `method` cost on one page: `payload` bytes (the
    /// compressed size; 4096 when it was not shrunk) and `cpu_ns` of encoding.
    pub fn record(&mut self, method: Method, payload: usize, cpu_ns: u64) {
        let e = &mut self.cur_mut().est[method.index()];
        let bytes = payload as f64 + RECORD_OVERHEAD as f64;
        if e.samples == 0 {
            e.cpu_ns = cpu_ns as f64;
            e.wire_bytes = bytes;
        } else {
            e.cpu_ns += Self::ALPHA * (cpu_ns as f64 - e.cpu_ns);
            e.wire_bytes += Self::ALPHA * (bytes - e.wire_bytes);
        }
        e.samples += 1;
        e.cpu_ns_mean += (cpu_ns as f64 - e.cpu_ns_mean) / e.samples as f64;
    }

    /// Reports one page as sent: the CPU ns spent on it (every method tried)
    /// and the payload bytes that went on the wire (0: nothing sent).
    pub fn account(&mut self, cpu_ns: u64, payload: usize) {
        self.cpu_total =
            self.cpu_total * Self::DECAY + (cpu_ns as f64 + self.overhead_ns) / self.cores;
        let link = if payload == 0 {
            0.0
        } else {
            self.link_ns(payload)
        };
        self.link_total = self.link_total * Self::DECAY + link;
    }

    /// The model's time for a page costing `cpu_ns` and `wire_bytes`: the
    /// larger of the CPU and the link sums after it, as a smooth maximum (the
    /// [`Selector::SMOOTH`]-norm of the two; see the module docs).
    fn cost(&self, cpu_ns: f64, wire_bytes: f64) -> f64 {
        let c = self.cpu_total + (cpu_ns + self.overhead_ns + self.reserve_ns) / self.cores;
        let l = self.link_total + wire_bytes * 1e9 / self.bandwidth;
        let m = c.max(l);
        if m <= 0.0 {
            return 0.0;
        }
        m * ((c / m).powi(Self::SMOOTH) + (l / m).powi(Self::SMOOTH))
            .powf(1.0 / f64::from(Self::SMOOTH))
    }

    /// Estimated time (ns, the model's `t(m)`) after sending the next page with
    /// `method`; `None` before it was measured.
    pub fn time_ns(&self, method: Method) -> Option<f64> {
        let e = &self.cur().est[method.index()];
        (e.samples > 0).then(|| self.cost(e.cpu_ns, e.wire_bytes))
    }

    /// Nanoseconds on the link for `payload` bytes (CPU already spent).
    pub fn link_ns(&self, payload: usize) -> f64 {
        (payload as f64 + RECORD_OVERHEAD as f64) * 1e9 / self.bandwidth
    }

    fn time_of(&self, payload: Option<usize>, cpu_ns: u64) -> f64 {
        self.cost(
            cpu_ns as f64,
            (payload.unwrap_or(PAGE_SIZE) as u64 + RECORD_OVERHEAD) as f64,
        )
    }

    /// One page's own time (CPU + link), for comparing probe costs.
    fn page_time(&self, payload: Option<usize>, cpu_ns: u64) -> f64 {
        cpu_ns as f64 / self.cores + self.link_ns(payload.unwrap_or(PAGE_SIZE))
    }

    fn eligible(&self, m: Method, hit: bool) -> bool {
        if m == Method::Xbzrle {
            hit
        } else {
            self.candidates[m.index()]
        }
    }

    /// The measured eligible method with the least estimated time; near ties
    /// (a resource with slack) go to the method with less work per page. A
    /// serial sender only takes trades that pay without slack.
    fn best(&self, hit: bool) -> Method {
        let mut best = (Method::None, f64::INFINITY);
        for m in Method::ALL {
            let e = &self.cur().est[m.index()];
            if m != Method::None && !self.pays_without_slack(e) {
                continue;
            }
            if let Some(t) = self.eligible(m, hit).then(|| self.time_ns(m)).flatten() {
                let t = t + 1e-3 * (e.cpu_ns / self.cores + e.wire_bytes * 1e9 / self.bandwidth);
                if t < best.1 {
                    best = (m, t);
                }
            }
        }
        best.0
    }

    /// The choice for the next page; `hit` says whether the XBZRLE cache
    /// holds the page's previous copy.
    pub fn choose(&mut self, hit: bool) -> Choice {
        self.cur_mut().pages += 1;
        // A method measured in another class but not in this one starts from that
        // class's estimate (the most measured), re-measured on this class's schedule.
        for m in Method::ALL {
            if self.cur().est[m.index()].samples == 0
                && let Some(e) = self
                    .classes
                    .iter()
                    .map(|c| c.est[m.index()])
                    .max_by_key(|e| e.samples)
                    .filter(|e| e.samples > 0)
            {
                self.cur_mut().est[m.index()] = Estimate { samples: 1, ..e };
            }
        }
        // Slack spent on a costly method now is not there for the probes to come:
        // reserve their CPU, spread over their intervals.
        self.reserve_ns = Method::ALL
            .into_iter()
            .filter(|&m| m != Method::None && self.eligible(m, hit))
            .map(|m| {
                let c = self.cur();
                let e = &c.est[m.index()];
                if e.samples > 0 {
                    e.cpu_ns / c.interval[m.index()] as f64
                } else {
                    0.0
                }
            })
            .sum();
        let chosen = self.best(hit);
        let eligible = |m: Method| self.eligible(m, hit) && m != chosen;
        if let Some(m) = Method::ALL
            .into_iter()
            .find(|&m| eligible(m) && self.cur().est[m.index()].samples == 0)
        {
            return Choice::Probe { chosen, probe: m };
        }
        let due = Method::ALL
            .into_iter()
            .filter(|&m| eligible(m) && self.cur().pages >= self.cur().next_probe[m.index()])
            .min_by_key(|m| self.cur().next_probe[m.index()]);
        match due {
            Some(m) => Choice::Probe { chosen, probe: m },
            None if hit
                && chosen != Method::Xbzrle
                && self
                    .time_ns(chosen)
                    .is_some_and(|t| self.xbzrle_trial_ns() < t) =>
            {
                Choice::TryXbzrle { fallback: chosen }
            }
            None => Choice::Use(chosen),
        }
    }

    /// What trying a delta is expected to cost: XBZRLE's long-run mean CPU plus
    /// its recent average size on the link.
    fn xbzrle_trial_ns(&self) -> f64 {
        let e = &self.cur().est[Method::Xbzrle.index()];
        self.cost(e.cpu_ns_mean, e.wire_bytes)
    }

    /// After [`Choice::TryXbzrle`]: keep the delta (`payload` bytes, `None` on
    /// overflow; its CPU is spent) when its link time is no more than the
    /// fallback's estimated time.
    pub fn keep_xbzrle(&self, payload: Option<usize>, fallback: Method) -> bool {
        match (payload, self.time_ns(fallback)) {
            (Some(n), Some(t)) => self.time_of(Some(n), 0) <= t,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// After a probe: what `chosen` and `probe` made of the page (payload
    /// bytes, `None` when the method did not shrink it and the page would go
    /// raw; CPU ns). Returns the one to send (the shorter on the wire, the CPU
    /// being spent). By the model on this page, a probe that would have been
    /// faster overturns the choice (its interval back to `probe_min`, both
    /// estimates set to this page's figures); else its interval doubles.
    pub fn probe_done(
        &mut self,
        chosen: (Method, Option<usize>, u64),
        probe: (Method, Option<usize>, u64),
    ) -> Method {
        let (tc, tp) = (
            self.time_of(chosen.1, chosen.2),
            self.time_of(probe.1, probe.2),
        );
        let (pc, pp) = (
            self.page_time(chosen.1, chosen.2),
            self.page_time(probe.1, probe.2),
        );
        let i = probe.0.index();
        let (probe_min, probe_max) = (self.probe_min, self.probe_max);
        let cl = self.cur_mut();
        // Near ties (a resource with slack) go to less work, as in `best`.
        if tp + 1e-3 * pp < tc + 1e-3 * pc {
            cl.interval[i] = probe_min;
            for (m, payload, ns) in [chosen, probe] {
                let e = &mut cl.est[m.index()];
                e.cpu_ns = ns as f64;
                e.wire_bytes = (payload.unwrap_or(PAGE_SIZE) as u64 + RECORD_OVERHEAD) as f64;
                e.samples = e.samples.max(1);
            }
            cl.next_probe[i] = cl.pages + probe_min;
        } else {
            // A probe that costs k times the choice comes k times less often, and
            // backs off further while it keeps confirming; a cheap one (k < 2, e.g.
            // an XBZRLE delta or a raw page) stays frequent.
            let k = (pp / pc.max(1.0)).clamp(1.0, 64.0) as u64;
            if k >= 2 {
                cl.interval[i] = (cl.interval[i] * 2).min(probe_max);
            }
            cl.next_probe[i] = cl.pages + (cl.interval[i] * k).min(probe_max);
        }
        let size = |x: Option<usize>| x.unwrap_or(PAGE_SIZE + 1);
        if size(probe.1) < size(chosen.1) {
            probe.0
        } else {
            chosen.0
        }
    }

    /// The method to send among `(method, payload bytes)` measured on this
    /// page (CPU already spent, so only the link time counts); `none` when
    /// the list is empty.
    pub fn best_of(&self, measured: &[(Method, usize)]) -> Method {
        measured
            .iter()
            .min_by(|a, b| self.link_ns(a.1).total_cmp(&self.link_ns(b.1)))
            .map_or(Method::None, |m| m.0)
    }
}

/// The methods `auto` chooses among besides `none` and `xbzrle`: zstd only.
/// zlib (level 1) made bigger pages than zstd (level 1) for more CPU on every
/// corpus of the `compression` bench (real pages of CPython, cc1, Node.js,
/// SQLite and QEMU 7.2 guests), so measuring it would only cost probes; pass
/// `&[Method::Zstd, Method::Zlib]` to [`Selector::new`] to include it.
pub const AUTO_CANDIDATES: &[Method] = &[Method::Zstd];

/// Least pages between probes in the engine.
pub const DEFAULT_PROBE_MIN: u64 = 64;
/// Most pages between probes in the engine.
pub const DEFAULT_PROBE_MAX: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    /// Injected measurements: zstd costs 5 µs and shrinks the page to 1500
    /// bytes, zlib 40 µs for 1300 bytes, xbzrle 0.5 µs for 200 bytes.
    fn warmed(bw: u64, cores: usize) -> Selector {
        let mut s = Selector::new(bw, cores, 1000, 1000, &[Method::Zstd, Method::Zlib]);
        s.record(Method::Zstd, 1500, 5_000);
        s.record(Method::Zlib, 1300, 40_000);
        s.record(Method::Xbzrle, 200, 500);
        s
    }

    #[test]
    fn unmeasured_candidates_are_probed_one_per_page() {
        let mut s = Selector::new(125_000_000, 1, 1000, 1000, &[Method::Zstd, Method::Zlib]);
        assert_eq!(
            s.choose(false),
            Choice::Probe {
                chosen: Method::None,
                probe: Method::Zstd
            }
        );
        s.record(Method::Zstd, 1000, 5000);
        assert_eq!(
            s.choose(false),
            Choice::Probe {
                chosen: Method::Zstd,
                probe: Method::Zlib
            }
        );
        s.record(Method::Zlib, 3000, 50_000);
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
        // XBZRLE only becomes a candidate on a hit, and is probed first then.
        assert_eq!(
            s.choose(true),
            Choice::Probe {
                chosen: Method::Zstd,
                probe: Method::Xbzrle
            }
        );
    }

    #[test]
    fn slow_link_prefers_the_smallest_page() {
        // 125 MB/s: none 32.9 µs, zstd 5 + 12.1 µs, zlib 40 + 10.5 µs.
        let mut s = warmed(125_000_000, 1);
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
        // 1 MB/s: zlib's 200 bytes less (200 µs) outweigh its 35 µs more CPU.
        s.set_bandwidth(1_000_000);
        assert_eq!(s.choose(false), Choice::Use(Method::Zlib));
    }

    #[test]
    fn fast_link_with_one_core_sends_raw_and_more_cores_compress() {
        // 3.125 GB/s: none 1.31 µs; zstd 5 + 0.48 µs on one core.
        let mut s = warmed(3_125_000_000, 1);
        assert_eq!(s.choose(false), Choice::Use(Method::None));
        // zstd on 8 cores: 0.625 + 0.48 µs < 1.31 µs.
        let mut s = warmed(3_125_000_000, 8);
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
    }

    #[test]
    fn a_hit_with_a_small_delta_goes_xbzrle() {
        let mut s = warmed(125_000_000, 1);
        assert_eq!(s.choose(true), Choice::Use(Method::Xbzrle));
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
        // Deltas grow: the average moves and zstd takes over on hits too.
        for _ in 0..40 {
            s.record(Method::Xbzrle, 4000, 2000);
        }
        assert_eq!(s.choose(true), Choice::Use(Method::Zstd));
    }

    #[test]
    fn probe_interval_doubles_when_confirmed_and_resets_when_overturned() {
        // zstd chosen (17 µs); zlib probes cost 50.5 µs (k = 2): the interval
        // doubles and each next probe comes k intervals later, at most probe_max.
        let mut s = Selector::new(125_000_000, 1, 4, 16, &[Method::Zstd, Method::Zlib]);
        s.record(Method::Zstd, 1500, 5000);
        s.record(Method::Zlib, 1300, 40_000);
        let mut zlib_probes = Vec::new();
        for page in 1..=120u64 {
            if let Choice::Probe { chosen, probe } = s.choose(false) {
                assert_eq!(chosen, Method::Zstd);
                let made = match probe {
                    Method::Zlib => {
                        zlib_probes.push(page);
                        (probe, Some(1300), 40_000)
                    }
                    _ => (probe, Some(PAGE_SIZE), 0),
                };
                let send = s.probe_done((chosen, Some(1500), 5000), made);
                assert_eq!(
                    send,
                    if probe == Method::Zlib {
                        Method::Zlib
                    } else {
                        Method::Zstd
                    }
                );
            }
        }
        // (At page 4 raw and zlib are both due; raw goes first.)
        // Intervals 4, 8, 16 (× k = 2, capped at probe_max = 16 pages).
        assert_eq!(zlib_probes, vec![5, 21, 37, 53, 69, 85, 101, 117]);
        assert_eq!(s.probe_interval(Method::Zlib), 16);
        // Raw probes are cheap and confirm: they stay every 4 pages.
        assert_eq!(s.probe_interval(Method::None), 4);
        // Pages turn incompressible: the next raw probe overturns zstd at once.
        let mut page = 120;
        loop {
            page += 1;
            if let Choice::Probe {
                chosen,
                probe: Method::None,
            } = s.choose(false)
            {
                let send = s.probe_done((chosen, None, 6000), (Method::None, Some(PAGE_SIZE), 0));
                assert_eq!(send, Method::None);
                break;
            }
        }
        assert!(
            matches!(
                s.choose(false),
                Choice::Use(Method::None)
                    | Choice::Probe {
                        chosen: Method::None,
                        ..
                    }
            ),
            "page {page}"
        );
    }

    #[test]
    fn each_method_has_its_own_probe_interval() {
        let mut s = Selector::new(125_000_000, 1, 8, 1000, &[Method::Zstd, Method::Zlib]);
        s.record(Method::Zstd, 1500, 5_000);
        s.record(Method::Zlib, 1300, 40_000);
        s.record(Method::Xbzrle, 200, 500);
        // Probes of zlib keep confirming zstd: its interval grows; raw's (cheap) and
        // XBZRLE's (never probed: no hit) stay at the minimum.
        for _ in 0..3000 {
            if let Choice::Probe { chosen, probe } = s.choose(false) {
                let made = match probe {
                    Method::Zlib => (probe, Some(1300), 40_000),
                    _ => (probe, None, 0),
                };
                s.probe_done((chosen, Some(1500), 5000), made);
            }
        }
        assert_eq!(s.probe_interval(Method::Zlib), 1000);
        assert_eq!(
            s.probe_interval(Method::None),
            8,
            "cheap probes stay frequent"
        );
        assert_eq!(s.probe_interval(Method::Xbzrle), 8);
        // On a hit XBZRLE's small deltas are chosen.
        assert!(matches!(
            s.choose(true),
            Choice::Use(Method::Xbzrle)
                | Choice::Probe {
                    chosen: Method::Xbzrle,
                    ..
                }
        ));
    }

    #[test]
    fn a_hit_tries_a_cheap_delta_first_and_keeps_it_only_when_it_pays() {
        let mut s = warmed(125_000_000, 1);
        // Small cheap deltas, then six very slow ones: by the recent average
        // XBZRLE (17.7 µs of CPU) loses to zstd (12.1 µs on the link), but by its
        // long-run mean CPU (6.1 µs) a trial pays, so the delta is tried first.
        for _ in 0..100 {
            s.record(Method::Xbzrle, 200, 500);
        }
        for _ in 0..6 {
            s.record(Method::Xbzrle, 200, 100_000);
        }
        assert_eq!(
            s.choose(true),
            Choice::TryXbzrle {
                fallback: Method::Zstd
            }
        );
        // 40 bytes: 0.4 µs on the link, kept; 3000 bytes: 24 µs, zstd instead.
        assert!(s.keep_xbzrle(Some(40), Method::Zstd));
        assert!(!s.keep_xbzrle(Some(3000), Method::Zstd));
        assert!(!s.keep_xbzrle(None, Method::Zstd));
        // Without a hit there is nothing to try.
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
    }

    #[test]
    fn expensive_probes_come_less_often() {
        // 3.125 GB/s, one core: raw is chosen (1.3 µs); zstd costs 5.5 µs, about 4×.
        let mut s = Selector::new(3_125_000_000, 1, 8, 1000, &[Method::Zstd]);
        s.record(Method::Zstd, 1500, 5000);
        let mut probes = Vec::new();
        for page in 1..=200u64 {
            if let Choice::Probe { chosen, probe } = s.choose(false) {
                assert_eq!((chosen, probe), (Method::None, Method::Zstd));
                probes.push(page);
                s.probe_done((chosen, Some(PAGE_SIZE), 0), (probe, Some(1500), 5000));
            }
        }
        // First probe at 8, then 16 × 4 pages later, then 32 × 4.
        assert_eq!(probes, vec![8, 72, 200]);
    }

    #[test]
    fn the_bottleneck_decides_whether_cpu_is_spent() {
        // 3.125 GB/s, one core, nothing sent yet: raw (1.3 µs) beats zstd (5 µs of CPU).
        let mut s = warmed(3_125_000_000, 1);
        assert_eq!(s.choose(false), Choice::Use(Method::None));
        // The link is behind (raw pages queued, CPU idle): CPU is free, so the
        // smallest page wins, even zlib's 40 µs.
        for _ in 0..100 {
            s.account(0, PAGE_SIZE);
        }
        assert_eq!(s.choose(false), Choice::Use(Method::Zlib));
        // Now the CPU is behind: raw pages again.
        for _ in 0..100 {
            s.account(50_000, 1500);
        }
        assert_eq!(s.choose(false), Choice::Use(Method::None));
    }

    #[test]
    fn incompressible_pages_move_the_choice_to_raw() {
        let mut s = warmed(125_000_000, 1);
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
        let mut turns = 0;
        while s.choose(false) != Choice::Use(Method::None) {
            s.record(Method::Zstd, PAGE_SIZE, 6000);
            turns += 1;
            assert!(turns < 400, "never switched to none");
        }
        assert!(s.estimate(Method::Zstd).wire_bytes > 3300.0);
    }

    /// A page of xorshift bytes (seeded).
    fn random_page(seed: u64) -> Box<Page> {
        let mut x = seed | 1;
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 32) as u8;
        }
        p
    }

    #[test]
    fn hints_sort_pages_by_how_they_look() {
        for seed in 1..200 {
            let p = random_page(seed);
            assert!(Hint::repeats(&p) < Hint::MIXED_AT, "seed {seed}");
            assert_eq!(Hint::of(&p), Hint::Random);
        }
        // A zero page with a few random words written (the simulated guest's
        // compressible pages): nearly every pair matches.
        let mut p = Box::new([0u8; PAGE_SIZE]);
        p[8..16].copy_from_slice(&random_page(7)[..8]);
        p[1328..1336].copy_from_slice(&random_page(8)[..8]);
        assert!(Hint::repeats(&p) > 400);
        assert_eq!(Hint::of(&p), Hint::Redundant);
        assert_eq!(Hint::repeats(&[0; PAGE_SIZE]), Hint::PAIRS);
        // Bytes drawn from 16 values (4 bits of entropy per byte, like some
        // text): 1/16 of the pairs match.
        let mut p = random_page(3);
        for b in p.iter_mut() {
            *b = b'a' + (*b & 15);
        }
        assert_eq!(Hint::of(&p), Hint::Mixed);
        // Little-endian counters in 64-bit words: high bytes line up.
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, w) in p.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(0x7f12_3400_0000u64 + i as u64 * 4099).to_le_bytes());
        }
        assert_eq!(Hint::of(&p), Hint::Redundant);
        assert_eq!(Hint::from_repeats(Hint::MIXED_AT - 1), Hint::Random);
        assert_eq!(Hint::from_repeats(Hint::REDUNDANT_AT), Hint::Redundant);
    }

    /// What zstd makes of a page in the test below: random pages do not shrink
    /// (6 µs spent), redundant ones go to 60 bytes (3 µs).
    fn zstd_on(hint: Hint) -> (Option<usize>, u64) {
        match hint {
            Hint::Redundant => (Some(60), 3000),
            _ => (None, 6000),
        }
    }

    /// Runs `pages` (one hint each) through `s` as the engine does (zstd only),
    /// returning per hint how many pages went compressed and how many raw.
    fn run(s: &mut Selector, pages: &[Hint], hinted: bool) -> [(u64, u64); Hint::CLASSES] {
        let mut sent = [(0, 0); Hint::CLASSES];
        for &h in pages {
            if hinted {
                s.set_hint(h);
            }
            let (zstd_payload, zstd_ns) = zstd_on(h);
            let make = |s: &mut Selector, m: Method| match m {
                Method::Zstd => {
                    s.record(m, zstd_payload.unwrap_or(PAGE_SIZE), zstd_ns);
                    (m, zstd_payload, zstd_ns)
                }
                _ => (m, Some(PAGE_SIZE), 0),
            };
            let (m, ns) = match s.choose(false) {
                Choice::Use(m) => {
                    let c = make(s, m);
                    (c.0, c.2)
                }
                Choice::Probe { chosen, probe } => {
                    let (c, p) = (make(s, chosen), make(s, probe));
                    (s.probe_done(c, p), c.2 + p.2)
                }
                Choice::TryXbzrle { .. } => unreachable!("no hits here"),
            };
            let compressed = m == Method::Zstd && zstd_payload.is_some();
            s.account(ns, if compressed { 60 } else { PAGE_SIZE });
            let e = &mut sent[h.index()];
            if compressed {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        sent
    }

    #[test]
    fn hinted_classes_compress_exactly_the_pages_that_shrink() {
        // 128 MiB/s, one core: 22 % of the pages shrink to 60 bytes, scattered
        // among random ones (a fixed pattern standing in for random order).
        let pages: Vec<Hint> = (0..20_000u64)
            .map(|i| {
                if (i * 7919) % 100 < 22 {
                    Hint::Redundant
                } else {
                    Hint::Random
                }
            })
            .collect();
        let mut s = Selector::new(134_217_728, 1, 64, 4096, AUTO_CANDIDATES);
        let sent = run(&mut s, &pages, true);
        let (red, rnd) = (sent[Hint::Redundant.index()], sent[Hint::Random.index()]);
        // Every redundant page but a warm-up probe goes compressed; random pages go
        // raw (zstd is only tried on them by probes).
        assert!(red.1 <= 2, "{red:?}");
        assert_eq!(rnd.0, 0);
        s.set_hint(Hint::Random);
        assert_eq!(s.choose(false), Choice::Use(Method::None));
        assert!(s.estimate(Method::Zstd).wire_bytes > 4000.0);
        s.set_hint(Hint::Redundant);
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
        assert!(s.estimate(Method::Zstd).wire_bytes < 100.0);
        // The same pages without hints: one estimate for both kinds, and a large
        // share of the compressible pages goes raw.
        let mut s = Selector::new(134_217_728, 1, 64, 4096, AUTO_CANDIDATES);
        let sent = run(&mut s, &pages, false);
        let red = sent[Hint::Redundant.index()];
        assert!(red.1 > red.0 / 10, "{red:?}");
    }

    #[test]
    fn a_class_starts_from_another_class_estimate_and_is_probed_on_its_own_schedule() {
        let mut s = Selector::new(125_000_000, 1, 8, 1000, AUTO_CANDIDATES);
        s.set_hint(Hint::Redundant);
        assert_eq!(
            s.choose(false),
            Choice::Probe {
                chosen: Method::None,
                probe: Method::Zstd
            }
        );
        s.record(Method::Zstd, 60, 3000);
        // A new class borrows the estimate instead of probing at once ...
        s.set_hint(Hint::Random);
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
        assert_eq!(s.estimate(Method::Zstd).wire_bytes, 71.0);
        // ... and its own measurements then move only its own estimate.
        for _ in 0..300 {
            s.record(Method::Zstd, PAGE_SIZE, 6000);
        }
        assert_eq!(s.choose(false), Choice::Use(Method::None));
        s.set_hint(Hint::Redundant);
        assert_eq!(s.estimate(Method::Zstd).wire_bytes, 71.0);
        assert_eq!(s.hint(), Hint::Redundant);
    }

    #[test]
    fn a_sending_thread_without_slack_sends_raw() {
        // 1.25 GB/s, one core, zstd 7 µs for 60 bytes, raw 3.3 µs on the link.
        let mut s = Selector::new(1_250_000_000, 1, 1000, 1000, AUTO_CANDIDATES);
        s.record(Method::Zstd, 60, 7000);
        // Writing looked like link time (raw pages queued, no CPU counted): the CPU
        // seems free and pages get compressed.
        for _ in 0..100 {
            s.account(0, PAGE_SIZE);
        }
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
        // The same thread spends 4 µs per page besides encoding (copying, writing):
        // it is the bottleneck, compressing would only slow it down.
        s.set_overhead_ns(4000);
        for _ in 0..2000 {
            s.account(0, PAGE_SIZE);
        }
        assert_eq!(s.choose(false), Choice::Use(Method::None));
        // A thread that mostly waits (1 µs of overhead) has slack again.
        s.set_overhead_ns(1000);
        for _ in 0..2000 {
            s.account(0, PAGE_SIZE);
        }
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
    }

    #[test]
    fn a_serial_sender_only_compresses_where_it_pays_without_slack() {
        // 1.25 GB/s: a raw page is 3.3 µs on the link. The link is behind (raw pages
        // queued), so by the model zstd's 7 µs for 60 bytes would be free ...
        let mut s = Selector::new(1_250_000_000, 1, 1000, 1000, AUTO_CANDIDATES);
        s.record(Method::Zstd, 60, 7000);
        for _ in 0..100 {
            s.account(0, PAGE_SIZE);
        }
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
        // ... but a serial sender's wait is the receiver's CPU: 7 µs to save 3.2 µs
        // does not pay.
        s.set_serial(true);
        assert_eq!(s.choose(false), Choice::Use(Method::None));
        // At 128 MiB/s the same page saves 30 µs of link: compressed.
        s.set_bandwidth(134_217_728);
        assert_eq!(s.choose(false), Choice::Use(Method::Zstd));
        // A cheap XBZRLE delta pays on the fast link too.
        s.set_bandwidth(1_250_000_000);
        s.record(Method::Xbzrle, 100, 400);
        assert!(matches!(
            s.choose(true),
            Choice::Use(Method::Xbzrle)
                | Choice::Probe {
                    chosen: Method::Xbzrle,
                    ..
                }
        ));
    }

    #[test]
    fn best_of_a_probe_is_the_shortest_on_the_wire() {
        let s = warmed(125_000_000, 1);
        let m = s.best_of(&[
            (Method::None, 4096),
            (Method::Zstd, 900),
            (Method::Zlib, 800),
        ]);
        assert_eq!(m, Method::Zlib);
        assert_eq!(s.best_of(&[]), Method::None);
    }
}
