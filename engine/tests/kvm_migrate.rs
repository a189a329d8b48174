//! A real KVM guest migrated by the engine over loopback TCP: RAM equal at
//! switchover, vCPU state carried in a device section, the guest resumed on
//! a new VM and still correct; auto-converge against real vCPUs; cancel and
//! a dying destination leave the source guest running.
#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

mod kvm_common;

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use precopy_engine::kvm::{
    KvmConfig, KvmIncomingRam, KvmVm, KvmWorkload, SelfCheck, VCPU_SECTION, program,
};
use precopy_engine::{
    Capabilities, Destination, IncomingListener, MigrationInfo, MigrationStatus, Migrator,
    ParameterUpdate, Received, Throttle,
};
use precopy_stream::{Limits, RamTarget};

fn guest(mem_mib: u64, vcpus: usize, dirty_rate: u64) -> Arc<KvmVm> {
    let vm = KvmVm::new(&KvmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        dirty_rate,
        workload: KvmWorkload::default(),
        ..Default::default()
    })
    .unwrap();
    vm.resume().unwrap();
    // Warm up until the counter sweep has touched every data page, so RAM is
    // not still mostly zero pages (which would make any migration easy).
    let (_, pages) = program::region(vm.ram().size(), vcpus, 0);
    let rounds = pages.div_ceil(u64::from(KvmWorkload::default().sweep_pages)) + 16;
    let t0 = Instant::now();
    while vm
        .guest_status()
        .unwrap()
        .iter()
        .any(|s| u64::from(s.progress) < rounds)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "guest too slow to warm up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Arc::new(vm)
}

fn migrator(vm: &Arc<KvmVm>, xbzrle: bool, auto_converge: bool, u: ParameterUpdate) -> Migrator {
    let m = Migrator::new(vm.clone());
    m.set_capabilities(Capabilities {
        xbzrle,
        auto_converge,
        ..Default::default()
    })
    .unwrap();
    m.set_parameters(&u).unwrap();
    m
}

/// Runs a migration to a destination on loopback TCP that loads straight into KVM guest
/// memory.
fn migrate(m: &Migrator) -> (MigrationInfo, Option<Received<KvmIncomingRam>>) {
    let l = IncomingListener::bind("tcp:127.0.0.1:0").unwrap();
    let uri = l.local_uri();
    let dest = Destination::new();
    let t = std::thread::spawn(move || {
        dest.accept_and_receive_into(l, Limits::default(), KvmIncomingRam::new())
    });
    m.start(&uri).unwrap();
    let info = m.wait().unwrap();
    let r = t.join().unwrap();
    if let Err(e) = &r {
        eprintln!("destination: {e}");
    }
    (info, r.ok())
}

/// Progress must keep increasing: the guest runs.
fn assert_running(vm: &KvmVm, what: &str) {
    let p0 = vm.progress().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let p1 = vm.progress().unwrap();
    assert!(p1 > p0, "{what}: guest progress stuck at {p0}");
}

/// Stops the guest briefly to run the host-side check, then resumes it.
fn assert_self_check(vm: &KvmVm, what: &str) {
    vm.stop().unwrap();
    assert_eq!(vm.self_check().unwrap(), None, "{what}");
    vm.resume().unwrap();
}

#[test]
fn kvm_guest_migrates_over_tcp_and_resumes() {
    if !kvm_common::kvm_available("kvm_guest_migrates_over_tcp_and_resumes") {
        return;
    }
    migrates_and_resumes(None);
}

/// The same with multifd: 2 page channels, XBZRLE on each, loaded straight into the new
/// VM's memory by two channel threads.
#[test]
fn kvm_guest_migrates_over_two_multifd_channels_and_resumes() {
    if !kvm_common::kvm_available("kvm_guest_migrates_over_two_multifd_channels_and_resumes") {
        return;
    }
    migrates_and_resumes(Some(2));
}

