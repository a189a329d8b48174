//! What a KVM guest adds to a migration: the vCPU state as our own device
//! section after RAM, and on the destination a VM built from the received
//! RAM and vCPU state, resumed and checked.

use std::time::Duration;

use serde::Serialize;

use super::{KvmError, KvmVm, PAGE_SIZE, RAM_BLOCK_NAME, state};

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

    /// Destination: builds a stopped VM from received RAM and the vCPU
    /// section. `blocks` are the stream's RAM blocks as `(name, bytes)`;
    /// exactly one, [`RAM_BLOCK_NAME`], is expected. `read_page(page, out)`
    /// fills `out` with page `page` of that block. `vcpu_section` is the
    /// payload of the [`VCPU_SECTION`] device section.
    ///
    /// Errors: [`KvmError::Config`] for unexpected blocks, a missing or
    /// bad vCPU section ([`KvmError::State`]), and KVM's errors.
    pub fn from_migration(
        blocks: &[(String, u64)],
        mut read_page: impl FnMut(u64, &mut [u8; PAGE_SIZE]) -> Result<(), KvmError>,
        vcpu_section: &[u8],
    ) -> Result<Self, KvmError> {
        let [(name, size)] = blocks else {
            return Err(KvmError::Config(format!(
                "{} RAM blocks received; a KVM guest has one, {RAM_BLOCK_NAME:?}",
                blocks.len()
            )));
        };
        if name != RAM_BLOCK_NAME {
            return Err(KvmError::Config(format!(
                "RAM block {name:?} received; a KVM guest has {RAM_BLOCK_NAME:?}"
            )));
        }
        let states = state::decode(vcpu_section)?;
        let vm = KvmVm::new_incoming(*size, states.len())?;
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..vm.ram().pages() {
            read_page(p, &mut page)?;
            if page.iter().any(|b| *b != 0) {
                vm.ram().write(p * PAGE_SIZE as u64, &page)?;
            }
        }
        vm.restore_state(vcpu_section)?;
        Ok(vm)
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
