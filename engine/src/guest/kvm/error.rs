//! Errors of the KVM guest: [`KvmError`] and the groups it nests
//! ([`Unavailable`], [`ConfigError`], [`MemoryError`], [`VcpuError`]).

use std::io;

use super::KvmWorkload;

/// Errors of the KVM guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmError {
    /// `/dev/kvm` is missing or cannot create a VM.
    #[error("/dev/kvm is not usable: {0}")]
    Unavailable(Unavailable),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// errno from the kernel.
        source: kvm_ioctls::Error,
    },
    /// A size, count or parameter is out of range, or a received migration
    /// does not fit a KVM guest.
    #[error("invalid KVM guest configuration: {0}")]
    Config(ConfigError),
    /// Guest memory could not be mapped or an access left it.
    #[error("guest memory: {0}")]
    Memory(MemoryError),
    /// The guest program could not be assembled.
    #[error("assembling the guest program: {0}")]
    Assemble(iced_x86::IcedError),
    /// A serialized vCPU state is malformed.
    #[error("vCPU state: bad {what} at byte {offset}")]
    State {
        /// The field.
        what: &'static str,
        /// Byte offset in the serialized state.
        offset: usize,
    },
    /// A vCPU thread failed or a vCPU request was invalid.
    #[error("vCPU {index}: {error}")]
    Vcpu {
        /// vCPU index.
        index: usize,
        /// What happened.
        error: VcpuError,
    },
    /// The thread of a vCPU could not be spawned.
    #[error("vCPU {index}: spawning thread: {source}")]
    VcpuThread {
        /// vCPU index.
        index: usize,
        /// Why `std::thread::Builder::spawn` failed.
        source: io::Error,
    },
    /// The throttle ticker thread could not be spawned.
    #[error("spawning the vCPU throttle ticker: {0}")]
    ThrottleTicker(#[source] io::Error),
    /// The signal handler that kicks vCPUs out of `KVM_RUN` could not be
    /// installed.
    #[error("installing the vCPU kick signal handler: {0}")]
    KickHandler(#[source] io::Error),
    /// vCPUs did not reach the requested state in time.
    #[error("timed out waiting for the vCPUs to {0}")]
    Timeout(&'static str),
}

impl KvmError {
    /// `self` with the vCPU index set to `index` if it is a
    /// [`KvmError::Vcpu`] (built by [`super::VcpuState`], which does not
    /// know which vCPU its fd is).
    pub(crate) fn for_vcpu(self, index: usize) -> Self {
        match self {
            Self::Vcpu { error, .. } => Self::Vcpu { index, error },
            other => other,
        }
    }
}

/// Why `/dev/kvm` cannot run a VM ([`KvmError::Unavailable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// `/dev/kvm` could not be opened.
    #[error("open: {0}")]
    Open(#[source] kvm_ioctls::Error),
    /// The kernel's KVM API version is not 12.
    #[error("KVM API version {version} (12 needed)")]
    ApiVersion {
        /// `KVM_GET_API_VERSION`'s answer.
        version: i32,
    },
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
}

/// An out-of-range size, count or parameter ([`KvmError::Config`]).
/// Sizes are in bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No vCPUs requested.
    #[error("0 vCPUs; 1..={max} supported")]
    NoVcpus {
        /// Most vCPUs supported.
        max: usize,
    },
    /// More vCPUs than the guest program supports.
    #[error("{requested} vCPUs; 1..={max} supported")]
    TooManyVcpus {
        /// vCPUs requested.
        requested: usize,
        /// Most vCPUs supported.
        max: usize,
    },
    /// More RAM than the 32-bit guest program addresses.
    #[error(
        "guest RAM of {requested} bytes; the 32-bit guest program addresses at most {} GiB",
        limit >> 30
    )]
    TooMuchRam {
        /// RAM requested.
        requested: u64,
        /// Most RAM supported.
        limit: u64,
    },
    /// Too little RAM for each vCPU's data region.
    #[error(
        "guest RAM of {ram_size} bytes leaves {pages} data pages per vCPU (vCPUs: {vcpus}); \
         at least {min_pages} needed"
    )]
    TooLittleRam {
        /// RAM requested.
        ram_size: u64,
        /// vCPUs requested.
        vcpus: usize,
        /// Data pages each vCPU would get.
        pages: u64,
        /// Fewest data pages per vCPU.
        min_pages: u64,
    },
    /// The RAM size is zero or not a whole number of pages.
    #[error("guest RAM size {size} is not a positive multiple of {page_size}")]
    RamNotPageMultiple {
        /// RAM requested.
        size: u64,
        /// The page size.
        page_size: usize,
    },
    /// More RAM than one mapping of guest memory is allowed.
    #[error("guest RAM size {requested} is too large (more than {limit})")]
    RamTooLarge {
        /// RAM requested.
        requested: u64,
        /// Most RAM mapped.
        limit: u64,
    },
    /// The KVM memory slot size is zero or not a multiple of 64 pages.
    #[error("slot size {size} is not a positive multiple of {granule} (64 pages)")]
    SlotSize {
        /// Slot size requested.
        size: u64,
        /// What it must be a multiple of.
        granule: usize,
    },
    /// A workload parameter is out of range.
    #[error("workload {workload:?}: {field} is {value}; it must be {allowed}")]
    Workload {
        /// The whole workload.
        workload: KvmWorkload,
        /// The field out of range (`sweep_pages`, `stride`, ...).
        field: &'static str,
        /// Its value.
        value: u64,
        /// The values allowed, e.g. `1..=4096`.
        allowed: &'static str,
    },
    /// A saved vCPU state does not have this VM's number of vCPUs.
    #[error("state has {state} vCPUs, this VM {vm}")]
    VcpuCountMismatch {
        /// vCPUs in the state.
        state: usize,
        /// vCPUs of the VM.
        vm: usize,
    },
    /// A received migration carries no vCPU state.
    #[error("the stream has no {section:?} device section")]
    MissingVcpuSection {
        /// The device section expected ([`super::VCPU_SECTION`]).
        section: &'static str,
    },
    /// An incoming stream's RAM blocks (their names, in MEM_SIZE order; none
    /// when no MEM_SIZE came) are not a KVM guest's one block,
    /// [`super::RAM_BLOCK_NAME`].
    #[error("RAM blocks {names:?} received; a KVM guest has one, {expected:?}")]
    IncomingBlocks {
        /// The block names received.
        names: Vec<String>,
        /// The KVM guest's block ([`super::RAM_BLOCK_NAME`]).
        expected: &'static str,
    },
}

