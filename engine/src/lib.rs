//! The pre-copy live-migration engine: QEMU's pre-copy loop (migration/migration.c,
//! migration/ram.c) with downtime-based convergence, auto-converge and XBZRLE, over real
//! transports, writing and reading QEMU-compatible streams (`precopy-stream`).
//!
//! * The VMM boundary is in [`traits`]: implement [`GuestRam`], [`DirtyLog`],
//!   [`VcpuControl`] and [`Throttle`] for your guest ([`sim::SimGuest`] is a complete
//!   example; the `kvm` feature adds a real KVM guest).
//! * The source: [`Migrator`] is the control API (QMP's `migrate`, `query-migrate`,
//!   `migrate_cancel`, `migrate-set-parameters`, `migrate-set-capabilities`, blockers,
//!   state-change events); the loop and the per-page rules are documented in [`migration`].
//! * The destination: [`Destination`] reads a stream into RAM and verifies the source's RAM
//!   digest ([`destination`]).
//! * [`policy`]: the estimator, the switchover predicate and auto-converge as pure functions.
//! * [`params`], [`info`]: QEMU's parameter and `query-migrate` names; [`transport`]: URIs.
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
