//! A real KVM guest for the engine (Linux x86_64, feature `kvm`; issue 6).
//!
//! [`KvmVm`] is a small VM built with rust-vmm's `kvm-ioctls`,
//! `kvm-bindings` and `vm-memory`:
//!
//! - guest RAM in one or more KVM memory slots registered with
//!   `KVM_MEM_LOG_DIRTY_PAGES` ([`ram`]), dirty log fetched with
//!   `KVM_GET_DIRTY_LOG` and re-armed with `KVM_CLEAR_DIRTY_LOG` under
//!   `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` when the kernel offers it, as QEMU's
//!   `accel/kvm/kvm-all.c` does;
//! - 1..=64 vCPUs in 32-bit protected mode running a program assembled at
//!   run time ([`program`]) that dirties memory in seeded patterns, keeps a
//!   progress counter and re-verifies checksums of its own data;
//! - vCPU threads that stop/resume on request and honour a CPU throttle
//!   the way QEMU's `softmmu/cpu-throttle.c` does ([`vcpu`]);
//! - vCPU state (regs, sregs, FPU, events, MSRs) saved to and restored
//!   from bytes ([`state`]) so it can travel in a device section of the
//!   migration stream;
//! - the engine's guest traits ([`traits`]): one RAM block `pc.ram`;
//! - what a KVM guest adds to a migration ([`migration`]): the vCPU state as a
//!   device section, and the destination's resume-and-report;
//! - the destination's guest memory ([`incoming`]): [`KvmIncomingRam`], which the
//!   stream is loaded into, and the VM built around it ([`KvmVm::from_loaded`]).
//!
//! ```no_run
//! use precopy_engine::kvm::{KvmConfig, KvmVm};
//! let vm = KvmVm::new(&KvmConfig { mem_size: 64 << 20, ..Default::default() })?;
//! vm.resume()?;
//! std::thread::sleep(std::time::Duration::from_millis(200));
//! vm.stop()?;
//! let state = vm.save_state()?;
//! # Ok::<(), precopy_engine::kvm::KvmError>(())
//! ```

mod error;
pub mod incoming;
pub mod migration;
pub mod program;
pub mod ram;
pub mod state;
pub mod traits;
pub mod vcpu;

use std::sync::Mutex;
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};

pub use error::{ConfigError, KvmError, MemoryError, Unavailable, VcpuError};
pub use incoming::KvmIncomingRam;
pub use migration::{DeviceSection, GuestReport, SelfCheck, VCPU_SECTION};
pub use program::{GuestStatus, KvmWorkload};
pub use ram::{KvmRam, SyncTiming};
pub use state::VcpuState;
pub use traits::RAM_BLOCK_NAME;
pub use vcpu::VcpuSet;

/// Default guest RAM size (512 MiB).
pub const DEFAULT_MEM_SIZE: u64 = 512 << 20;

/// Configuration of a new KVM guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmConfig {
    /// Guest RAM in bytes (multiple of 4096, 2 MiB..=3 GiB). Default 512 MiB.
    pub mem_size: u64,
    /// vCPUs (1..=64). Default 1.
    pub vcpus: usize,
    /// Target dirty rate of the whole guest in pages per second; 0 = as
    /// fast as the vCPUs run. Default 0.
    pub dirty_rate: u64,
    /// The guest program's memory patterns.
    pub workload: KvmWorkload,
    /// Largest KVM memory slot in bytes (multiple of 256 KiB); RAM is split
    /// into slots of this size. Default [`ram::MAX_SLOT_SIZE`] (1 GiB).
    pub slot_size: u64,
}

impl Default for KvmConfig {
    fn default() -> Self {
        Self {
            mem_size: DEFAULT_MEM_SIZE,
            vcpus: 1,
            dirty_rate: 0,
            workload: KvmWorkload::default(),
            slot_size: ram::MAX_SLOT_SIZE,
        }
    }
}

/// Running totals of dirty-log syncs.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncTotals {
    /// Syncs done.
    pub count: u64,
    /// Sum of their wall times.
    pub elapsed: Duration,
    /// Sum of the RAM bytes they covered.
    pub bytes: u64,
}

impl SyncTotals {
    /// Mean sync time per GiB of guest RAM.
    pub fn per_gib(&self) -> Duration {
        SyncTiming {
            elapsed: self.elapsed,
            bytes: self.bytes,
            dirty_pages: 0,
        }
        .per_gib()
    }
}

