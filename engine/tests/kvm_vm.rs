//! The KVM guest on its own: the program runs and keeps its invariants,
//! stop/resume, throttle, state save/restore, and an exact dirty log.
#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod kvm_common;

use std::time::{Duration, Instant};

use precopy_engine::kvm::{KvmConfig, KvmVm, KvmWorkload, program, state};
use xbzrle::PAGE_SIZE;

fn small(mem_mib: u64, vcpus: usize) -> KvmConfig {
    KvmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        ..Default::default()
    }
}

#[test]
fn guest_runs_and_self_checks() {
    if !kvm_common::kvm_available("guest_runs_and_self_checks") {
        return;
    }
    let vm = KvmVm::new(&small(16, 2)).unwrap();
    assert_eq!(vm.progress().unwrap(), 0);
    vm.resume().unwrap();
    // Wait (up to 20 s on a slow nested host) for every vCPU's first full scan.
    let t0 = Instant::now();
    while vm.guest_status().unwrap().iter().any(|s| s.scans == 0)
        && t0.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.stop().unwrap();
    let st = vm.guest_status().unwrap();
    eprintln!("status after {:?}: {st:?}", t0.elapsed());
    for s in &st {
        assert!(s.progress > 0, "every vCPU made progress: {st:?}");
        assert!(s.scans > 0, "every vCPU completed a full scan: {st:?}");
    }
    assert_eq!(vm.self_check().unwrap(), None);
    // The counter sweep has visited (nearly) every data page by now; only
    // pages zeroed since its last visit may be zero.
    let mut page = [0u8; PAGE_SIZE];
    let (mut zero, mut data_pages) = (0, 0);
    for i in 0..2 {
        let (base, pages) = program::region(vm.ram().size(), 2, i);
        data_pages += pages;
        for p in 0..pages {
            vm.ram()
                .read(base + p * PAGE_SIZE as u64, &mut page)
                .unwrap();
            zero += u64::from(page.iter().all(|b| *b == 0));
        }
    }
    assert!(
        zero * 20 < data_pages,
        "{zero} of {data_pages} data pages still zero"
    );
    // Stopped means stopped: progress does not move.
    let p = vm.progress().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.progress().unwrap(), p);
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(vm.progress().unwrap() > p);
}

#[test]
fn dirty_log_is_exact() {
    if !kvm_common::kvm_available("dirty_log_is_exact") {
        return;
    }
    // Four 8 MiB slots, so the bitmap is stitched from several slot logs.
    let vm = KvmVm::new(&KvmConfig {
        slot_size: 8 << 20,
        ..small(32, 1)
    })
    .unwrap();
    assert_eq!(vm.ram().slot_count(), 4);
    eprintln!("manual dirty-log protect: {}", vm.ram().manual_protect());
    let words = vm.ram().bitmap_words();
    let size = vm.ram().size() as usize;
    let mut bitmap = vec![0u64; words];
    vm.sync_dirty_log(&mut bitmap).unwrap();
    let mut before = vec![0u8; size];
    for round in 0..4 {
        vm.ram().read(0, &mut before).unwrap();
        bitmap.fill(0);
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        vm.stop().unwrap();
        let t = vm.sync_dirty_log(&mut bitmap).unwrap();
        let mut after = vec![0u8; size];
        vm.ram().read(0, &mut after).unwrap();
        let mut changed = 0;
        for p in 0..size / PAGE_SIZE {
            let r = p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
            if before[r.clone()] != after[r] {
                changed += 1;
                assert!(
                    bitmap[p / 64] >> (p % 64) & 1 == 1,
                    "round {round}: page {p} changed but the dirty log missed it"
                );
            }
        }
        assert!(
            changed > 10,
            "round {round}: the guest wrote {changed} pages"
        );
        eprintln!(
            "round {round}: {changed} pages changed, {} reported, sync {:?}",
            t.dirty_pages, t.elapsed
        );
        // A second sync right away reports nothing: the log was cleared.
        let mut again = vec![0u64; words];
        vm.sync_dirty_log(&mut again).unwrap();
        assert!(again.iter().all(|w| *w == 0), "log cleared by the sync");
    }
}

#[test]
fn throttle_slows_the_guest() {
    if !kvm_common::kvm_available("throttle_slows_the_guest") {
        return;
    }
    let vm = KvmVm::new(&small(16, 1)).unwrap();
    let rate = |vm: &KvmVm| {
        let p0 = vm.progress().unwrap();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(800));
        (vm.progress().unwrap() - p0) as f64 / t0.elapsed().as_secs_f64()
    };
    vm.resume().unwrap();
    let free = rate(&vm);
    vm.set_throttle(75);
    let throttled = rate(&vm);
    vm.set_throttle(0);
    let again = rate(&vm);
    eprintln!("rounds/s: free {free:.0}, 75% throttle {throttled:.0}, free again {again:.0}");
    assert!(
        throttled < free * 0.6,
        "a 75 % throttle leaves about a quarter of the rate"
    );
    assert!(
        again > throttled * 1.5,
        "the rate recovers when the throttle is lifted"
    );
}