/// A failed mapping of or access to guest RAM ([`KvmError::Memory`]).
/// Offsets are guest-physical addresses, sizes bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// Guest RAM could not be mapped.
    #[error("mmap of {bytes} bytes: {source}")]
    Mmap {
        /// RAM size.
        bytes: u64,
        /// vm-memory's error.
        source: vm_memory::mmap::FromRangesError,
    },
    /// A KVM slot has no host address in the mapping.
    #[error("slot at {gpa:#x}: {source}")]
    SlotAddress {
        /// The slot's first guest-physical address.
        gpa: u64,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
    /// A read of guest RAM failed.
    #[error("read at {offset:#x}: {source}")]
    Read {
        /// Where the read started.
        offset: u64,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
    /// A write of guest RAM failed.
    #[error("write at {offset:#x}: {source}")]
    Write {
        /// Where the write started.
        offset: u64,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
    /// An access reaches past the end of guest RAM.
    #[error("range {offset:#x}+{len:#x} is outside guest RAM of {size:#x} bytes")]
    OutOfRange {
        /// Where the access starts.
        offset: u64,
        /// Its length.
        len: usize,
        /// The RAM size.
        size: u64,
    },
    /// A dirty bitmap too short for guest RAM.
    #[error("dirty bitmap of {words} words, {needed} needed")]
    ShortBitmap {
        /// Words given.
        words: usize,
        /// Words needed (one bit per page).
        needed: usize,
    },
}

/// What went wrong with one vCPU ([`KvmError::Vcpu`]).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VcpuError {
    /// No vCPU has this index.
    #[error("no such vCPU")]
    NoSuchVcpu,
    /// The request needs the vCPU stopped.
    #[error("vCPU is running; stop it first")]
    Running,
    /// `KVM_RUN` returned an exit the guest program never causes; the
    /// thread stopped.
    #[error("unexpected exit {exit}")]
    UnexpectedExit {
        /// The exit, as `kvm_ioctls::VcpuExit`'s `Debug` shows it.
        exit: String,
    },
    /// `KVM_RUN` failed; the thread stopped.
    #[error("KVM_RUN: {0}")]
    Run(#[source] kvm_ioctls::Error),
    /// The MSR list could not be built.
    #[error("MSR list: {0}")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` refused an MSR.
    #[error("KVM_SET_MSRS set {set} of {total} MSRs; MSR {msr:#x} refused")]
    MsrRefused {
        /// MSRs set.
        set: usize,
        /// MSRs given.
        total: usize,
        /// The first MSR refused.
        msr: u32,
    },
}
