//! Guests: the VMM boundary (what the engine needs from a guest, as four small traits) and
//! the guests the engine ships.
//!
//! A VMM author plugs the engine into a VMM by implementing these traits for their guest.
//! The engine ships two implementations: the simulated guest in [`sim`] and, with the `kvm`
//! feature, a real KVM guest in `kvm`. [`Hooked`] wraps any guest to run a closure at each
//! dirty-bitmap sync (tests and benches). The engine is the only caller during a migration;
//! every method may be called from the engine's migration thread while vCPUs run.
//!
//! | module | what |
//! |---|---|
//! | this file | the traits, [`GuestError`] |
//! | [`sim`] | [`SimGuest`](sim::SimGuest): RAM in atomics, seeded writer threads |
//! | `kvm` | `KvmVm`: a real KVM VM (feature `kvm`, Linux x86_64) |
//! | `hooked` | [`Hooked`]: a guest wrapper with a sync hook |
//!
//! | trait | QEMU counterpart | used for |
//! |---|---|---|
//! | [`GuestRam`] | `RAMBlock` list, `ramblock_recv`/`host` pointers | RAM block names and used lengths, copying one page out |
//! | [`DirtyLog`] | `memory_global_dirty_log_start/sync/stop`, `KVM_GET_DIRTY_LOG` | fetch-and-clear of the dirty bitmap per block |
//! | [`VcpuControl`] | `vm_stop_force_state(RUN_STATE_FINISH_MIGRATE)`, `vm_start` | stopping the guest for switchover, resuming it on failure |
//! | [`Throttle`] | `cpu_throttle_set` (softmmu/cpu-throttle.c) | auto-converge |
//!
//! Pages are [`xbzrle::PAGE_SIZE`] (4096) bytes. A page is addressed by its RAM block index
//! (position in [`GuestRam::blocks`]) and its page index inside that block (byte offset /
//! 4096). Guest memory is never exposed as `&[u8]`: a vCPU may be writing it, so the only
//! access is a copy of one page into a caller-owned [`Page`].

use std::sync::Arc;

use xbzrle::{PAGE_SIZE, Page};

mod hooked;
pub mod sim;

#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;

pub use hooked::{Hooked, SyncHook};
/// One RAM block of a guest, as it appears in the stream's MEM_SIZE record (QEMU
/// `RAMBlock`'s `idstr` and `used_length`): the stream's own type, so a guest's block list
/// is written as is.
pub use precopy_stream::RamBlockInfo;

/// Number of pages in a RAM block (`used_length / PAGE_SIZE`).
pub fn block_pages(block: &RamBlockInfo) -> u64 {
    block.used_length / PAGE_SIZE as u64
}

/// An error reported by a guest implementation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuestError {
    /// `block` is not an index into [`GuestRam::blocks`].
    #[error("no RAM block with index {block}")]
    NoSuchBlock {
        /// The index asked for.
        block: usize,
    },
    /// `page` is past the end of block `block`.
    #[error("page {page} is past the end of RAM block {block} ({pages} pages)")]
    PageOutOfRange {
        /// Block index.
        block: usize,
        /// Page index asked for.
        page: u64,
        /// Pages in the block.
        pages: u64,
    },
    /// A bitmap passed to [`DirtyLog::fetch_and_clear`] has the wrong number of words.
    #[error("dirty bitmap for block {block} has {got} words, expected {expected}")]
    BitmapSize {
        /// Block index.
        block: usize,
        /// Words supplied.
        got: usize,
        /// Words needed (`pages.div_ceil(64)`).
        expected: usize,
    },
    /// The VMM failed (an ioctl, a closed vCPU channel, ...).
    #[error("VMM error: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else the VMM wants to report (e.g. a `KvmError`); a `String` or `&str`
    /// converts with `.into()`.
    #[error("{0}")]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// One device section for the stream: `(id string, instance id, version id, payload)`.
pub type DeviceStateEntry = (String, u32, u32, Vec<u8>);

/// Guest RAM: the list of RAM blocks and page copy-out.
///
/// Contract:
/// * [`blocks`](GuestRam::blocks) returns the same list for the whole life of a migration
///   (RAM hotplug during migration is a blocker in QEMU too).
/// * [`read_page`](GuestRam::read_page) copies page `page` of block `block` into `out`. It
///   must not tear below 8-byte granularity with respect to a concurrent guest write of an
///   aligned word, and it must be safe (no data race in the Rust sense) while vCPUs run. The
///   copy may mix old and new bytes of a page being written; the dirty log makes the engine
///   send such a page again (see [`DirtyLog`]).
pub trait GuestRam: Send + Sync {
    /// The guest's RAM blocks, in migration order.
    fn blocks(&self) -> Vec<RamBlockInfo>;

