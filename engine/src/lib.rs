//! The pre-copy live-migration engine: QEMU's pre-copy loop (migration/migration.c,
//! migration/ram.c) with downtime-based convergence, auto-converge and XBZRLE, over real
//! transports, writing and reading QEMU-compatible streams (`precopy-stream`).
//!
//! # Layout
//!
//! | module | what |
//! |---|---|
//! | [`migrator`] | [`Migrator`], the control API (QMP's `migrate`, `query-migrate`, `migrate_cancel`, `migrate-set-parameters`, `migrate-set-capabilities`, blockers, state-change events) |
//! | [`source`] | the migration thread: setup, iterate, complete; the per-page rules, the migration bitmap, the estimator and the 1 s period |
//! | [`destination`] | [`Destination`]: reads a stream straight into the RAM it will run from (a [`RamImage`](precopy_stream::RamImage), or a VMM's guest memory through [`RamTarget`](precopy_stream::RamTarget)) and verifies the source's RAM digest over it |
//! | [`vmdesc`] | the RAM digest and the VM description, used by both sides |
//! | [`transport`] | URIs ([`MigrationUri`]), the source's sinks ([`MigrationSink`], [`Outgoing`]) and the destination's [`IncomingListener`] |
//! | [`guest`] | the VMM boundary: implement [`GuestRam`], [`DirtyLog`], [`VcpuControl`] and [`Throttle`] for your guest; [`SimGuest`] (a complete example), `guest::kvm` (feature `kvm`: a real KVM guest, also at `precopy_engine::kvm`), [`Hooked`] (a guest with a sync hook, for tests and benches) |
//! | [`snapshot`] | full (mapped-ram) and incremental diff snapshots of a running guest: [`snapshot::Snapshotter`], chain restore and merge |
//! | [`policy`] | the estimator, the switchover predicate and auto-converge as pure functions |
//! | [`params`], [`info`] | QEMU's parameter and `query-migrate` names |
//!
//! The types a VMM uses are re-exported here, at the crate root: that is the stable path.
//! Module-level items (`transport::{AbortHandle, Incoming}`, `source::MACHINE_TYPE`,
//! `vmdesc::*`, `guest::kvm::*`) are reached through their module.
//!
//! ```
//! use std::sync::Arc;
//! use precopy_engine::*;
//!
//! // A 1 MiB simulated guest whose vCPU dirties 1000 pages/s.
//! let guest = Arc::new(SimGuest::new(SimConfig {
//!     blocks: vec![("pc.ram".into(), 1 << 20)],
//!     dirty_rate: 1000,
//!     ..SimConfig::default()
//! })?);
//! // Destination on an ephemeral loopback port.
//! let listener = IncomingListener::bind("tcp:127.0.0.1:0")?;
//! let uri = listener.local_uri();
//! let dest = std::thread::spawn(move || {
//!     Destination::new().accept_and_receive(listener, precopy_stream::Limits::default())
//! });
//! // Source.
//! let m = Migrator::new(guest.clone());
//! m.set_capabilities(Capabilities { xbzrle: true, auto_converge: true, ..Default::default() })?;
//! m.set_parameters(&ParameterUpdate { downtime_limit: Some(50), ..Default::default() })?;
//! m.start(&uri)?;
//! let info = m.wait()?;
//! assert_eq!(info.status, MigrationStatus::Completed);
//! let received = dest.join().unwrap()?; // RAM digest verified
//! assert_eq!(received.image.blocks()[0].data(), &guest.snapshot()[0][..]);
//! println!("{}", serde_json::to_string(&info)?); // query-migrate JSON
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Debugging: with `PRECOPY_TRACE` set in the environment, the loop prints one line per
//! dirty-bitmap sync to stderr (time, dirty pages, newly dirtied, bytes sent, threshold,
//! throttle), in the spirit of QEMU's trace events.

pub mod destination;
pub mod guest;
pub mod info;
pub mod migrator;
pub mod params;
pub mod policy;
pub mod relay;
pub mod snapshot;
pub mod source;
pub mod transport;
pub mod vmdesc;

pub use destination::{
    ChannelRefused, Destination, GATHER_TIMEOUT, HELLO_TIMEOUT, IncomingError, Received,
};
pub use guest::sim::{SimConfig, SimConfigError, SimGuest, SimWorkload, UnknownWorkload};
pub use guest::{
    DeviceStateEntry, DirtyLog, Guest, GuestError, GuestRam, Hooked, RamBlockInfo, SharedGuest,
    SyncHook, Throttle, VcpuControl, block_pages,
};
pub use info::{
    MethodStats, MigrationInfo, MigrationStatus, PageCompressionStats, RamStats, StateChange,
    XbzrleCacheStats,
};
pub use migrator::{BlockerId, MigrateError, Migrator};
pub use params::{
    Capabilities, MigrationParameters, PageCompression, ParameterError, ParameterUpdate,
};
pub use relay::{RelayError, RelayFailure, RelayOptions, RelaySide, RelayStats, relay};
pub use transport::{IncomingListener, MigrationSink, MigrationUri, Outgoing, TransportError};

/// The KVM guest (feature `kvm`, Linux x86_64): [`guest::kvm`], at its historical path.
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub use guest::kvm;