/// Migrate a running 2-vCPU guest (with `multifd_channels` page channels when given),
/// compare RAM at switchover, resume it on a new VM and let its self-check run.
fn migrates_and_resumes(multifd_channels: Option<u16>) {
    let src = guest(64, 2, 20_000);
    std::thread::sleep(Duration::from_millis(300));
    let m = migrator(
        &src,
        true,
        true,
        ParameterUpdate {
            max_bandwidth: Some(256 << 20),
            downtime_limit: Some(300),
            multifd_channels,
            ..Default::default()
        },
    );
    if multifd_channels.is_some() {
        m.set_capabilities(Capabilities {
            xbzrle: true,
            auto_converge: true,
            multifd: true,
            ..Default::default()
        })
        .unwrap();
    }
    let (info, received) = migrate(&m);
    if let Some(n) = multifd_channels {
        let r = received.as_ref().expect("destination verified the stream");
        assert_eq!(r.multifd_channels, n);
        assert!(info.ram.as_ref().unwrap().multifd_bytes > 0);
    }
    eprintln!("{}", serde_json::to_string(&info).unwrap());
    assert_eq!(
        info.status,
        MigrationStatus::Completed,
        "{:?}",
        info.error_desc
    );
    let r = received.expect("destination verified the stream");

    // Switchover left the source stopped: its RAM is what was sent.
    assert!(src.vcpus().is_stopped());
    assert_eq!(r.image.block_info(0), Some(("pc.ram", src.ram().size())));
    let parts = r.image.block_parts(0);
    let mut page = [0u8; 4096];
    for (p, d) in parts.iter().flat_map(|b| b.chunks_exact(4096)).enumerate() {
        src.ram().read(p as u64 * 4096, &mut page).unwrap();
        assert!(page[..] == d[..], "page {p} differs at switchover");
    }
    let at_switchover = src.progress().unwrap();

    // The vCPU state came as our device section.
    assert!(r.device_states.iter().any(|d| d.name == VCPU_SECTION));
    let dst = KvmVm::from_loaded(r.image, &r.device_states).unwrap();
    assert_eq!(dst.vcpu_count(), 2);
    assert_eq!(dst.progress().unwrap(), at_switchover);

    let report = dst.resume_and_report(Duration::from_secs(1)).unwrap();
    eprintln!("destination guest: {report:?}");
    assert_eq!(report.progress_before, at_switchover);
    assert!(
        report.progress_after > report.progress_before,
        "the resumed guest makes progress within a second: {report:?}"
    );
    assert_eq!(report.self_check, SelfCheck::Ok, "{report:?}");

    // Several seconds later the guest's own checks are still clean, and it
    // completed full scans of its data since resuming.
    let scans: u32 = dst.guest_status().unwrap().iter().map(|s| s.scans).sum();
    std::thread::sleep(Duration::from_secs(3));
    let t0 = Instant::now();
    while dst
        .guest_status()
        .unwrap()
        .iter()
        .map(|s| s.scans)
        .sum::<u32>()
        <= scans
    {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no full scan since resuming"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(dst.guest_failure().unwrap(), None);
    assert_self_check(&dst, "destination after 4 s");
}

/// Samples (seconds since start, progress, throttle %) every 100 ms until `stop`.
fn sample(vm: Arc<KvmVm>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(f64, u64, u8)>> {
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut v = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            if let Ok(p) = vm.progress() {
                v.push((t0.elapsed().as_secs_f64(), p, vm.throttle()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        v
    })
}

/// Progress per second over the sample intervals whose throttle satisfies `f`.
fn rate_where(s: &[(f64, u64, u8)], f: impl Fn(u8) -> bool) -> Option<f64> {
    let (mut dt, mut dp) = (0.0, 0u64);
    for w in s.windows(2) {
        if f(w[0].2) && f(w[1].2) && w[1].1 >= w[0].1 {
            dt += w[1].0 - w[0].0;
            dp += w[1].1 - w[0].1;
        }
    }
    (dt > 0.3).then(|| dp as f64 / dt)
}

#[test]
fn auto_converge_makes_a_kvm_guest_converge() {
    if !kvm_common::kvm_available("auto_converge_makes_a_kvm_guest_converge") {
        return;
    }
    // 16 MiB rewritten as fast as the vCPU runs (the counter sweep covers
    // every page in well under a second) against 8 MiB/s without XBZRLE:
    // every pass finds nearly all of RAM dirty again.
    let params = ParameterUpdate {
        max_bandwidth: Some(8 << 20),
        downtime_limit: Some(300),
        cpu_throttle_initial: Some(80),
        cpu_throttle_increment: Some(19),
        ..Default::default()
    };

    let src = guest(16, 1, 0);
    let m = migrator(&src, false, false, params.clone());
    m.set_pass_limit(Some(5));
    let (info, _) = migrate(&m);
    assert_eq!(
        info.status,
        MigrationStatus::Failed,
        "no convergence without auto-converge"
    );
    assert_running(&src, "after the failed migration");

    let m = migrator(&src, false, true, params);
    m.set_pass_limit(Some(40));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(src.clone(), stop.clone());
    let (info, r) = migrate(&m);
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().unwrap();
    eprintln!("{}", serde_json::to_string(&info).unwrap());
    assert_eq!(
        info.status,
        MigrationStatus::Completed,
        "{:?}",
        info.error_desc
    );
    assert!(r.is_some());
    let peak = samples.iter().map(|s| s.2).max().unwrap_or(0);
    assert!(
        peak >= 80,
        "auto-converge throttled the guest: peak {peak} %"
    );
    let free = rate_where(&samples, |t| t == 0).expect("samples before the throttle");
    let throttled = rate_where(&samples, |t| t >= 80).expect("samples at ≥ 80 %");
    eprintln!("guest rounds/s: unthrottled {free:.0}, at ≥ 80 % throttle {throttled:.0}");
    assert!(
        throttled < free * 0.5,
        "the throttle shows in the guest's progress rate: {free:.0} → {throttled:.0}"
    );
}

#[test]
fn cancel_and_destination_failure_leave_the_kvm_guest_running() {
    if !kvm_common::kvm_available("cancel_and_destination_failure_leave_the_kvm_guest_running") {
        return;
    }
    let src = guest(32, 1, 20_000);
    let slow = ParameterUpdate {
        max_bandwidth: Some(4 << 20),
        ..Default::default()
    };

    // Cancel while active.
    let m = migrator(&src, true, true, slow.clone());
    let l = IncomingListener::bind("tcp:127.0.0.1:0").unwrap();
    let uri = l.local_uri();
    let dest = Destination::new();
    let t = std::thread::spawn(move || dest.accept_and_receive(l, Limits::default()));
    m.start(&uri).unwrap();
    m.wait_for_status(MigrationStatus::Active, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    m.cancel();
    let info = m.wait().unwrap();
    assert_eq!(info.status, MigrationStatus::Cancelled);
    assert!(
        t.join().unwrap().is_err(),
        "the destination saw the stream end early"
    );
    assert_running(&src, "after cancel");
    assert_eq!(src.throttle(), 0, "throttle lifted");
    assert_self_check(&src, "after cancel");

    // The destination dies after 1 MiB.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let killer = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let _ = c.read_exact(&mut buf);
    });
    let m = migrator(&src, true, true, slow);
    m.start(&format!("tcp:127.0.0.1:{port}")).unwrap();
    killer.join().unwrap();
    let info = m.wait().unwrap();
    assert_eq!(info.status, MigrationStatus::Failed);
    assert_running(&src, "after the destination died");
    assert_self_check(&src, "after the destination died");

    // And the engine can migrate the same guest again.
    let m = migrator(
        &src,
        true,
        true,
        ParameterUpdate {
            max_bandwidth: Some(256 << 20),
            ..Default::default()
        },
    );
    let (info, r) = migrate(&m);
    assert_eq!(
        info.status,
        MigrationStatus::Completed,
        "{:?}",
        info.error_desc
    );
    assert!(r.is_some());
}
