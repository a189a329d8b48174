//! The pre-copy live-migration engine: QEMU's pre-copy loop (migration/migration.c,
//! migration/ram.c) with downtime-based convergence, auto-converge and XBZRLE, over real
//! transports.
//!
//! The VMM boundary is in [`traits`]: implement [`GuestRam`], [`DirtyLog`],
//! [`VcpuControl`] and [`Throttle`] for your guest.

pub mod destination;
pub mod info;
pub mod migration;
pub mod params;
pub mod policy;
pub mod sim;
pub mod traits;
pub mod transport;

pub use destination::{Destination, IncomingError, Received};
pub use info::{MigrationInfo, MigrationStatus, RamStats, XbzrleCacheStats};
pub use migration::{BlockerId, MigrateError, MigrationSink, Migrator, StateChange};
pub use params::{Capabilities, MigrationParameters, ParameterError, ParameterUpdate};
pub use sim::{SimConfig, SimGuest, Workload};
pub use traits::{
    DeviceStateEntry, DirtyLog, Guest, GuestError, GuestRam, GuestRamWrite, RamBlockInfo,
    SharedGuest, Throttle, VcpuControl,
};
pub use transport::{IncomingListener, MigrationUri, Outgoing, TransportError};

#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
