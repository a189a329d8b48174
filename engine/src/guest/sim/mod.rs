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
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use xbzrle::{PAGE_SIZE, Page};

use super::{DirtyLog, GuestError, GuestRam, RamBlockInfo, Throttle, VcpuControl};
use vcpu::{Block, Inner, RunState, WORDS_PER_PAGE};

mod vcpu;
mod workload;

pub use workload::{SimWorkload, UnknownWorkload};

/// Configuration of a [`SimGuest`].
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// RAM blocks: (name, size in bytes). Each size must be a whole number of 4 KiB target
    /// pages ([`SimConfigError::Unaligned`] otherwise).
    pub blocks: Vec<(String, u64)>,
    /// How the vCPUs dirty memory.
    pub workload: SimWorkload,
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
            workload: SimWorkload::Sparse,
            dirty_rate: 0,
            vcpus: 1,
            seed: 0,
            initial_zero_percent: 25,
        }
    }
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

/// The simulated guest. Implements every trait of [`crate::guest`].
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
    /// `vcpus` is above [`SimGuest::MAX_VCPUS`].
    #[error("{requested} vCPUs; the simulated guest supports 1..={max}")]
    TooManyVcpus {
        /// vCPUs asked for.
        requested: usize,
        /// The limit, [`SimGuest::MAX_VCPUS`].
        max: usize,
    },
    /// The host would not start a vCPU thread (the guest is torn down again).
    #[error("cannot start the thread of vCPU {index}: {kind}")]
    SpawnVcpu {
        /// The vCPU whose thread failed to start.
        index: usize,
        /// Why, as the host said.
        kind: std::io::ErrorKind,
    },
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
    /// The most vCPUs (writer threads) a simulated guest has: QEMU's largest
    /// x86 machine limit (q35 with x2APIC).
    pub const MAX_VCPUS: usize = 1024;

    /// Build the guest, fill its RAM (seeded) and start its vCPU threads.
    ///
    /// # Errors
    /// [`SimConfigError`] for an invalid configuration, RAM the host cannot
    /// allocate, or a vCPU thread the host would not start (the threads
    /// already started are stopped and joined first).
    pub fn new(config: SimConfig) -> Result<SimGuest, SimConfigError> {
        if config.vcpus == 0 {
            return Err(SimConfigError::NoVcpu);
        }
        if config.vcpus > Self::MAX_VCPUS {
            return Err(SimConfigError::TooManyVcpus {
                requested: config.vcpus,
                max: Self::MAX_VCPUS,
            });
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
        let mut guest = SimGuest {
            inner,
            threads: Vec::with_capacity(config.vcpus),
        };
        for i in 0..config.vcpus {
            let inner = Arc::clone(&guest.inner);
            let seed = config.seed ^ (0x5851_F42D_4C95_7F2D_u64.wrapping_mul(i as u64 + 1));
            let t = std::thread::Builder::new()
                .name(format!("sim-vcpu{i}"))
                .spawn(move || inner.writer(seed))
                // Dropping `guest` stops and joins the threads started so far.
                .map_err(|e| SimConfigError::SpawnVcpu {
                    index: i,
                    kind: e.kind(),
                })?;
            guest.threads.push(t);
        }
        Ok(guest)
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

    fn prefetch_page(&self, block: usize, page: u64) {
        if self.check(block, page).is_ok() {
            let base = page as usize * WORDS_PER_PAGE;
            prefetch_words(&self.inner.blocks[block].words[base..base + WORDS_PER_PAGE]);
        }
    }

    fn read_page(&self, block: usize, page: u64, out: &mut Page) -> Result<(), GuestError> {
        self.check(block, page)?;
        let base = page as usize * WORDS_PER_PAGE;
        let words = &self.inner.blocks[block].words[base..base + WORDS_PER_PAGE];
        // Ask for every cache line of the page up front so the word-by-word atomic copy
        // below does not wait for one line at a time (a no-op for lines already on their
        // way after `prefetch_page`).
        prefetch_words(words);
        for (o, w) in out.chunks_exact_mut(8).zip(words) {
            o.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        Ok(())
    }
}

/// Prefetch every cache line of `words` (one page) into L1.
fn prefetch_words(words: &[AtomicU64]) {
    #[cfg(target_arch = "x86_64")]
    for line in words.chunks_exact(8) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of the x86_64 baseline, so the target feature is present;
        // a prefetch never faults and does not access memory in the language's sense.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = words;
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
mod tests;
