//! A simulated guest: RAM blocks in shared atomic memory, writer threads ("vCPUs") that dirty
//! it in named, seeded patterns at a chosen dirty rate, a dirty bitmap they maintain, vCPU
//! stop/resume, and a CPU throttle honoured the way QEMU's is.
//!
//! Memory is `AtomicU64` words: writers store words with relaxed atomics and then set the
//! page's dirty bit with a release `fetch_or`; the migration thread fetches-and-clears the
//! bitmap with acquire semantics and copies pages out word by word. There is no data race in
//! the Rust sense, and the [`DirtyLog`] contract (mark after write) holds.
//!
//! The throttle follows softmmu/cpu-throttle.c: at `p` %, a writer sleeps
//! `p / (100 - p)` × 10 ms after every 10 ms slice of running.

use std::alloc::Layout;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use xbzrle::{PAGE_SIZE, Page};

use crate::traits::{DirtyLog, GuestError, GuestRam, RamBlockInfo, Throttle, VcpuControl};

const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;
/// QEMU's CPU_THROTTLE_TIMESLICE_NS: 10 ms.
const SLICE: Duration = Duration::from_millis(10);
/// Largest hot set of the `hotset` workload: 48 MiB, so it fits the default 64 MiB XBZRLE
/// cache with room to spare.
const HOT_SET_MAX_PAGES: u64 = 12288;

/// A named, seeded pattern in which the simulated vCPUs dirty memory. One "write" dirties one
/// page; the dirty rate counts writes per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Workload {
    /// `sparse`: one random 8-byte word of a uniformly chosen page (XBZRLE-friendly).
    Sparse,
    /// `cacheline`: one random 64-byte cache line of a uniformly chosen page.
    CacheLine,
    /// `fullpage`: the whole page rewritten with random data (XBZRLE overflows).
    FullPage,
    /// `zeroing`: half the writes zero a whole page, half write one word (pages going to zero
    /// and coming back).
    Zeroing,
    /// `hotset`: 90 % of the writes go to a hot set (1/16 of RAM, at most 48 MiB), sparse word
    /// updates; 10 % anywhere.
    HotSet,
    /// `mix`: each write picks one of the above (40 % hotset, 20 % sparse, 20 % cacheline,
    /// 10 % zeroing, 10 % fullpage).
    Mix,
}

impl Workload {
    /// Every workload, in a fixed order.
    pub const ALL: [Workload; 6] = [
        Workload::Sparse,
        Workload::CacheLine,
        Workload::FullPage,
        Workload::Zeroing,
        Workload::HotSet,
        Workload::Mix,
    ];

    /// The workload's name as accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            Workload::Sparse => "sparse",
            Workload::CacheLine => "cacheline",
            Workload::FullPage => "fullpage",
            Workload::Zeroing => "zeroing",
            Workload::HotSet => "hotset",
            Workload::Mix => "mix",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown workload name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown workload {0:?} (expected one of sparse, cacheline, fullpage, zeroing, hotset, mix)"
)]
pub struct UnknownWorkload(pub String);

impl FromStr for Workload {
    type Err = UnknownWorkload;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| UnknownWorkload(s.to_owned()))
    }
}

/// Configuration of a [`SimGuest`].
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// RAM blocks: (name, size in bytes). Each size must be a whole number of 4 KiB target
    /// pages ([`SimConfigError::Unaligned`] otherwise).
    pub blocks: Vec<(String, u64)>,
    /// How the vCPUs dirty memory.
    pub workload: Workload,
    /// Pages dirtied per second by all vCPUs together, before throttling; 0 = idle guest,
    /// `u64::MAX` = as fast as the writers can go.
    pub dirty_rate: u64,
    /// Number of writer threads (vCPUs), at least 1.
    pub vcpus: usize,
    /// Seed of every random choice (initial contents and writes).
    pub seed: u64,
    /// Share of pages (0..=100 %) that start all zero; the rest start as random data.
    pub initial_zero_percent: u8,
}

