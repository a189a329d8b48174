//! vCPU state save/restore, serialized to bytes for the stream's device
//! section.
//!
//! # Format (all integers little-endian; version 1)
//!
//! ```text
//! magic   8 bytes  "PCKVMCPU"
//! version u32      1
//! count   u32      vCPUs (1..=64)
//! per vCPU, in index order:
//!   regs    u32 length (= size_of kvm_regs)        + kvm_regs bytes
//!   sregs   u32 length (= size_of kvm_sregs)       + kvm_sregs bytes
//!   fpu     u32 length (= 416)                     + kvm_fpu fields in declaration
//!           order, padding written as 0: fpr[8][16], fcw u16, fsw u16, ftwx u8,
//!           0 u8, last_opcode u16, last_ip u64, last_dp u64, xmm[16][16], mxcsr u32, 0 u32
//!   events  u32 length (= size_of kvm_vcpu_events) + kvm_vcpu_events bytes
//!   msrs    u32 count (≤ 64), then count × (u32 index, u32 reserved = 0, u64 value)
//! ```
//!
//! The structures are the Linux x86_64 KVM ABI (`linux/kvm.h`,
//! `arch/x86/include/uapi/asm/kvm.h`), as QEMU's `target/i386/kvm/kvm.c`
//! gets and puts them with `KVM_GET_REGS`/`KVM_GET_SREGS`/`KVM_GET_FPU`/
//! `KVM_GET_VCPU_EVENTS`/`KVM_GET_MSRS`.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;
use zerocopy::{FromBytes, IntoBytes};

use super::program::MAX_VCPUS;
use super::{KvmError, VcpuError};

/// Magic at the start of a serialized vCPU state.
pub const MAGIC: &[u8; 8] = b"PCKVMCPU";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
/// Most MSRs per vCPU in a state.
pub const MAX_MSRS: usize = 64;

/// MSRs saved when the host supports them: SYSENTER_CS/ESP/EIP, PAT,
/// STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, TSC_AUX, MISC_ENABLE and
/// the TSC (QEMU's `kvm_put_msrs` basic set).
pub const SAVED_MSRS: &[u32] = &[
    0x174,
    0x175,
    0x176,
    0x277,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0xc000_0103,
    0x1a0,
    0x10,
];

/// The architectural state of one vCPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VcpuState {
    /// General registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// Pending exceptions/interrupts/NMI and interrupt shadow.
    pub events: kvm_vcpu_events,
    /// `(index, value)` of the saved MSRs.
    pub msrs: Vec<(u32, u64)>,
}

