//! The guest kinds of `--guest`: what differs between migrating (and receiving) the
//! built-in simulated guest and a real KVM guest. `precopy migrate` and `precopy incoming`
//! have one path each, generic over the guest kind; they ask it to build the guest, for the
//! RAM a destination receives into (the guest's own memory for KVM, so RAM is held once),
//! to describe it, to check (or resume) what a destination received, and for its own JSON
//! keys and summary lines.

use std::process::ExitCode;
use std::sync::Arc;

use precopy_engine::{Received, SharedGuest, SimConfig, SimGuest};
use precopy_stream::{OwnedDeviceState, RamImage, RamTarget};
use serde_json::{Map, Value};

use crate::args::{GuestKind, IncomingArgs, MigrateArgs};
use crate::destination::same_ram;
use crate::report::mib;

/// The guest on the source side of `precopy migrate`.
pub(crate) trait SourceGuest {
    /// The RAM a destination in this process (or the check of a `--to file:` stream)
    /// receives into.
    type Ram: RamTarget + Send + 'static;
    /// The guest as the engine's `Migrator` takes it.
    fn shared(&self) -> SharedGuest;
    /// A new, empty destination RAM of this guest's kind.
    fn destination_ram(&self) -> Self::Ram;
    /// The line printed (stderr, not with `--json`) before migrating to `uri`.
    fn describe(&self, args: &MigrateArgs, uri: &str) -> String;
    /// Whether what a destination received from this guest (stopped at switchover) is
    /// right: the same RAM and, for a KVM guest, a VM built from it resumes and passes its
    /// self-check.
    fn check(&mut self, r: Received<Self::Ram>) -> bool;
    /// Guest-specific keys of the `--json` object (KVM: `"guest"`).
    fn add_json(&self, _o: &mut Map<String, Value>) {}
    /// Guest-specific lines after the summary.
    fn print_details(&self) {}
}

/// The guest on the destination side of `precopy incoming`.
pub(crate) trait IncomingGuest {
    /// The RAM the stream is loaded into: the guest's RAM (KVM: its memory, mapped when
    /// MEM_SIZE arrives; the simulated guest: a `RamImage`).
    type Ram: RamTarget + Send;
    /// The line printed on stderr once listening on `uri` (scripts wait for "waiting on").
    fn waiting(&self, uri: &str) -> String;
    /// A new, empty RAM to receive into.
    fn ram(&self) -> Self::Ram;
    /// Make a guest of this kind from a completed stream's RAM and device sections:
    /// `Ok(true)` when it is good, `Ok(false)` when the guest says it is not (KVM: its
    /// self-check failed or it made no progress), `Err` when no guest could be built.
    fn load(&mut self, ram: Self::Ram, device_states: &[OwnedDeviceState]) -> Result<bool, String>;
    /// Guest-specific keys of the `--json` object (KVM: `"guest"`).
    fn add_json(&self, _o: &mut Map<String, Value>) {}
    /// Guest-specific lines after the summary.
    fn print_details(&self) {}
}

impl GuestKind {
    /// `precopy migrate` with a guest of this kind, built from the options (a KVM guest is
    /// created and running). Errors: the message to print after `precopy migrate: `.
    pub(crate) fn migrate(self, args: &MigrateArgs) -> Result<ExitCode, String> {
        match self {
            GuestKind::Sim => crate::migrate::migrate_with(args, SimSource::new(args)?),
            GuestKind::Kvm => crate::kvm_guest::migrate(args),
        }
    }

    /// `precopy incoming` into a guest of this kind (KVM on a platform without it fails).
    pub(crate) fn incoming(self, args: &IncomingArgs) -> ExitCode {
        match self {
            GuestKind::Sim => crate::incoming::receive(args, SimIncoming),
            GuestKind::Kvm => crate::kvm_guest::incoming(args),
        }
    }
}

/// The built-in simulated guest, migrated.
struct SimSource {
    guest: Arc<SimGuest>,
}

impl SimSource {
    fn new(args: &MigrateArgs) -> Result<SimSource, String> {
        let guest = SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), args.mem)],
            workload: args.workload,
            dirty_rate: args.dirty_rate,
            vcpus: args.vcpus,
            seed: args.seed,
            initial_zero_percent: 25,
        })
        .map_err(|e| e.to_string())?;
        Ok(SimSource {
            guest: Arc::new(guest),
        })
    }
}

impl SourceGuest for SimSource {
    type Ram = RamImage;

    fn shared(&self) -> SharedGuest {
        self.guest.clone()
    }

    fn destination_ram(&self) -> RamImage {
        RamImage::default()
    }

    fn describe(&self, args: &MigrateArgs, uri: &str) -> String {
        format!(
            "migrating {} guest ({} workload, {} pages/s dirty rate) to {uri} (xbzrle backend {:?})",
            mib(args.mem),
            args.workload,
            args.dirty_rate,
            xbzrle::Codec::new().backend()
        )
    }

    fn check(&mut self, r: Received) -> bool {
        same_ram(&*self.guest, &r)
    }
}

/// The simulated guest's destination: the received RAM image is the guest (it has no
/// guest to resume).
struct SimIncoming;

impl IncomingGuest for SimIncoming {
    type Ram = RamImage;

    fn waiting(&self, uri: &str) -> String {
        format!("precopy incoming: waiting on {uri}")
    }

    fn ram(&self) -> RamImage {
        RamImage::default()
    }

    fn load(
        &mut self,
        _ram: RamImage,
        _device_states: &[OwnedDeviceState],
    ) -> Result<bool, String> {
        Ok(true)
    }
}
