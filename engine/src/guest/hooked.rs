//! [`Hooked`]: any guest, with closures called at its dirty-bitmap syncs (and, optionally,
//! after each page copy-out, at log start and at each throttle change).
//!
//! Tests and benches use it to act on a guest at a known point of the pre-copy loop: write
//! a page between two passes, race a write against the copy-out, record the throttle
//! auto-converge asked for, slow the setup down. Every trait method is forwarded to the
//! inner guest unchanged.
//!
//! ```
//! use std::sync::Arc;
//! use precopy_engine::{Hooked, Migrator, MigrationStatus, SimConfig, SimGuest};
//!
//! let sim = Arc::new(SimGuest::new(SimConfig {
//!     blocks: vec![("pc.ram".into(), 64 << 10)],
//!     ..SimConfig::default()
//! })?);
//! // Rewrite page 3 at the end of the first pass (sync 1 is the setup sync).
//! let guest = Arc::new(Hooked::new(sim.clone()).on_sync(|g, sync| {
//!     if sync == 2 {
//!         g.write_page(0, 3, &[7; 4096]).unwrap();
//!     }
//! }));
//! let m = Migrator::new(guest.clone());
//! m.start_to(Vec::new())?;
//! assert_eq!(m.wait()?.status, MigrationStatus::Completed);
//! assert!(guest.syncs() >= 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use xbzrle::Page;

use super::{
    DeviceStateEntry, DirtyLog, GuestError, GuestRam, RamBlockInfo, Throttle, VcpuControl,
};

/// The closure [`Hooked`] calls at each dirty-bitmap sync: `(inner guest, sync number)`;
/// sync 1 is the setup sync, sync `n + 1` ends pass `n`.
pub type SyncHook<G> = Box<dyn Fn(&G, u64) + Send + Sync>;
/// Called after a page was copied out: `(inner guest, block, page)`.
type ReadHook<G> = Box<dyn Fn(&G, usize, u64) + Send + Sync>;
/// Called with the inner guest only.
type GuestHook<G> = Box<dyn Fn(&G) + Send + Sync>;
/// Called with the throttle percentage the engine sets.
type ThrottleHook<G> = Box<dyn Fn(&G, u8) + Send + Sync>;

/// A guest wrapper that forwards every guest trait to `inner` and calls hooks.
///
/// * [`on_sync`](Hooked::on_sync): at each dirty-bitmap sync, before the inner guest's log
///   of block 0 is fetched (so pages the hook writes are reported by this very sync). The
///   hook gets the sync number (1 = the setup sync), also readable with
///   [`syncs`](Hooked::syncs).
/// * [`on_read`](Hooked::on_read): after each page copy-out (`read_page`), e.g. to race a
///   guest write against the page in flight.
/// * [`on_log_start`](Hooked::on_log_start): before the inner `log_start`.
/// * [`on_set_throttle`](Hooked::on_set_throttle): before the inner `set_throttle`, with
///   the percentage asked for.
///
/// The hooks run on the engine's migration thread (`on_read` possibly on several encoding
/// threads at once), hence `Send + Sync`.
pub struct Hooked<G: ?Sized> {
    inner: Arc<G>,
    syncs: AtomicU64,
    on_sync: SyncHook<G>,
    on_read: Option<ReadHook<G>>,
    on_log_start: Option<GuestHook<G>>,
    on_set_throttle: Option<ThrottleHook<G>>,
}

impl<G: ?Sized> fmt::Debug for Hooked<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooked")
            .field("syncs", &self.syncs())
            .finish_non_exhaustive()
    }
}

impl<G: ?Sized> Hooked<G> {
    /// Wrap `inner`; every hook starts as a no-op.
    pub fn new(inner: Arc<G>) -> Hooked<G> {
        Hooked {
            inner,
            syncs: AtomicU64::new(0),
            on_sync: Box::new(|_, _| {}),
            on_read: None,
            on_log_start: None,
            on_set_throttle: None,
        }
    }

    /// Set the sync hook (see [`Hooked`]).
    pub fn on_sync(mut self, f: impl Fn(&G, u64) + Send + Sync + 'static) -> Hooked<G> {
        self.on_sync = Box::new(f);
        self
    }

    /// Set the copy-out hook: `f(inner, block, page)` after each `read_page`.
    pub fn on_read(mut self, f: impl Fn(&G, usize, u64) + Send + Sync + 'static) -> Hooked<G> {
        self.on_read = Some(Box::new(f));
        self
    }

