//! Snapshots of a real KVM guest: a full snapshot and diffs taken while its vCPUs run; each
//! chain restores the guest's RAM at that snapshot (BLAKE3 digest against the stopped
//! guest) and carries its vCPU section.
#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod kvm_common;

use std::time::Duration;

use precopy_engine::kvm::{KvmConfig, KvmVm, KvmWorkload, VCPU_SECTION};
use precopy_engine::snapshot::{SnapshotOptions, Snapshotter, restore_chain};
use precopy_engine::vmdesc::{image_digest, ram_digest};
use precopy_engine::{GuestRam, VcpuControl};
use precopy_stream::Limits;

#[test]
fn kvm_guest_full_and_diff_snapshots_restore_exactly() {
    if !kvm_common::kvm_available("kvm_guest_full_and_diff_snapshots_restore_exactly") {
        return;
    }
    let vm = KvmVm::new(&KvmConfig {
        mem_size: 64 << 20,
        vcpus: 2,
        dirty_rate: 50_000,
        workload: KvmWorkload::default(),
        ..Default::default()
    })
    .unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let dir = tempfile::tempdir().unwrap();
    let mut s = Snapshotter::new(
        &vm,
        SnapshotOptions {
            resume: false,
            xbzrle_cache_bytes: 16 << 20,
        },
    )
    .unwrap();
    let full = dir.path().join("full.snap");
    s.full(&full).unwrap();
    let blocks = vm.blocks();
    let limits = Limits::default();
    let mut diffs = Vec::new();
    for i in 0..4 {
        if i > 0 {
            vm.resume().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let d = dir.path().join(format!("d{i}.diff"));
            let st = s.diff(&d).unwrap();
            assert!(st.live_pages > 0, "the guest dirtied nothing: {st:?}");
            diffs.push(d);
        }
        assert!(!vm.is_running());
        let r = restore_chain(&full, &diffs, &limits).unwrap();
        assert_eq!(
            image_digest(&r.image),
            ram_digest(&vm, &blocks).unwrap(),
            "snapshot {i}"
        );
        // The vCPU section is there, of the guest's own length (its bytes hold the TSC,
        // which moves while the guest is stopped, so they are not compared).
        let want = vm.device_states().unwrap();
        let got = r.device_states.iter().find(|d| d.0 == VCPU_SECTION);
        let want = want.iter().find(|d| d.0 == VCPU_SECTION).unwrap();
        assert!(
            got.is_some_and(|g| g.3.len() == want.3.len()),
            "vCPU section of snapshot {i} missing or of another length"
        );
    }
    vm.resume().unwrap();
}
