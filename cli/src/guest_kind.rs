//! The guest kinds of `--guest`: what differs between migrating (and receiving) the
//! built-in simulated guest and a real KVM guest. `precopy migrate` and `precopy incoming`
//! have one path each; they ask the guest kind to build the guest, to describe it, to check
//! (or resume) what a destination received, and for its own JSON keys and summary lines.

use std::sync::Arc;

use precopy_engine::{Received, SharedGuest, SimConfig, SimGuest};
use serde_json::{Map, Value};

use crate::args::{GuestKind, MigrateArgs};
use crate::destination::same_ram;
use crate::report::mib;

/// The guest on the source side of `precopy migrate`.
pub(crate) trait SourceGuest {
    /// The guest as the engine's `Migrator` takes it.
    fn shared(&self) -> SharedGuest;
    /// The line printed (stderr, not with `--json`) before migrating to `uri`.
    fn describe(&self, args: &MigrateArgs, uri: &str) -> String;
    /// Whether what a destination received from this guest (stopped at switchover) is
    /// right: the same RAM and, for a KVM guest, a VM built from it resumes and passes its
    /// self-check.
    fn check(&mut self, r: &Received) -> bool;
    /// Guest-specific keys of the `--json` object (KVM: `"guest"`).
    fn add_json(&self, _o: &mut Map<String, Value>) {}
    /// Guest-specific lines after the summary.
    fn print_details(&self) {}
}

/// The guest on the destination side of `precopy incoming`.
pub(crate) trait IncomingGuest {
    /// The line printed on stderr once listening on `uri` (scripts wait for "waiting on").
    fn waiting(&self, uri: &str) -> String;
    /// Load a completed stream into a guest of this kind: `Ok(true)` when it is good,
    /// `Ok(false)` when the guest says it is not (KVM: its self-check failed or it made no
    /// progress), `Err` when no guest could be built from it.
    fn load(&mut self, r: &Received) -> Result<bool, String>;
    /// Guest-specific keys of the `--json` object (KVM: `"guest"`).
    fn add_json(&self, _o: &mut Map<String, Value>) {}
    /// Guest-specific lines after the summary.
    fn print_details(&self) {}
}

impl GuestKind {
    /// Build the guest to migrate from the options (a KVM guest is created and running).
    /// Errors: the message to print after `precopy migrate: `.
    pub(crate) fn source(self, args: &MigrateArgs) -> Result<Box<dyn SourceGuest>, String> {
        match self {
            GuestKind::Sim => SimSource::new(args).map(|g| Box::new(g) as Box<dyn SourceGuest>),
            GuestKind::Kvm => crate::kvm_guest::source(args),
        }
    }

    /// The guest kind that receives for `precopy incoming`. Errors: the message to print
    /// after `precopy incoming: ` (KVM on a platform without it).
    pub(crate) fn incoming(self) -> Result<Box<dyn IncomingGuest>, String> {
        match self {
            GuestKind::Sim => Ok(Box::new(SimIncoming)),
            GuestKind::Kvm => crate::kvm_guest::incoming(),
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
    fn shared(&self) -> SharedGuest {
        self.guest.clone()
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

    fn check(&mut self, r: &Received) -> bool {
        same_ram(&*self.guest, r)
    }
}

/// The simulated guest's destination: the received RAM image is the guest.
struct SimIncoming;

impl IncomingGuest for SimIncoming {
    fn waiting(&self, uri: &str) -> String {
        format!("precopy incoming: waiting on {uri}")
    }

    fn load(&mut self, _r: &Received) -> Result<bool, String> {
        Ok(true)
    }
}