    /// Set the hook called before the inner `log_start`.
    pub fn on_log_start(mut self, f: impl Fn(&G) + Send + Sync + 'static) -> Hooked<G> {
        self.on_log_start = Some(Box::new(f));
        self
    }

    /// Set the hook called before the inner `set_throttle`, with the percentage.
    pub fn on_set_throttle(mut self, f: impl Fn(&G, u8) + Send + Sync + 'static) -> Hooked<G> {
        self.on_set_throttle = Some(Box::new(f));
        self
    }

    /// The wrapped guest.
    pub fn inner(&self) -> &Arc<G> {
        &self.inner
    }

    /// Dirty-bitmap syncs seen so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }
}

impl<G: GuestRam + ?Sized> GuestRam for Hooked<G> {
    fn blocks(&self) -> Vec<RamBlockInfo> {
        self.inner.blocks()
    }

    fn prefetch_page(&self, block: usize, page: u64) {
        self.inner.prefetch_page(block, page);
    }

    fn read_page(&self, block: usize, page: u64, out: &mut Page) -> Result<(), GuestError> {
        self.inner.read_page(block, page, out)?;
        if let Some(f) = &self.on_read {
            f(&self.inner, block, page);
        }
        Ok(())
    }

    fn device_states(&self) -> Result<Vec<DeviceStateEntry>, GuestError> {
        self.inner.device_states()
    }
}

impl<G: DirtyLog + ?Sized> DirtyLog for Hooked<G> {
    fn log_start(&self) -> Result<(), GuestError> {
        if let Some(f) = &self.on_log_start {
            f(&self.inner);
        }
        self.inner.log_start()
    }

    fn fetch_and_clear(&self, block: usize, bitmap: &mut [u64]) -> Result<(), GuestError> {
        if block == 0 {
            let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
            (self.on_sync)(&self.inner, n);
        }
        self.inner.fetch_and_clear(block, bitmap)
    }

    fn log_stop(&self) -> Result<(), GuestError> {
        self.inner.log_stop()
    }
}

impl<G: VcpuControl + ?Sized> VcpuControl for Hooked<G> {
    fn stop(&self) -> Result<(), GuestError> {
        self.inner.stop()
    }

    fn resume(&self) -> Result<(), GuestError> {
        self.inner.resume()
    }

    fn is_running(&self) -> bool {
        self.inner.is_running()
    }
}

impl<G: Throttle + ?Sized> Throttle for Hooked<G> {
    fn set_throttle(&self, percent: u8) -> Result<(), GuestError> {
        if let Some(f) = &self.on_set_throttle {
            f(&self.inner, percent);
        }
        self.inner.set_throttle(percent)
    }

    fn throttle(&self) -> u8 {
        self.inner.throttle()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::guest::sim::{SimConfig, SimGuest};

    #[test]
    fn forwards_and_calls_the_hooks() {
        let sim = Arc::new(
            SimGuest::new(SimConfig {
                blocks: vec![("a".into(), 128 << 10), ("b".into(), 64 << 10)],
                ..SimConfig::default()
            })
            .unwrap(),
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s1, s2, s3) = (seen.clone(), seen.clone(), seen.clone());
        let h = Hooked::new(sim.clone())
            .on_sync(move |g, n| {
                s1.lock().unwrap().push(format!("sync {n}"));
                g.write_page(1, 2, &[1; 4096]).unwrap();
            })
            .on_read(move |_, b, p| s2.lock().unwrap().push(format!("read {b}/{p}")))
            .on_log_start(|_| {})
            .on_set_throttle(move |_, t| s3.lock().unwrap().push(format!("throttle {t}")));
        assert_eq!(h.blocks(), sim.blocks());
        h.log_start().unwrap();
        // One sync = one fetch per block; the hook runs once, before block 0's fetch, so
        // its write to block 1 is in this sync.
        let mut b0 = vec![0u64; 1];
        let mut b1 = vec![0u64; 1];
        h.fetch_and_clear(0, &mut b0).unwrap();
        h.fetch_and_clear(1, &mut b1).unwrap();
        assert_eq!(h.syncs(), 1);
        assert_eq!(b1[0], 1 << 2);
        let mut page = [0u8; 4096];
        h.read_page(1, 2, &mut page).unwrap();
        assert_eq!(page, [1; 4096]);
        h.set_throttle(30).unwrap();
        assert_eq!(h.throttle(), 30);
        h.stop().unwrap();
        assert!(!h.is_running());
        h.resume().unwrap();
        assert!(h.is_running());
        assert_eq!(*seen.lock().unwrap(), ["sync 1", "read 1/2", "throttle 30"]);
    }
}