/// A KVM VM: RAM, vCPU threads and the guest program.
///
/// The vCPUs start stopped; call [`KvmVm::resume`].
#[derive(Debug)]
pub struct KvmVm {
    // Field order is drop order: threads (and their VcpuFds) first, then
    // the VM fd, then the memory it maps.
    vcpus: VcpuSet,
    vm: VmFd,
    ram: KvmRam,
    msr_list: Vec<u32>,
    syncs: Mutex<SyncTotals>,
    _kvm: Kvm,
}

impl KvmVm {
    /// Checks that `/dev/kvm` can create a VM. Tests use this to decide to
    /// skip.
    ///
    /// Errors: [`KvmError::Unavailable`] saying why.
    pub fn probe() -> Result<(), KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Unavailable(Unavailable::Open(e)))?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(KvmError::Unavailable(Unavailable::ApiVersion { version }));
        }
        kvm.create_vm()
            .map_err(|e| KvmError::Unavailable(Unavailable::CreateVm(e)))?;
        Ok(())
    }

    /// Creates a VM running the guest program: RAM of `config.mem_size`,
    /// `config.vcpus` vCPUs in protected mode at the program's entry.
    ///
    /// Errors: [`KvmError::Unavailable`], [`KvmError::Config`] (e.g.
    /// [`ConfigError::TooManyVcpus`]), [`KvmError::Ioctl`],
    /// [`KvmError::Memory`], [`KvmError::Vcpu`], and when a thread cannot be
    /// set up [`KvmError::VcpuThread`], [`KvmError::ThrottleTicker`],
    /// [`KvmError::KickHandler`].
    pub fn new(config: &KvmConfig) -> Result<Self, KvmError> {
        program::check_layout(config.mem_size, config.vcpus)?;
        let vm = Self::create(config.mem_size, config.vcpus, config.slot_size)?;
        program::init_guest(&vm.ram, config.vcpus, &config.workload)?;
        for i in 0..config.vcpus {
            vm.vcpus.with_fd(i, |fd| {
                vcpu::setup_protected_mode(fd, program::mailbox_addr(i))
            })??;
        }
        vm.vcpus.set_dirty_rate(config.dirty_rate);
        Ok(vm)
    }

    /// Creates an empty VM to receive a migration: zeroed RAM of
    /// `mem_size` bytes and `vcpus` vCPUs whose state must be set with
    /// [`KvmVm::restore_state`] before [`KvmVm::resume`].
    ///
    /// Errors: as [`KvmVm::new`].
    pub fn new_incoming(mem_size: u64, vcpus: usize) -> Result<Self, KvmError> {
        program::check_layout(mem_size, vcpus)?;
        Self::create(mem_size, vcpus, ram::MAX_SLOT_SIZE)
    }

    fn create(mem_size: u64, vcpus: usize, slot_size: u64) -> Result<Self, KvmError> {
        let (kvm, vm, ram) = Self::create_vm(mem_size, slot_size)?;
        Self::with_vcpus(kvm, vm, ram, vcpus)
    }

    /// A VM with RAM of `mem_size` bytes in slots of at most `slot_size`, and no vCPUs yet.
    fn create_vm(mem_size: u64, slot_size: u64) -> Result<(Kvm, VmFd, KvmRam), KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Unavailable(Unavailable::Open(e)))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| KvmError::Unavailable(Unavailable::CreateVm(e)))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(|source| KvmError::Ioctl {
                op: "KVM_SET_TSS_ADDR",
                source,
            })?;
        let ram = KvmRam::new(&vm, mem_size, slot_size)?;
        Ok((kvm, vm, ram))
    }

    /// The VM of [`create_vm`](Self::create_vm) with `vcpus` vCPUs (threads started,
    /// stopped).
    fn with_vcpus(kvm: Kvm, vm: VmFd, ram: KvmRam, vcpus: usize) -> Result<Self, KvmError> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| KvmError::Ioctl {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let supported_msrs = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let msr_list = state::SAVED_MSRS
            .iter()
            .copied()
            .filter(|m| supported_msrs.contains(m))
            .collect();
        let mut fds = Vec::with_capacity(vcpus);
        for i in 0..vcpus {
            let fd = vm.create_vcpu(i as u64).map_err(|source| KvmError::Ioctl {
                op: "KVM_CREATE_VCPU",
                source,
            })?;
            fd.set_cpuid2(&cpuid).map_err(|source| KvmError::Ioctl {
                op: "KVM_SET_CPUID2",
                source,
            })?;
            fds.push(fd);
        }
        let vcpus = VcpuSet::spawn(fds)?;
        Ok(Self {
            vcpus,
            vm,
            ram,
            msr_list,
            syncs: Mutex::new(SyncTotals::default()),
            _kvm: kvm,
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &KvmRam {
        &self.ram
    }

    /// The vCPU controller.
    pub fn vcpus(&self) -> &VcpuSet {
        &self.vcpus
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Stops every vCPU (see [`VcpuSet::stop`]).
    pub fn stop(&self) -> Result<(), KvmError> {
        self.vcpus.stop()
    }

    /// Resumes every vCPU (see [`VcpuSet::resume`]).
    pub fn resume(&self) -> Result<(), KvmError> {
        self.vcpus.resume()
    }

    /// Sets the CPU throttle in percent (0..=99).
    pub fn set_throttle(&self, percent: u32) {
        self.vcpus.set_throttle(percent);
    }

    /// Sets the target dirty rate of the whole guest (pages/s, 0 = unpaced).
    pub fn set_dirty_rate(&self, pages_per_sec: u64) {
        self.vcpus.set_dirty_rate(pages_per_sec);
    }

    /// Bitmap sync: ORs the pages dirtied since the last sync into `bitmap`
    /// and re-arms dirty logging for them (see [`KvmRam::sync_dirty_log`]).
    pub fn sync_dirty_log(&self, bitmap: &mut [u64]) -> Result<SyncTiming, KvmError> {
        let t = self.ram.sync_dirty_log(&self.vm, bitmap)?;
        let mut s = self.syncs.lock().unwrap_or_else(|p| p.into_inner());
        s.count += 1;
        s.elapsed += t.elapsed;
        s.bytes += t.bytes;
        Ok(t)
    }

    /// Totals of all syncs so far.
    pub fn sync_totals(&self) -> SyncTotals {
        *self.syncs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serialized state of every vCPU ([`state`] format). The vCPUs must be
    /// stopped.
    pub fn save_state(&self) -> Result<Vec<u8>, KvmError> {
        let mut states = Vec::with_capacity(self.vcpus.len());
        for i in 0..self.vcpus.len() {
            states.push(
                self.vcpus
                    .with_fd(i, |fd| VcpuState::save(fd, &self.msr_list))?
                    .map_err(|e| e.for_vcpu(i))?,
            );
        }
        Ok(state::encode(&states))
    }

    /// Loads a serialized state into the (stopped) vCPUs.
    ///
    /// Errors: [`KvmError::State`] for malformed bytes, [`KvmError::Config`]
    /// ([`ConfigError::VcpuCountMismatch`]) when the vCPU count differs, and KVM's errors.
    pub fn restore_state(&self, bytes: &[u8]) -> Result<(), KvmError> {
        let states = state::decode(bytes)?;
        if states.len() != self.vcpus.len() {
            return Err(KvmError::Config(ConfigError::VcpuCountMismatch {
                state: states.len(),
                vm: self.vcpus.len(),
            }));
        }
        for (i, s) in states.iter().enumerate() {
            self.vcpus
                .with_fd(i, |fd| s.restore(fd))?
                .map_err(|e| e.for_vcpu(i))?;
        }
        Ok(())
    }

    /// Each vCPU's mailbox.
    pub fn guest_status(&self) -> Result<Vec<GuestStatus>, KvmError> {
        (0..self.vcpus.len())
            .map(|i| program::status(&self.ram, i))
            .collect()
    }

    /// Sum of the vCPUs' progress counters (rounds completed).
    pub fn progress(&self) -> Result<u64, KvmError> {
        Ok(self
            .guest_status()?
            .iter()
            .map(|s| u64::from(s.progress))
            .sum())
    }

    /// The guest's own failure flags: `None` when no vCPU has flagged a
    /// mismatch, else a description of the first. This is the guest
    /// program's report on itself, shown to the user as text (the
    /// [`GuestReport::failure`] of a migrated guest); host-side failures
    /// are the `Err` ([`KvmError`]).
    pub fn guest_failure(&self) -> Result<Option<String>, KvmError> {
        for (i, s) in self.guest_status()?.iter().enumerate() {
            if s.fail != 0 {
                return Ok(Some(format!(
                    "vCPU {i} flagged failure {} (page {:#x}, sum {:#x})",
                    s.fail, s.failed_addr, s.fail_value
                )));
            }
        }
        Ok(None)
    }

    /// Full self-check: runs the vCPUs to the end of their current round
    /// and leaves them stopped there ([`VcpuSet::stop_at_round_end`]),
    /// then checks the guest's failure flags and, from the host, every
    /// region's invariants ([`program::check_region`]).
    /// Returns `None` when all hold, else what failed first.
    pub fn self_check(&self) -> Result<Option<String>, KvmError> {
        self.vcpus.stop_at_round_end()?;
        if let Some(f) = self.guest_failure()? {
            return Ok(Some(f));
        }
        for i in 0..self.vcpus.len() {
            if let Some(f) = program::check_region(&self.ram, self.vcpus.len(), i)? {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }
}