impl Default for SimConfig {
    /// 64 MiB in one block `pc.ram`, `sparse`, idle, 1 vCPU, seed 0, 25 % zero pages.
    fn default() -> Self {
        SimConfig {
            blocks: vec![("pc.ram".to_owned(), 64 << 20)],
            workload: Workload::Sparse,
            dirty_rate: 0,
            vcpus: 1,
            seed: 0,
            initial_zero_percent: 25,
        }
    }
}

struct Block {
    name: String,
    pages: u64,
    words: Box<[AtomicU64]>,
    dirty: Box<[AtomicU64]>,
}

/// Allocate `n` zeroed atomics, or `None` when the allocator cannot provide them (or the
/// size overflows the address space) instead of aborting the process.
fn zeroed_atomics(n: usize) -> Option<Box<[AtomicU64]>> {
    if n == 0 {
        return Some(Box::new([]));
    }
    let layout = Layout::array::<AtomicU64>(n).ok()?;
    // SAFETY: `layout` is non-zero (n > 0); all-zero bytes are a valid `AtomicU64` (same
    // representation as `u64`), so this is `n` initialised elements that `Box<[AtomicU64]>`
    // frees with the same layout; a null pointer (allocation failure) is returned as `None`.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<AtomicU64>();
        if ptr.is_null() {
            return None;
        }
        Some(Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)))
    }
}

struct RunState {
    running: bool,
    parked: usize,
}

struct Inner {
    blocks: Vec<Block>,
    /// Flat page index where each block starts (for uniform choice over all pages).
    starts: Vec<u64>,
    total_pages: u64,
    workload: Workload,
    vcpus: usize,
    dirty_rate: AtomicU64,
    throttle: AtomicU8,
    stop_req: AtomicBool,
    shutdown: AtomicBool,
    run: Mutex<RunState>,
    cv: Condvar,
    writes: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn locate(&self, flat: u64) -> (usize, u64) {
        let b = self.starts.partition_point(|&s| s <= flat) - 1;
        (b, flat - self.starts[b])
    }

    fn mark(&self, block: usize, page: u64) {
        self.blocks[block].dirty[(page / 64) as usize]
            .fetch_or(1 << (page % 64), Ordering::Release);
    }

    fn store_word(&self, block: usize, page: u64, word: usize, v: u64) {
        self.blocks[block].words[page as usize * WORDS_PER_PAGE + word].store(v, Ordering::Relaxed);
    }