impl VcpuState {
    /// Reads the state of a stopped vCPU; `msr_list` names the MSRs to save.
    ///
    /// Errors: [`KvmError::Ioctl`]; [`KvmError::Vcpu`] (index 0: this
    /// function does not know the vCPU's index) when the MSR list is too long.
    pub fn save(fd: &VcpuFd, msr_list: &[u32]) -> Result<Self, KvmError> {
        let io = |op: &'static str| move |source| KvmError::Ioctl { op, source };
        let regs = fd.get_regs().map_err(io("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(io("KVM_GET_SREGS"))?;
        let fpu = fd.get_fpu().map_err(io("KVM_GET_FPU"))?;
        let events = fd.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?;
        let entries: Vec<kvm_msr_entry> = msr_list
            .iter()
            .take(MAX_MSRS)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::Vcpu {
            index: 0,
            error: VcpuError::MsrList(e),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(io("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..n.min(entries.len())]
            .iter()
            .map(|e| (e.index, e.data))
            .collect();
        Ok(Self {
            regs,
            sregs,
            fpu,
            events,
            msrs,
        })
    }

    /// Writes this state into a vCPU (sregs first, as KVM wants the mode
    /// before the registers that depend on it).
    ///
    /// Errors: [`KvmError::Ioctl`]; [`KvmError::Vcpu`] (index 0: this function
    /// does not know the vCPU's index) when KVM refuses an MSR.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), KvmError> {
        let io = |op: &'static str| move |source| KvmError::Ioctl { op, source };
        fd.set_sregs(&self.sregs).map_err(io("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(io("KVM_SET_REGS"))?;
        fd.set_fpu(&self.fpu).map_err(io("KVM_SET_FPU"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(io("KVM_SET_VCPU_EVENTS"))?;
        if !self.msrs.is_empty() {
            let entries: Vec<kvm_msr_entry> = self
                .msrs
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::Vcpu {
                index: 0,
                error: VcpuError::MsrList(e),
            })?;
            let n = fd.set_msrs(&msrs).map_err(io("KVM_SET_MSRS"))?;
            if n != entries.len() {
                return Err(KvmError::Vcpu {
                    index: 0,
                    error: VcpuError::MsrRefused {
                        set: n,
                        total: entries.len(),
                        msr: entries[n].index,
                    },
                });
            }
        }
        Ok(())
    }
}

/// Serializes the states of all vCPUs (see the module docs for the format).
pub fn encode(states: &[VcpuState]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + states.len() * 2048);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(states.len() as u32).to_le_bytes());
    for s in states {
        put_struct(&mut out, s.regs.as_bytes());
        put_struct(&mut out, s.sregs.as_bytes());
        put_struct(&mut out, &fpu_bytes(&s.fpu));
        put_struct(&mut out, s.events.as_bytes());
        out.extend_from_slice(&(s.msrs.len() as u32).to_le_bytes());
        for &(index, value) in &s.msrs {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
    out
}

/// Size of the serialized `kvm_fpu`.
const FPU_LEN: usize = 416;

fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(FPU_LEN);
    for r in &f.fpr {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(0);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

fn fpu_from(c: &mut Cursor<'_>) -> Result<kvm_fpu, KvmError> {
    let at = c.pos;
    if c.u32("kvm_fpu")? as usize != FPU_LEN {
        return Err(KvmError::State {
            what: "kvm_fpu",
            offset: at,
        });
    }
    let mut f = kvm_fpu::default();
    for r in &mut f.fpr {
        r.copy_from_slice(c.take(16, "kvm_fpu")?);
    }
    f.fcw = c.u16("kvm_fpu")?;
    f.fsw = c.u16("kvm_fpu")?;
    f.ftwx = c.take(1, "kvm_fpu")?[0];
    c.take(1, "kvm_fpu")?;
    f.last_opcode = c.u16("kvm_fpu")?;
    f.last_ip = c.u64("kvm_fpu")?;
    f.last_dp = c.u64("kvm_fpu")?;
    for r in &mut f.xmm {
        r.copy_from_slice(c.take(16, "kvm_fpu")?);
    }
    f.mxcsr = c.u32("kvm_fpu")?;
    c.u32("kvm_fpu")?;
    Ok(f)
}

fn put_struct(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], KvmError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(KvmError::State {
                what,
                offset: self.pos,
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, KvmError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, KvmError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, KvmError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn structure<T: FromBytes>(&mut self, what: &'static str) -> Result<T, KvmError> {
        let at = self.pos;
        let len = self.u32(what)? as usize;
        if len != size_of::<T>() {
            return Err(KvmError::State { what, offset: at });
        }
        let b = self.take(len, what)?;
        T::read_from_bytes(b).map_err(|_| KvmError::State { what, offset: at })
    }
}

/// Parses a serialized vCPU state list.
///
/// Errors: [`KvmError::State`] naming the field and its byte offset when the
/// magic, version, a count, or a structure length is wrong, the input is
/// short, or bytes are left over.
pub fn decode(data: &[u8]) -> Result<Vec<VcpuState>, KvmError> {
    let mut c = Cursor { data, pos: 0 };
    if c.take(8, "magic")? != MAGIC {
        return Err(KvmError::State {
            what: "magic",
            offset: 0,
        });
    }
    if c.u32("version")? != VERSION {
        return Err(KvmError::State {
            what: "version",
            offset: 8,
        });
    }
    let count = c.u32("vCPU count")? as usize;
    if count == 0 || count > MAX_VCPUS {
        return Err(KvmError::State {
            what: "vCPU count",
            offset: 12,
        });
    }
    let mut states = Vec::with_capacity(count);
    for _ in 0..count {
        let regs = c.structure::<kvm_regs>("kvm_regs")?;
        let sregs = c.structure::<kvm_sregs>("kvm_sregs")?;
        let fpu = fpu_from(&mut c)?;
        let events = c.structure::<kvm_vcpu_events>("kvm_vcpu_events")?;
        let at = c.pos;
        let n = c.u32("MSR count")? as usize;
        if n > MAX_MSRS {
            return Err(KvmError::State {
                what: "MSR count",
                offset: at,
            });
        }
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            let index = c.u32("MSR index")?;
            let at = c.pos;
            if c.u32("MSR reserved")? != 0 {
                return Err(KvmError::State {
                    what: "MSR reserved",
                    offset: at,
                });
            }
            msrs.push((index, c.u64("MSR value")?));
        }
        states.push(VcpuState {
            regs,
            sregs,
            fpu,
            events,
            msrs,
        });
    }
    if c.pos != data.len() {
        return Err(KvmError::State {
            what: "trailing bytes",
            offset: c.pos,
        });
    }
    Ok(states)
}
