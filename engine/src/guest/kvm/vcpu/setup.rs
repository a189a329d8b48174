//! The initial vCPU state: flat 32-bit protected mode at the guest program's entry.

use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;

use super::super::KvmError;
use super::super::program::{CODE_BASE, GDT_BASE, mailbox_addr};

/// Flat 32-bit protected mode: CS = 0x08 (code), data segments = 0x10,
/// GDT at [`GDT_BASE`], CR0 = PE | ET, no paging.
pub fn setup_protected_mode(vcpu: &VcpuFd, mailbox: u64) -> Result<(), KvmError> {
    let mut sregs = vcpu.get_sregs().map_err(|source| KvmError::Ioctl {
        op: "KVM_GET_SREGS",
        source,
    })?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_BASE;
    sregs.gdt.limit = 23;
    sregs.cr0 = 0x11;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(|source| KvmError::Ioctl {
        op: "KVM_SET_SREGS",
        source,
    })?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_BASE,
        rflags: 2,
        rbx: mailbox,
        rsp: 0x8000,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|source| KvmError::Ioctl {
        op: "KVM_SET_REGS",
        source,
    })
}

/// Mailbox address that vCPU `index` starts with in `EBX`.
pub fn start_mailbox(index: usize) -> u64 {
    mailbox_addr(index)
}
