//! The KVM destination's RAM target: a stream that does not fit a KVM guest is refused
//! at its MEM_SIZE record, RAM over the limit is not mapped, and a VM is built around the
//! loaded memory only with a vCPU section.
#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod kvm_common;

use precopy_engine::kvm::{ConfigError, KvmError, KvmIncomingRam, KvmVm};
use precopy_engine::{Destination, IncomingError};
use precopy_stream::{Limits, RamBlockInfo, RamTarget, StreamWriter};

/// A stream of `blocks` with one page of 7s at offset 0 of block 0, no device section.
fn stream(blocks: &[RamBlockInfo]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.write_header("pc-i440fx-7.2").unwrap();
    w.ram_setup(blocks).unwrap();
    w.begin_ram_iteration().unwrap();
    w.write_page(0, 0, &[7u8; 4096]).unwrap();
    w.end_ram_section().unwrap();
    w.begin_ram_complete().unwrap();
    w.end_ram_section().unwrap();
    w.write_eof().unwrap();
    w.finish().unwrap()
}

fn receive(
    bytes: &[u8],
    limits: Limits,
) -> Result<precopy_engine::Received<KvmIncomingRam>, IncomingError> {
    Destination::new()
        .with_verify(false)
        .receive_into(bytes, limits, KvmIncomingRam::new())
}

#[test]
fn streams_that_do_not_fit_a_kvm_guest_are_refused_at_mem_size() {
    if !kvm_common::kvm_available("streams_that_do_not_fit_a_kvm_guest_are_refused_at_mem_size") {
        return;
    }
    let two = stream(&[
        RamBlockInfo::new("pc.ram", 64 << 20),
        RamBlockInfo::new("pc.rom", 4096),
    ]);
    match receive(&two, Limits::default()) {
        Err(IncomingError::Stream {
            source: precopy_stream::Error::Target { source, .. },
            ..
        }) => {
            let e = source.downcast_ref::<KvmError>().expect("a KvmError");
            assert!(
                matches!(e, KvmError::Config(ConfigError::IncomingBlocks { names, .. }) if names == &["pc.ram", "pc.rom"]),
                "{e}"
            );
        }
        other => panic!("{:?}", other.map(|r| r.bytes)),
    }
    let big = stream(&[RamBlockInfo::new("pc.ram", 64 << 20)]);
    let small = Limits {
        max_ram_bytes: 32 << 20,
        ..Limits::default()
    };
    let e = receive(&big, small).map(|r| r.bytes).unwrap_err();
    assert!(matches!(e, IncomingError::Stream { .. }), "{e}");
}

#[test]
fn the_vm_is_built_around_the_loaded_memory() {
    if !kvm_common::kvm_available("the_vm_is_built_around_the_loaded_memory") {
        return;
    }
    let r = receive(
        &stream(&[RamBlockInfo::new("pc.ram", 64 << 20)]),
        Limits::default(),
    )
    .unwrap();
    assert_eq!(r.image.block_info(0), Some(("pc.ram", 64 << 20)));
    let mut page = [0u8; 4096];
    r.image.ram().unwrap().read(0, &mut page).unwrap();
    assert_eq!(page, [7u8; 4096]);
    let e = KvmVm::from_loaded(r.image, &r.device_states).unwrap_err();
    assert!(
        matches!(e, KvmError::Config(ConfigError::MissingVcpuSection { .. })),
        "{e}"
    );
}
