//! The pre-copy live-migration engine: QEMU's pre-copy loop (migration/migration.c,
//! migration/ram.c) with downtime-based convergence, auto-converge and XBZRLE, over real
//! transports.
//!
//! The VMM boundary is in [`traits`]: implement [`GuestRam`], [`DirtyLog`],
//! [`VcpuControl`] and [`Throttle`] for your guest.

pub mod traits;

pub use traits::{
    DirtyLog, Guest, GuestError, GuestRam, GuestRamWrite, RamBlockInfo, SharedGuest, Throttle,
    VcpuControl,
};