#[test]
fn state_roundtrip_resumes_on_a_new_vm() {
    if !kvm_common::kvm_available("state_roundtrip_resumes_on_a_new_vm") {
        return;
    }
    let vm = KvmVm::new(&small(8, 2)).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vm.stop().unwrap();
    let state = vm.save_state().unwrap();
    let before = vm.progress().unwrap();
    // Copy RAM to a fresh VM and resume it there.
    let dst = KvmVm::new_incoming(vm.ram().size(), 2).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..vm.ram().size()).step_by(buf.len()) {
        vm.ram().read(off, &mut buf).unwrap();
        dst.ram().write(off, &buf).unwrap();
    }
    dst.restore_state(&state).unwrap();
    // Everything reads back identically but the TSC, which kept counting.
    let strip = |b: &[u8]| {
        let mut v = state::decode(b).unwrap();
        for s in &mut v {
            s.msrs.retain(|m| m.0 != 0x10);
        }
        v
    };
    assert_eq!(strip(&dst.save_state().unwrap()), strip(&state));
    dst.resume().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    dst.stop().unwrap();
    assert!(dst.progress().unwrap() > before);
    assert_eq!(dst.self_check().unwrap(), None);
    // Malformed states are typed errors, never panics.
    for cut in [0, 7, 12, 16, state.len() - 1] {
        assert!(dst.restore_state(&state[..cut]).is_err());
    }
    let mut bad = state.clone();
    bad[0] ^= 1;
    assert!(dst.restore_state(&bad).is_err());
}

#[test]
fn bad_configurations_are_typed_errors() {
    if !kvm_common::kvm_available("bad_configurations_are_typed_errors") {
        return;
    }
    use precopy_engine::kvm::{ConfigError as C, KvmError};
    type Check = fn(&C) -> bool;
    let cases: [(KvmConfig, Check); 6] = [
        (small(1, 1), |c| {
            matches!(c, C::TooLittleRam { ram_size, vcpus: 1, pages: 0, min_pages: 64 }
                if *ram_size == 1 << 20)
        }),
        (small(16, 0), |c| matches!(c, C::NoVcpus { max: 64 })),
        (small(16, 65), |c| {
            matches!(
                c,
                C::TooManyVcpus {
                    requested: 65,
                    max: 64
                }
            )
        }),
        (
            small(4 << 10, 1),
            |c| matches!(c, C::TooMuchRam { requested, limit: 0xC000_0000 } if *requested == 4 << 30),
        ),
        (
            KvmConfig {
                mem_size: (16 << 20) + 1,
                ..small(16, 1)
            },
            |c| matches!(c, C::RamNotPageMultiple { size, page_size: 4096 } if *size == (16 << 20) + 1),
        ),
        (
            KvmConfig {
                slot_size: 4096,
                ..small(16, 1)
            },
            |c| matches!(c, C::SlotSize { size: 4096, granule } if *granule == 64 * PAGE_SIZE),
        ),
    ];
    for (cfg, check) in cases {
        let e = KvmVm::new(&cfg).unwrap_err();
        assert!(
            matches!(&e, KvmError::Config(c) if check(c)),
            "{cfg:?}: {e}"
        );
    }
}

#[test]
fn hot_set_confines_the_counter_sweep() {
    if !kvm_common::kvm_available("hot_set_confines_the_counter_sweep") {
        return;
    }
    let vm = KvmVm::new(&KvmConfig {
        workload: KvmWorkload {
            hot_percent: 10,
            prefill_percent: 0,
            ..KvmWorkload::default()
        },
        ..small(16, 1)
    })
    .unwrap();
    let (base, pages) = program::region(vm.ram().size(), 1, 0);
    let hot = pages / 10;
    vm.resume().unwrap();
    let t0 = Instant::now();
    while vm.progress().unwrap() < 3 * hot / 32 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.stop().unwrap();
    let rounds = vm.progress().unwrap();
    let mut w = [0u8; 4];
    let (mut in_hot, mut outside) = (0, 0);
    for p in 0..pages {
        vm.ram().read(base + p * PAGE_SIZE as u64, &mut w).unwrap();
        if w != [0; 4] {
            if p < hot { in_hot += 1 } else { outside += 1 }
        }
    }
    // Every hot page was incremented (bar the few zeroed since); outside the
    // hot set only the whole-page rewrites (one per 32 rounds) set word 0.
    assert!(
        in_hot * 10 >= hot * 9,
        "{in_hot} of {hot} hot pages counted"
    );
    assert!(
        outside <= rounds / 32 + 1,
        "{outside} pages outside the hot set after {rounds} rounds"
    );
}

/// Pure (no KVM needed): a serialized state survives a roundtrip, and every
/// truncation or corrupted header is a typed error, never a panic.
#[test]
fn state_format_rejects_malformed_input() {
    let mut s = state::VcpuState::default();
    s.regs.rip = 0x10000;
    s.regs.rbx = 0x1040;
    s.fpu.fcw = 0x37f;
    s.fpu.xmm[3][7] = 0xaa;
    s.msrs = vec![(0x174, 8), (0x10, 123_456)];
    let bytes = state::encode(&[s.clone(), s.clone()]);
    assert_eq!(state::decode(&bytes).unwrap(), vec![s.clone(), s]);
    for cut in 0..bytes.len() {
        assert!(state::decode(&bytes[..cut]).is_err(), "truncated at {cut}");
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(state::decode(&long).is_err(), "trailing byte");
    // Corrupt each byte of the header and of the first length fields.
    for i in 0..40 {
        let mut b = bytes.clone();
        b[i] ^= 0x80;
        if let Ok(v) = state::decode(&b) {
            // Only bytes inside a structure may decode (to other values).
            assert_eq!(v.len(), 2, "byte {i}");
        }
    }
}