    /// Copy one page out of guest RAM into `out`.
    ///
    /// Errors: [`GuestError::NoSuchBlock`], [`GuestError::PageOutOfRange`], or a VMM error.
    fn read_page(&self, block: usize, page: u64, out: &mut Page) -> Result<(), GuestError>;

    /// A hint that [`read_page`](GuestRam::read_page) of this page comes next: start
    /// bringing it into the CPU caches (the engine calls it one page ahead, so the copy-out
    /// does not wait for memory). Never fails and has no visible effect; an out-of-range
    /// page is ignored. Default: nothing.
    fn prefetch_page(&self, block: usize, page: u64) {
        let _ = (block, page);
    }

    /// Device state to send after the final RAM pass, while the vCPUs are stopped: each
    /// entry is `(id string, instance id, version id, payload)` and becomes one of our
    /// device sections (the id string starts with `precopy/`, e.g. the KVM guest's
    /// `precopy/vcpu`). The destination finds them in `Received::device_states`.
    /// Default: none.
    fn device_states(&self) -> Result<Vec<DeviceStateEntry>, GuestError> {
        Ok(Vec::new())
    }
}

/// The guest's dirty log: which pages were written since the last fetch.
///
/// Contract:
/// * Between [`log_start`](DirtyLog::log_start) and [`log_stop`](DirtyLog::log_stop) every
///   guest write to a page must be recorded, and must become visible to a later
///   [`fetch_and_clear`](DirtyLog::fetch_and_clear) no earlier than the write itself (mark
///   after write, or mark on write-fault as KVM does): if the engine copies a page after
///   fetching its bit, either the copy contains the write or the bit is set again.
/// * `fetch_and_clear` ORs the pages dirtied since the previous fetch into `bitmap` (bit
///   `i % 64` of word `i / 64` is page `i`, little-endian bit order as in KVM's dirty log) and
///   clears them in the log. It never clears bits in `bitmap`. `bitmap` has exactly
///   `pages.div_ceil(64)` words, else [`GuestError::BitmapSize`].
/// * One call of [`fetch_and_clear`](DirtyLog::fetch_and_clear) for every block is one
///   dirty-bitmap sync (QEMU's `migration_bitmap_sync`); the engine counts syncs.
pub trait DirtyLog: Send + Sync {
    /// Start dirty logging (clearing anything logged before).
    fn log_start(&self) -> Result<(), GuestError>;
    /// Fetch-and-clear the dirty bitmap of block `block` into `bitmap` (OR).
    fn fetch_and_clear(&self, block: usize, bitmap: &mut [u64]) -> Result<(), GuestError>;
    /// Stop dirty logging (after completion, failure or cancel).
    fn log_stop(&self) -> Result<(), GuestError>;
}

/// vCPU control: stop the guest for switchover, resume it when a migration fails.
///
/// Contract: when [`stop`](VcpuControl::stop) returns `Ok`, no vCPU writes guest memory until
/// [`resume`](VcpuControl::resume). Both are idempotent.
pub trait VcpuControl: Send + Sync {
    /// Stop every vCPU and wait until they are stopped.
    fn stop(&self) -> Result<(), GuestError>;
    /// Let the vCPUs run again.
    fn resume(&self) -> Result<(), GuestError>;
    /// True while the vCPUs run.
    fn is_running(&self) -> bool;
}

/// CPU throttle for auto-converge.
///
/// Contract: with a throttle of `p` percent (0..=99; 0 = off) each vCPU sleeps `p` % of its
/// time, in slices: QEMU sleeps `p / (100 - p)` × 10 ms after each 10 ms of running
/// (softmmu/cpu-throttle.c, `CPU_THROTTLE_TIMESLICE_NS`).
pub trait Throttle: Send + Sync {
    /// Set the throttle percentage (0 turns it off). Values above 99 are clamped to 99.
    fn set_throttle(&self, percent: u8) -> Result<(), GuestError>;
    /// The throttle percentage in force.
    fn throttle(&self) -> u8;
}

/// Everything the source side of a migration needs from a guest.
///
/// Implemented automatically for any type that implements the four traits.
pub trait Guest: GuestRam + DirtyLog + VcpuControl + Throttle {}

impl<T: GuestRam + DirtyLog + VcpuControl + Throttle + ?Sized> Guest for T {}

/// A shared guest handle, as the engine holds it.
pub type SharedGuest = Arc<dyn Guest>;
