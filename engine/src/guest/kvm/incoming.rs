//! The destination's guest memory: [`KvmIncomingRam`], the
//! [`RamTarget`] a KVM destination loads the stream into, and
//! [`KvmVm::from_loaded`], the VM built around it. The received RAM is held
//! once, in the guest memory itself: records are decoded straight into it,
//! the digest is computed over it, and the VM takes it over without copying
//! a page.

use kvm_ioctls::{Kvm, VmFd};
use precopy_stream::{OwnedDeviceState, RamBlockInfo, RamTarget, TargetError};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use xbzrle::{PAGE_SIZE, Page};

use super::{
    ConfigError, KvmError, KvmRam, KvmVm, RAM_BLOCK_NAME, VCPU_SECTION, program, ram, state,
};

/// The guest memory of a KVM destination, as a [`RamTarget`] for
/// [`Destination::receive_into`](crate::Destination::receive_into).
///
/// Empty until MEM_SIZE arrives; then it creates a VM (no vCPUs yet) with
/// RAM of the one block's size, [`RAM_BLOCK_NAME`], checked as a KVM guest's
/// RAM is (see [`KvmRam::new`] and [`program::check_layout`]) and bounded by
/// the loader's `max_ram_bytes`. Records are loaded straight into that
/// memory; [`KvmVm::from_loaded`] then adds the vCPUs. Until then no vCPU
/// exists, so nothing but the loader writes the memory.
#[derive(Debug)]
pub struct KvmIncomingRam {
    slot_size: u64,
    vm: Option<EmptyVm>,
}

/// A VM with RAM and no vCPUs.
#[derive(Debug)]
struct EmptyVm {
    // Field order is drop order: the VM fd before the memory it maps.
    vm: VmFd,
    ram: KvmRam,
    kvm: Kvm,
}

impl Default for KvmIncomingRam {
    fn default() -> Self {
        Self::new()
    }
}

impl KvmIncomingRam {
    /// No RAM yet; slots of [`ram::MAX_SLOT_SIZE`] once MEM_SIZE gives the size.
    pub fn new() -> Self {
        Self {
            slot_size: ram::MAX_SLOT_SIZE,
            vm: None,
        }
    }

    /// The guest memory, once MEM_SIZE has come.
    pub fn ram(&self) -> Option<&KvmRam> {
        self.vm.as_ref().map(|v| &v.ram)
    }
}

/// A KVM error as a target error.
fn other(e: KvmError) -> TargetError {
    TargetError::Other(Box::new(e))
}

impl RamTarget for KvmIncomingRam {
    /// Errors: [`ConfigError::IncomingBlocks`] for blocks other than one
    /// [`RAM_BLOCK_NAME`], [`TargetError::Alloc`] over `max_bytes`, the errors of
    /// [`program::check_layout`] (for one vCPU; the vCPU count is checked again
    /// in [`KvmVm::from_loaded`]) and of creating the VM and its RAM;
    /// [`TargetError::Mismatch`] for a second MEM_SIZE of another size.
    fn set_blocks(&mut self, blocks: &[RamBlockInfo], max_bytes: u64) -> Result<(), TargetError> {
        let [block] = blocks else {
            let names = blocks.iter().map(|b| b.name.clone()).collect();
            return Err(other(KvmError::Config(ConfigError::IncomingBlocks {
                names,
                expected: RAM_BLOCK_NAME,
            })));
        };
        if block.name != RAM_BLOCK_NAME {
            let names = vec![block.name.clone()];
            return Err(other(KvmError::Config(ConfigError::IncomingBlocks {
                names,
                expected: RAM_BLOCK_NAME,
            })));
        }
        let size = block.used_length;
        if let Some(have) = &self.vm {
            if have.ram.size() == size {
                return Ok(());
            }
            return Err(TargetError::Mismatch {
                why: "block list does not match the destination's RAM blocks",
            });
        }
        if size > max_bytes {
            return Err(TargetError::Alloc { bytes: size });
        }
        program::check_layout(size, 1).map_err(other)?;
        let (kvm, vm, ram) = KvmVm::create_vm(size, self.slot_size).map_err(other)?;
        self.vm = Some(EmptyVm { vm, ram, kvm });
        Ok(())
    }

    fn block_count(&self) -> usize {
        usize::from(self.vm.is_some())
    }

    fn block_info(&self, block: usize) -> Option<(&str, u64)> {
        let ram = self.ram().filter(|_| block == 0)?;
        Some((RAM_BLOCK_NAME, ram.size()))
    }

    fn page_mut(&mut self, block: usize, offset: u64) -> Option<&mut Page> {
        let ram = self.ram().filter(|_| block == 0)?;
        let end = offset.checked_add(PAGE_SIZE as u64)?;
        if !offset.is_multiple_of(PAGE_SIZE as u64) || end > ram.size() {
            return None;
        }
        let host = ram.memory().get_host_address(GuestAddress(offset));
        // SAFETY: `host` is the address of page `offset` in the live mapping owned by
        // `self.vm` (slots are whole pages, so the page lies in one mapping); the
        // returned borrow of `self` is exclusive, and no vCPU exists to write the memory.
        host.ok().map(|p| unsafe { &mut *p.cast::<Page>() })
    }

    fn block_parts(&self, block: usize) -> Vec<&[u8]> {
        let Some(ram) = self.ram().filter(|_| block == 0) else {
            return Vec::new();
        };
        ram.host_parts()
            .into_iter()
            // SAFETY: each part is a live mapping of `len` bytes owned by `self.vm`, which
            // outlives the shared borrow of `self`; no vCPU exists to write it and no
            // `&mut` page can be taken while `self` is borrowed.
            .map(|(p, len)| unsafe { std::slice::from_raw_parts(p.cast_const(), len) })
            .collect()
    }
}

impl KvmVm {
    /// Destination: builds a stopped VM around the guest memory a verified stream was
    /// loaded into ([`Received::image`](crate::Received::image) of
    /// [`Destination::receive_into`](crate::Destination::receive_into) with a
    /// [`KvmIncomingRam`]), with vCPUs from the [`VCPU_SECTION`] device section among
    /// `device_states`. No page is copied: the VM runs on that memory.
    ///
    /// Errors: [`ConfigError::MissingVcpuSection`], [`ConfigError::IncomingBlocks`] when no RAM came,
    /// a bad vCPU section ([`KvmError::State`]), a vCPU count that does not fit the RAM
    /// ([`program::check_layout`]), and KVM's errors.
    pub fn from_loaded(
        ram: KvmIncomingRam,
        device_states: &[OwnedDeviceState],
    ) -> Result<Self, KvmError> {
        let vcpu_section = &device_states
            .iter()
            .find(|d| d.name == VCPU_SECTION)
            .ok_or(KvmError::Config(ConfigError::MissingVcpuSection {
                section: VCPU_SECTION,
            }))?
            .payload;
        let Some(EmptyVm { vm, ram, kvm }) = ram.vm else {
            return Err(KvmError::Config(ConfigError::IncomingBlocks {
                names: Vec::new(),
                expected: RAM_BLOCK_NAME,
            }));
        };
        let states = state::decode(vcpu_section)?;
        program::check_layout(ram.size(), states.len())?;
        let vm = KvmVm::with_vcpus(kvm, vm, ram, states.len())?;
        vm.restore_state(vcpu_section)?;
        Ok(vm)
    }
}
