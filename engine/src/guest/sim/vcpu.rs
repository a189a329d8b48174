//! The simulated vCPUs: writer threads that dirty RAM in a [`SimWorkload`] pattern at a
//! dirty rate, park on stop, and honour the CPU throttle (softmmu/cpu-throttle.c: at `p` %,
//! sleep `p / (100 - p)` × 10 ms after every 10 ms slice of running).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use xbzrle::PAGE_SIZE;

use super::SimWorkload;

pub(super) const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;
/// QEMU's CPU_THROTTLE_TIMESLICE_NS: 10 ms.
const SLICE: Duration = Duration::from_millis(10);
/// Largest hot set of the `hotset` workload: 48 MiB, so it fits the default 64 MiB XBZRLE
/// cache with room to spare.
const HOT_SET_MAX_PAGES: u64 = 12288;

pub(super) struct Block {
    pub(super) name: String,
    pub(super) pages: u64,
    pub(super) words: Box<[AtomicU64]>,
    pub(super) dirty: Box<[AtomicU64]>,
}

pub(super) struct RunState {
    pub(super) running: bool,
    pub(super) parked: usize,
}

pub(super) struct Inner {
    pub(super) blocks: Vec<Block>,
    /// Flat page index where each block starts (for uniform choice over all pages).
    pub(super) starts: Vec<u64>,
    pub(super) total_pages: u64,
    pub(super) workload: SimWorkload,
    pub(super) vcpus: usize,
    pub(super) dirty_rate: AtomicU64,
    pub(super) throttle: AtomicU8,
    pub(super) stop_req: AtomicBool,
    pub(super) shutdown: AtomicBool,
    pub(super) run: Mutex<RunState>,
    pub(super) cv: Condvar,
    pub(super) writes: AtomicU64,
}

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, RunState> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn locate(&self, flat: u64) -> (usize, u64) {
        let b = self.starts.partition_point(|&s| s <= flat) - 1;
        (b, flat - self.starts[b])
    }

    pub(super) fn mark(&self, block: usize, page: u64) {
        self.blocks[block].dirty[(page / 64) as usize]
            .fetch_or(1 << (page % 64), Ordering::Release);
    }

    pub(super) fn store_word(&self, block: usize, page: u64, word: usize, v: u64) {
        self.blocks[block].words[page as usize * WORDS_PER_PAGE + word].store(v, Ordering::Relaxed);
    }

    fn one_write(&self, rng: &mut Xoshiro256PlusPlus, w: SimWorkload) {
        let hot = (self.total_pages / 16).clamp(1, HOT_SET_MAX_PAGES);
        let w = if w == SimWorkload::Mix {
            match rng.gen_range(0..10) {
                0..=3 => SimWorkload::HotSet,
                4 | 5 => SimWorkload::Sparse,
                6 | 7 => SimWorkload::CacheLine,
                8 => SimWorkload::Zeroing,
                _ => SimWorkload::FullPage,
            }
        } else {
            w
        };
        let flat = if w == SimWorkload::HotSet && rng.gen_range(0..10) != 0 {
            // Hot pages are spread over RAM by a fixed odd multiplier (a permutation).
            (rng.gen_range(0..hot).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % self.total_pages
        } else {
            rng.gen_range(0..self.total_pages)
        };
        let (b, p) = self.locate(flat);
        match w {
            SimWorkload::Sparse | SimWorkload::HotSet | SimWorkload::Mix => {
                self.store_word(b, p, rng.gen_range(0..WORDS_PER_PAGE), rng.next_u64());
            }
            SimWorkload::CacheLine => {
                let line = rng.gen_range(0..WORDS_PER_PAGE / 8) * 8;
                for i in 0..8 {
                    self.store_word(b, p, line + i, rng.next_u64());
                }
            }
            SimWorkload::FullPage => {
                for i in 0..WORDS_PER_PAGE {
                    self.store_word(b, p, i, rng.next_u64());
                }
            }
            SimWorkload::Zeroing => {
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

    pub(super) fn writer(&self, seed: u64) {
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
