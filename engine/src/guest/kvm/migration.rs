//! What a KVM guest adds to a migration: the vCPU state as our own device
//! section after RAM, and on the destination the VM built from the received
//! RAM and vCPU state ([`KvmVm::from_loaded`](super::KvmVm::from_loaded)),
//! resumed and checked.

use std::time::Duration;

use serde::Serialize;

use super::{KvmError, KvmVm, state};

/// Id string of the device section carrying the vCPU state.
pub const VCPU_SECTION: &str = "precopy/vcpu";
/// Its instance id.
pub const VCPU_SECTION_INSTANCE: u32 = 0;
/// Its version id (= [`state::VERSION`]).
pub const VCPU_SECTION_VERSION: u32 = state::VERSION;

/// A device section to write after RAM: `(id string, instance id, version id,
/// payload)`, as the stream writer's `write_device_state` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSection {
    /// Section id string.
    pub name: String,
    /// Instance id.
    pub instance_id: u32,
    /// Version id.
    pub version_id: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// How the resumed guest did on the destination: the `"guest"` object of
/// `precopy migrate --guest kvm --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestReport {
    /// Sum of the vCPUs' progress counters in the received RAM (at switchover).
    pub progress_before: u64,
    /// The same, one second (or the given wait) after resuming.
    pub progress_after: u64,
    /// `"ok"` when the guest flagged no failure and the host check of every
    /// region passed, else `"failed"`.
    pub self_check: SelfCheck,
    /// What failed, when something did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// Result of the guest's self-check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SelfCheck {
    /// Every check passed.
    Ok,
    /// A check failed.
    Failed,
}

impl KvmVm {
    /// The vCPU state as a device section (vCPUs must be stopped, as they
    /// are after switchover).
    ///
    /// Errors: [`KvmError::Vcpu`] when the vCPUs run, KVM's errors.
    pub fn vcpu_section(&self) -> Result<DeviceSection, KvmError> {
        Ok(DeviceSection {
            name: VCPU_SECTION.to_owned(),
            instance_id: VCPU_SECTION_INSTANCE,
            version_id: VCPU_SECTION_VERSION,
            payload: self.save_state()?,
        })
    }

    /// Destination: reads the progress counters, resumes the guest, waits
    /// `wait` (1 s for the CLI), reads them again, then stops the guest
    /// briefly for the host-side check of its invariants and resumes it.
    ///
    /// Errors: KVM's errors (a failed check is reported, not an error).
    pub fn resume_and_report(&self, wait: Duration) -> Result<GuestReport, KvmError> {
        let progress_before = self.progress()?;
        self.resume()?;
        std::thread::sleep(wait);
        let progress_after = self.progress()?;
        let failure = self.self_check()?;
        self.resume()?;
        Ok(GuestReport {
            progress_before,
            progress_after,
            self_check: if failure.is_none() {
                SelfCheck::Ok
            } else {
                SelfCheck::Failed
            },
            failure,
        })
    }
}