    fn one_write(&self, rng: &mut Xoshiro256PlusPlus, w: Workload) {
        let hot = (self.total_pages / 16).clamp(1, HOT_SET_MAX_PAGES);
        let w = if w == Workload::Mix {
            match rng.gen_range(0..10) {
                0..=3 => Workload::HotSet,
                4 | 5 => Workload::Sparse,
                6 | 7 => Workload::CacheLine,
                8 => Workload::Zeroing,
                _ => Workload::FullPage,
            }
        } else {
            w
        };
        let flat = if w == Workload::HotSet && rng.gen_range(0..10) != 0 {
            // Hot pages are spread over RAM by a fixed odd multiplier (a permutation).
            (rng.gen_range(0..hot).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % self.total_pages
        } else {
            rng.gen_range(0..self.total_pages)
        };
        let (b, p) = self.locate(flat);
        match w {
            Workload::Sparse | Workload::HotSet | Workload::Mix => {
                self.store_word(b, p, rng.gen_range(0..WORDS_PER_PAGE), rng.next_u64());
            }
            Workload::CacheLine => {
                let line = rng.gen_range(0..WORDS_PER_PAGE / 8) * 8;
                for i in 0..8 {
                    self.store_word(b, p, line + i, rng.next_u64());
                }
            }
            Workload::FullPage => {
                for i in 0..WORDS_PER_PAGE {
                    self.store_word(b, p, i, rng.next_u64());
                }
            }
            Workload::Zeroing => {
                if rng.gen_bool(0.5) {
                    for i in 0..WORDS_PER_PAGE {
                        self.store_word(b, p, i, 0);
                    }
                } else {
                    self.store_word(b, p, rng.gen_range(0..WORDS_PER_PAGE), rng.next_u64() | 1);
                }
            }
        }
        self.mark(b, p);
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Park while stopped. Returns false on shutdown.
    fn park_if_stopped(&self) -> bool {
        if !self.stop_req.load(Ordering::Acquire) {
            return !self.shutdown.load(Ordering::Acquire);
        }
        let mut g = self.lock();
        g.parked += 1;
        self.cv.notify_all();
        while !g.running && !self.shutdown.load(Ordering::Acquire) {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.parked -= 1;
        !self.shutdown.load(Ordering::Acquire)
    }

    /// Sleep until `until`, waking early on stop or shutdown.
    fn sleep_until(&self, until: Instant) {
        let mut g = self.lock();
        loop {
            let now = Instant::now();
            if now >= until
                || self.stop_req.load(Ordering::Acquire)
                || self.shutdown.load(Ordering::Acquire)
            {
                return;
            }
            g = self
                .cv
                .wait_timeout(g, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn writer(&self, seed: u64) {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut carry = 0.0f64;
        while self.park_if_stopped() {
            let start = Instant::now();
            let rate = self.dirty_rate.load(Ordering::Relaxed);
            if rate == 0 {
                self.sleep_until(start + SLICE);
                continue;
            }
            if rate == u64::MAX {
                let mut n = 0u32;
                while !self.stop_req.load(Ordering::Acquire) {
                    self.one_write(&mut rng, self.workload);
                    n += 1;
                    if n.is_multiple_of(64) && start.elapsed() >= SLICE {
                        break;
                    }
                }
            } else {
                carry += rate as f64 * SLICE.as_secs_f64() / self.vcpus as f64;
                let n = carry as u64;
                carry -= n as f64;
                for i in 0..n {
                    if i.is_multiple_of(32) && self.stop_req.load(Ordering::Acquire) {
                        break;
                    }
                    self.one_write(&mut rng, self.workload);
                }
                self.sleep_until(start + SLICE);
            }
            let p = u32::from(self.throttle.load(Ordering::Relaxed).min(99));
            if p > 0 {
                self.sleep_until(Instant::now() + SLICE * p / (100 - p));
            }
        }
    }
}

/// The simulated guest. Implements every trait of [`crate::traits`].
///
/// Writer threads start in [`SimGuest::new`] (running, unless the dirty rate is 0, in which
/// case they idle) and stop when the guest is dropped.
pub struct SimGuest {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for SimGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimGuest")
            .field("blocks", &self.blocks())
            .field("workload", &self.inner.workload)
            .field("vcpus", &self.inner.vcpus)
            .finish_non_exhaustive()
    }
}

/// An invalid [`SimConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimConfigError {
    /// No RAM block, or all blocks empty.
    #[error("the simulated guest needs at least one non-empty RAM block")]
    NoRam,
    /// A block name is empty or longer than 255 bytes (the stream writes it with a u8 length).
    #[error("RAM block name {0:?} must be 1..=255 bytes")]
    BadName(String),
    /// Two blocks have the same name.
    #[error("duplicate RAM block name {0:?}")]
    DuplicateName(String),
    /// `vcpus` is 0.
    #[error("the simulated guest needs at least one vCPU")]
    NoVcpu,
    /// `initial_zero_percent` is above 100.
    #[error("initial_zero_percent {0} is above 100")]
    ZeroPercent(u8),
    /// A block size is not a multiple of the 4 KiB target page.
    #[error("RAM block {block:?} size {bytes} bytes is not a multiple of the 4096-byte page")]
    Unaligned {
        /// The RAM block.
        block: String,
        /// Its size in bytes.
        bytes: u64,
    },
    /// The host could not allocate the guest RAM (block name, bytes asked for).
    #[error(
        "cannot allocate {bytes} bytes of guest RAM for block {block:?}: not enough memory on this host"
    )]
    OutOfMemory {
        /// The RAM block.
        block: String,
        /// Bytes of RAM (plus its dirty bitmap) asked for.
        bytes: u64,
    },
}

impl SimGuest {
    /// Build the guest, fill its RAM (seeded) and start its vCPU threads.
    pub fn new(config: SimConfig) -> Result<SimGuest, SimConfigError> {
        if config.vcpus == 0 {
            return Err(SimConfigError::NoVcpu);
        }
        if config.initial_zero_percent > 100 {
            return Err(SimConfigError::ZeroPercent(config.initial_zero_percent));
        }
        let mut blocks = Vec::new();
        let mut starts = Vec::new();
        let mut total = 0u64;
        for (name, bytes) in &config.blocks {
            if name.is_empty() || name.len() > 255 {
                return Err(SimConfigError::BadName(name.clone()));
            }
            if blocks.iter().any(|b: &Block| &b.name == name) {
                return Err(SimConfigError::DuplicateName(name.clone()));
            }
            if bytes % PAGE_SIZE as u64 != 0 {
                return Err(SimConfigError::Unaligned {
                    block: name.clone(),
                    bytes: *bytes,
                });
            }
            let pages = bytes / PAGE_SIZE as u64;
            starts.push(total);
            total += pages;
            let oom = || SimConfigError::OutOfMemory {
                block: name.clone(),
                bytes: *bytes,
            };
            let words = usize::try_from(pages)
                .ok()
                .and_then(|p| p.checked_mul(WORDS_PER_PAGE))
                .and_then(zeroed_atomics)
                .ok_or_else(oom)?;
            let dirty = usize::try_from(pages.div_ceil(64))
                .ok()
                .and_then(zeroed_atomics)
                .ok_or_else(oom)?;
            blocks.push(Block {
                name: name.clone(),
                pages,
                words,
                dirty,
            });
        }
        if total == 0 {
            return Err(SimConfigError::NoRam);
        }
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
        for b in &blocks {
            for p in 0..b.pages as usize {
                if rng.gen_range(0..100u8) < config.initial_zero_percent {
                    continue;
                }
                for w in &b.words[p * WORDS_PER_PAGE..(p + 1) * WORDS_PER_PAGE] {
                    w.store(rng.next_u64(), Ordering::Relaxed);
                }
            }
        }
        let inner = Arc::new(Inner {
            blocks,
            starts,
            total_pages: total,
            workload: config.workload,
            vcpus: config.vcpus,
            dirty_rate: AtomicU64::new(config.dirty_rate),
            throttle: AtomicU8::new(0),
            stop_req: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            run: Mutex::new(RunState {
                running: true,
                parked: 0,
            }),
            cv: Condvar::new(),
            writes: AtomicU64::new(0),
        });
        let threads = (0..config.vcpus)
            .map(|i| {
                let inner = Arc::clone(&inner);
                let seed = config.seed ^ (0x5851_F42D_4C95_7F2D_u64.wrapping_mul(i as u64 + 1));
                std::thread::Builder::new()
                    .name(format!("sim-vcpu{i}"))
                    .spawn(move || inner.writer(seed))
                    .expect("spawning a vCPU thread")
            })
            .collect();
        Ok(SimGuest { inner, threads })
    }

    /// Change the dirty rate (pages/s; 0 = idle, `u64::MAX` = unlimited).
    pub fn set_dirty_rate(&self, pages_per_second: u64) {
        self.inner
            .dirty_rate
            .store(pages_per_second, Ordering::Relaxed);
    }

    /// The configured dirty rate in pages/s.
    pub fn dirty_rate(&self) -> u64 {
        self.inner.dirty_rate.load(Ordering::Relaxed)
    }

    /// Pages written by the vCPUs (and [`write_page`](SimGuest::write_page)) so far.
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    /// Write a whole page, as a vCPU would (marks it dirty). Works while the vCPUs are
    /// stopped too: it models a device or the test harness, not a vCPU.
    pub fn write_page(&self, block: usize, page: u64, data: &Page) -> Result<(), GuestError> {
        self.check(block, page)?;
        for (i, c) in data.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
            self.inner.store_word(block, page, i, v);
        }
        self.inner.mark(block, page);
        self.inner.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Copy all of RAM out, one `Vec<u8>` per block (for checks after a migration).
    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.inner
            .blocks
            .iter()
            .map(|b| {
                let mut v = Vec::with_capacity(b.words.len() * 8);
                for w in b.words.iter() {
                    v.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
                }
                v
            })
            .collect()
    }

    fn check(&self, block: usize, page: u64) -> Result<(), GuestError> {
        let b = self
            .inner
            .blocks
            .get(block)
            .ok_or(GuestError::NoSuchBlock { block })?;
        if page >= b.pages {
            return Err(GuestError::PageOutOfRange {
                block,
                page,
                pages: b.pages,
            });
        }
        Ok(())
    }
}

impl Drop for SimGuest {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::Release);
        {
            let _g = self.inner.lock();
            self.inner.cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl GuestRam for SimGuest {
    fn blocks(&self) -> Vec<RamBlockInfo> {
        self.inner
            .blocks
            .iter()
            .map(|b| RamBlockInfo {
                name: b.name.clone(),
                used_length: b.pages * PAGE_SIZE as u64,
            })
            .collect()
    }

    fn read_page(&self, block: usize, page: u64, out: &mut Page) -> Result<(), GuestError> {
        self.check(block, page)?;
        let base = page as usize * WORDS_PER_PAGE;
        let words = &self.inner.blocks[block].words[base..base + WORDS_PER_PAGE];
        // Ask for every cache line of the page up front so the word-by-word atomic copy
        // below does not wait for one line at a time (prefetch is not an access: no race).
        #[cfg(target_arch = "x86_64")]
        for line in words.chunks_exact(8) {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            // SAFETY: SSE is part of the x86_64 baseline, so the target feature is present;
            // a prefetch never faults and does not access memory in the language's sense.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
        }
        for (o, w) in out.chunks_exact_mut(8).zip(words) {
            o.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        Ok(())
    }
}

impl DirtyLog for SimGuest {
    fn log_start(&self) -> Result<(), GuestError> {
        for b in &self.inner.blocks {
            for w in b.dirty.iter() {
                w.store(0, Ordering::Release);
            }
        }
        Ok(())
    }

    fn fetch_and_clear(&self, block: usize, bitmap: &mut [u64]) -> Result<(), GuestError> {
        let b = self
            .inner
            .blocks
            .get(block)
            .ok_or(GuestError::NoSuchBlock { block })?;
        if bitmap.len() != b.dirty.len() {
            return Err(GuestError::BitmapSize {
                block,
                got: bitmap.len(),
                expected: b.dirty.len(),
            });
        }
        for (out, w) in bitmap.iter_mut().zip(b.dirty.iter()) {
            if w.load(Ordering::Relaxed) != 0 {
                *out |= w.swap(0, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    fn log_stop(&self) -> Result<(), GuestError> {
        Ok(())
    }
}

impl VcpuControl for SimGuest {
    fn stop(&self) -> Result<(), GuestError> {
        self.inner.stop_req.store(true, Ordering::Release);
        let mut g = self.inner.lock();
        g.running = false;
        self.inner.cv.notify_all();
        while g.parked < self.inner.vcpus {
            g = self.inner.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        let mut g = self.inner.lock();
        g.running = true;
        self.inner.stop_req.store(false, Ordering::Release);
        self.inner.cv.notify_all();
        Ok(())
    }

    fn is_running(&self) -> bool {
        !self.inner.stop_req.load(Ordering::Acquire)
    }
}

impl Throttle for SimGuest {
    fn set_throttle(&self, percent: u8) -> Result<(), GuestError> {
        self.inner
            .throttle
            .store(percent.min(99), Ordering::Relaxed);
        Ok(())
    }

    fn throttle(&self) -> u8 {
        self.inner.throttle.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(rate: u64) -> SimGuest {
        SimGuest::new(SimConfig {
            blocks: vec![("a".into(), 1 << 20), ("b".into(), 64 << 10)],
            workload: Workload::Mix,
            dirty_rate: rate,
            vcpus: 2,
            seed: 3,
            initial_zero_percent: 50,
        })
        .unwrap()
    }

    #[test]
    fn workload_names_roundtrip() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>().unwrap(), w);
        }
        assert!("nope".parse::<Workload>().is_err());
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let c = SimConfig::default();
        let e = |c: SimConfig| SimGuest::new(c).unwrap_err();
        assert_eq!(
            e(SimConfig {
                vcpus: 0,
                ..c.clone()
            }),
            SimConfigError::NoVcpu
        );
        assert_eq!(
            e(SimConfig {
                blocks: vec![],
                ..c.clone()
            }),
            SimConfigError::NoRam
        );
        assert!(matches!(
            e(SimConfig {
                blocks: vec![("x".into(), 4096), ("x".into(), 4096)],
                ..c.clone()
            }),
            SimConfigError::DuplicateName(_)
        ));
        assert!(matches!(
            e(SimConfig {
                blocks: vec![(String::new(), 4096)],
                ..c.clone()
            }),
            SimConfigError::BadName(_)
        ));
        assert_eq!(
            e(SimConfig {
                initial_zero_percent: 101,
                ..c
            }),
            SimConfigError::ZeroPercent(101)
        );
    }

    #[test]
    fn ram_not_a_whole_number_of_pages_is_refused() {
        let e = SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), 5000)],
            ..SimConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            e,
            SimConfigError::Unaligned {
                block: "pc.ram".into(),
                bytes: 5000
            }
        );
    }

    #[test]
    fn ram_larger_than_the_host_is_a_typed_error() {
        // 1 PiB: more than any host (or x86-64 user address space) can provide.
        let e = SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), 1 << 50)],
            ..SimConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            e,
            SimConfigError::OutOfMemory {
                block: "pc.ram".into(),
                bytes: 1 << 50
            }
        );
        assert!(e.to_string().contains("not enough memory"), "{e}");
    }

    #[test]
    fn out_of_range_access_is_an_error() {
        let g = guest(0);
        let mut p = [0u8; PAGE_SIZE];
        assert!(matches!(
            g.read_page(2, 0, &mut p),
            Err(GuestError::NoSuchBlock { block: 2 })
        ));
        assert!(matches!(
            g.read_page(1, 16, &mut p),
            Err(GuestError::PageOutOfRange { pages: 16, .. })
        ));
        let mut bm = vec![0u64; 3];
        assert!(matches!(
            g.fetch_and_clear(0, &mut bm),
            Err(GuestError::BitmapSize { expected: 4, .. })
        ));
    }

    #[test]
    fn writes_are_logged_and_stop_really_stops() {
        let g = guest(20_000);
        g.log_start().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        g.stop().unwrap();
        assert!(!g.is_running());
        let w = g.writes();
        assert!(w > 0);
        let mut bm = vec![0u64; 4];
        g.fetch_and_clear(0, &mut bm).unwrap();
        assert!(bm.iter().any(|&x| x != 0));
        // Stopped: nothing more is written or logged.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(g.writes(), w);
        let mut again = vec![0u64; 4];
        g.fetch_and_clear(0, &mut again).unwrap();
        assert!(again.iter().all(|&x| x == 0));
        // A page written by hand is logged and read back.
        let page = [9u8; PAGE_SIZE];
        g.write_page(1, 3, &page).unwrap();
        let mut bm1 = vec![0u64; 1];
        g.fetch_and_clear(1, &mut bm1).unwrap();
        assert_eq!(bm1[0] & (1 << 3), 1 << 3);
        let mut out = [0u8; PAGE_SIZE];
        g.read_page(1, 3, &mut out).unwrap();
        assert_eq!(out, page);
        g.resume().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(g.writes() > w + 1);
    }

    #[test]
    fn dirty_rate_and_throttle_are_honoured() {
        let g = guest(4000);
        std::thread::sleep(Duration::from_millis(500));
        let free = g.writes();
        // 4000 pages/s for 0.5 s: about 2000, never far above.
        assert!((200..=3000).contains(&free), "{free}");
        g.set_throttle(99).unwrap();
        assert_eq!(g.throttle(), 99);
        std::thread::sleep(Duration::from_millis(60));
        let w0 = g.writes();
        std::thread::sleep(Duration::from_millis(500));
        // At 99 % each vCPU runs 10 ms per second: at most one slice here.
        let throttled = g.writes() - w0;
        assert!(throttled * 4 < free, "{throttled} vs {free}");
        g.set_throttle(0).unwrap();
    }
}
