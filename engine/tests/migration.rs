//! End-to-end migrations over real loopback TCP: correctness for every workload, the
//! per-page XBZRLE rules on the wire, writes racing the copy-out, cancel and destination
//! failure, convergence with auto-converge, stats, the control API, and every transport.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use precopy_engine::{
    Capabilities, Destination, GuestRam, Hooked, MigrateError, MigrationStatus, Migrator,
    ParameterUpdate, SimConfig, SimGuest, SimWorkload, StateChange, Throttle, VcpuControl,
};
use precopy_stream::{Decoder, Item, Limits, RamRecord};
use xbzrle::PAGE_SIZE;

fn quick(m: &Migrator) {
    set(
        m,
        ParameterUpdate {
            max_bandwidth: Some(32 << 20),
            downtime_limit: Some(30),
            ..Default::default()
        },
    );
    m.set_pass_limit(Some(500));
}

#[test]
fn destination_equals_source_for_each_workload_with_and_without_xbzrle() {
    for (i, w) in SimWorkload::ALL.into_iter().enumerate() {
        for xbzrle in [true, false] {
            let g = sim(w, 4, 3000, i as u64);
            let m = migrator(g.clone(), xbzrle, true);
            quick(&m);
            let (info, r) = migrate(&m);
            completed(&info);
            let r = r.unwrap_or_else(|e| panic!("{w} xbzrle={xbzrle}: {e}"));
            assert_same(&g, &r);
            // Stats: every page sent is exactly one of zero / normal / xbzrle, and the
            // destination saw exactly those records; transferred = bytes on the wire.
            let ram = info.ram.as_ref().unwrap();
            let xp = info.xbzrle_cache.as_ref().map_or(0, |x| x.pages);
            assert_eq!(ram.duplicate, r.stats.zero.count, "{w}");
            assert_eq!(ram.normal, r.stats.page.count, "{w}");
            assert_eq!(xp, r.stats.xbzrle.count, "{w}");
            assert_eq!(ram.transferred, r.bytes, "{w}");
            assert_eq!(ram.normal_bytes, ram.normal * PAGE_SIZE as u64);
            let pages = ram.total / PAGE_SIZE as u64;
            assert!(
                ram.duplicate + ram.normal + xp >= pages,
                "{w}: first pass sends all"
            );
            if let Some(x) = &info.xbzrle_cache {
                assert_eq!(x.bytes, r.stats.xbzrle.bytes, "{w}");
                // Misses and overflows are sent whole.
                assert!(x.cache_miss + x.overflow <= ram.normal, "{w}");
            } else {
                assert!(!xbzrle);
            }
            assert_eq!(info.status, MigrationStatus::Completed);
            assert!(info.downtime.is_some());
            assert!(ram.dirty_sync_count >= 2);
        }
    }
}

type ReadHook = Box<dyn Fn(&SimGuest, usize, u64) + Send + Sync>;

/// A hooked guest that records every throttle the engine sets.
fn recording_throttles(g: Arc<SimGuest>) -> (Arc<Hooked<SimGuest>>, Arc<Mutex<Vec<u8>>>) {
    let throttles = Arc::new(Mutex::new(Vec::new()));
    let t = throttles.clone();
    let h = Hooked::new(g).on_set_throttle(move |_, p| t.lock().unwrap().push(p));
    (Arc::new(h), throttles)
}

fn idle_guest(pages: u64) -> Arc<SimGuest> {
    Arc::new(
        SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), pages * PAGE_SIZE as u64)],
            workload: SimWorkload::Sparse,
            dirty_rate: 0,
            vcpus: 1,
            seed: 7,
            initial_zero_percent: 50,
        })
        .unwrap(),
    )
}

/// A TCP "destination" that keeps every byte, so a test can look at the records.
fn recording_destination() -> (String, std::thread::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    });
    (uri, t)
}

/// (kind, delta) of every record of page `offset` in block 0.
fn records_of(stream: &[u8], offset: u64) -> Vec<(&'static str, Vec<u8>)> {
    let mut d = Decoder::new(Limits::default());
    let mut pos = 0;
    let mut out = Vec::new();
    while let Some((item, n)) = d.decode(&stream[pos..]).unwrap() {
        if let Item::Ram(r) = item {
            match r {
                RamRecord::Zero {
                    block: 0,
                    offset: o,
                    ..
                } if o == offset => out.push(("zero", vec![])),
                RamRecord::Page {
                    block: 0,
                    offset: o,
                    ..
                } if o == offset => out.push(("page", vec![])),
                RamRecord::Xbzrle {
                    block: 0,
                    offset: o,
                    delta,
                    ..
                } if o == offset => out.push(("xbzrle", delta.to_vec())),
                _ => {}
            }
        }
        pos += n;
        if pos == stream.len() {
            break;
        }
    }
    out
}

#[test]
fn zero_page_after_cached_page_then_one_byte_change_is_a_3_byte_delta() {
    const P: u64 = 5;
    let inner = idle_guest(64);
    // Sync 1 is setup, sync 2 ends the first (bulk) pass.
    let h = Hooked::new(inner.clone()).on_sync(|g, n| {
        let mut page = [0u8; PAGE_SIZE];
        match n {
            2 => {
                // P becomes random data: sent whole and cached (cache miss).
                for (i, b) in page.iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(31).wrapping_add(17) | 1;
                }
                g.write_page(0, P, &page).unwrap();
            }
            3 => g.write_page(0, P, &page).unwrap(), // becomes zero: ZERO
            4 => {
                page[100] = 7; // one byte at offset 100
                g.write_page(0, P, &page).unwrap();
            }
            _ => {}
        }
    });
    let m = Migrator::new(Arc::new(h));
    m.set_capabilities(Capabilities {
        xbzrle: true,
        ..Default::default()
    })
    .unwrap();
    // downtime-limit 0: switch over only when nothing is dirty.
    set(
        &m,
        ParameterUpdate {
            downtime_limit: Some(0),
            max_bandwidth: Some(0),
            ..Default::default()
        },
    );
    let (uri, t) = recording_destination();
    m.start(&uri).unwrap();
    let info = m.wait().unwrap();
    completed(&info);
    let stream = t.join().unwrap();
    let recs = records_of(&stream, P * PAGE_SIZE as u64);
    let kinds: Vec<_> = recs.iter().map(|r| r.0).collect();
    assert_eq!(kinds, ["page", "page", "zero", "xbzrle"], "{recs:?}");
    assert_eq!(recs[3].1, [0x64, 0x01, 0x07]);
    // And the destination is right.
    let r = Destination::new()
        .receive(&stream[..], Limits::default())
        .unwrap();
    assert_same(&inner, &r);
    let x = info.xbzrle_cache.unwrap();
    assert_eq!(x.pages, 1);
    assert_eq!(x.cache_miss, 1);
}

/// Every 7th copy-out, the "guest" rewrites the page right after the engine copied it.
fn racing_writes() -> ReadHook {
    let n = AtomicU64::new(0);
    Box::new(move |g, block, page| {
        if g.is_running() && n.fetch_add(1, Ordering::Relaxed).is_multiple_of(7) {
            let mut p = [0u8; PAGE_SIZE];
            g.read_page(block, page, &mut p).unwrap();
            p[(page as usize * 8) % PAGE_SIZE] ^= 0x5a;
            p[4000] = p[4000].wrapping_add(1);
            g.write_page(block, page, &p).unwrap();
        }
    })
}

#[test]
fn guest_writes_between_copy_out_and_send_still_end_equal() {
    let inner = sim(SimWorkload::Sparse, 2, 2000, 3);
    for xbzrle in [true, false] {
        let h = Hooked::new(inner.clone()).on_read(racing_writes());
        let m = Migrator::new(Arc::new(h));
        m.set_capabilities(Capabilities {
            xbzrle,
            auto_converge: true,
            ..Default::default()
        })
        .unwrap();
        quick(&m);
        let (info, r) = migrate(&m);
        completed(&info);
        assert_same(&inner, &r.unwrap());
        inner.resume().unwrap();
    }
}

fn assert_restored(g: &SimGuest, before: &[Vec<u8>]) {
    assert!(g.is_running(), "source guest must run again");
    assert_eq!(g.throttle(), 0, "throttle must be off");
    assert!(g.snapshot() == before, "source memory must be untouched");
}

fn second_migration_succeeds(m: &Migrator, g: &SimGuest) {
    set(
        m,
        ParameterUpdate {
            max_bandwidth: Some(0),
            ..Default::default()
        },
    );
    let (info, r) = migrate(m);
    completed(&info);
    assert_same(g, &r.unwrap());
}

#[test]
fn cancel_in_setup_leaves_source_running_and_a_new_migration_works() {
    let g = idle_guest(256);
    let before = g.snapshot();
    let h = Hooked::new(g.clone()).on_log_start(|_| std::thread::sleep(Duration::from_millis(300)));
    let m = Migrator::new(Arc::new(h));
    let events = m.subscribe();
    let d = destination();
    m.start(&d.uri).unwrap();
    assert_eq!(m.status(), MigrationStatus::Setup);
    m.cancel();
    let info = m.wait().unwrap();
    assert_eq!(info.status, MigrationStatus::Cancelled);
    assert_restored(&g, &before);
    let ev: Vec<StateChange> = events.try_iter().collect();
    let to: Vec<_> = ev.iter().map(|e| e.to).collect();
    assert_eq!(
        to,
        [
            MigrationStatus::Setup,
            MigrationStatus::Cancelling,
            MigrationStatus::Cancelled
        ]
    );
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(0),
            ..Default::default()
        },
    );
    // The cancelled source may have written its file header or not. With it, the
    // destination read a cut stream and failed; without a byte, it refused the connection
    // as no source and waits on, so the next migration lands on it.
    std::thread::sleep(Duration::from_millis(200));
    if d.thread.is_finished() {
        assert!(d.thread.join().unwrap().is_err(), "a cut stream");
        second_migration_succeeds(&m, &g);
        return;
    }
    assert_eq!(d.state.status(), MigrationStatus::Setup);
    m.start(&d.uri).unwrap();
    completed(&m.wait().unwrap());
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    assert!(
        r.refused_connections.iter().any(|e| matches!(
            e,
            precopy_engine::ChannelRefused::Closed { got } if *got < 8
        )),
        "{:?}",
        r.refused_connections
    );
}

#[test]
fn cancel_while_active_and_cancel_when_idle() {
    let g = idle_guest(2048);
    let before = g.snapshot();
    let m = migrator(g.clone(), true, true);
    m.cancel(); // nothing in progress: no effect
    assert_eq!(m.status(), MigrationStatus::None);
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(1 << 20),
            ..Default::default()
        },
    );
    let events = m.subscribe();
    let d = destination();
    m.start(&d.uri).unwrap();
    assert_eq!(
        m.wait_for_status(MigrationStatus::Active, Duration::from_secs(10)),
        MigrationStatus::Active
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.query().status, MigrationStatus::Active);
    assert!(matches!(
        m.set_capabilities(Capabilities::default()),
        Err(MigrateError::CapabilityWhileActive)
    ));
    assert!(matches!(
        m.start("tcp:127.0.0.1:1"),
        Err(MigrateError::InProgress)
    ));
    m.cancel();
    let info = m.wait().unwrap();
    assert_eq!(info.status, MigrationStatus::Cancelled);
    let to: Vec<_> = events.try_iter().map(|e| e.to).collect();
    assert_eq!(
        to,
        [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::Cancelling,
            MigrationStatus::Cancelled
        ]
    );
    let _ = d.thread.join().unwrap();
    assert_restored(&g, &before);
    m.cancel(); // finished: no effect
    assert_eq!(m.status(), MigrationStatus::Cancelled);
    second_migration_succeeds(&m, &g);
}

#[test]
fn destination_dying_mid_stream_fails_and_leaves_source_running() {
    let g = idle_guest(4096);
    let before = g.snapshot();
    let m = migrator(g.clone(), true, true);
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(4 << 20),
            ..Default::default()
        },
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    let killer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        s.read_exact(&mut buf).unwrap();
        // the destination dies: connection reset
        drop(s);
    });
    m.start(&uri).unwrap();
    killer.join().unwrap();
    let info = m.wait().unwrap();
    assert_eq!(info.status, MigrationStatus::Failed);
    let e = info.error_desc.unwrap();
    assert!(e.contains("stream"), "{e}");
    assert_restored(&g, &before);
    second_migration_succeeds(&m, &g);
}

#[test]
fn destination_reports_stream_errors_with_the_offset() {
    let g = idle_guest(16);
    let m = migrator(g.clone(), false, false);
    let (uri, t) = recording_destination();
    m.start(&uri).unwrap();
    completed(&m.wait().unwrap());
    let mut stream = t.join().unwrap();
    // Cut the stream: a failed migration with the offset where it ended.
    let d = Destination::new();
    let e = d
        .receive(&stream[..stream.len() / 2], Limits::default())
        .unwrap_err();
    assert_eq!(d.status(), MigrationStatus::Failed);
    assert!(e.to_string().contains("byte"), "{e}");
    // Flip one byte of page data: the digest catches it.
    let i = stream.len() / 2;
    stream[i] ^= 1;
    let d = Destination::new();
    match d.receive(&stream[..], Limits::default()) {
        Err(precopy_engine::IncomingError::DigestMismatch { .. })
        | Err(precopy_engine::IncomingError::Stream { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(d.status(), MigrationStatus::Failed);
}

fn converging_guest(seed: u64) -> Arc<SimGuest> {
    // 1024 pages dirtied uniformly at 4000 pages/s against 2048 pages/s of bandwidth: the
    // dirty set settles near 1024 × (1 − 2048/4000) ≈ 500 pages, far above the 205-page
    // threshold (100 ms at 8 MiB/s). At a 40 % throttle the guest dirties 2400 pages/s,
    // about what is sent, and the dirty set drains.
    Arc::new(
        SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), 4 << 20)],
            workload: SimWorkload::Sparse,
            dirty_rate: 4000,
            vcpus: 1,
            seed,
            initial_zero_percent: 0,
        })
        .unwrap(),
    )
}

fn converging_params() -> ParameterUpdate {
    ParameterUpdate {
        max_bandwidth: Some(8 << 20),
        downtime_limit: Some(100),
        ..Default::default()
    }
}

#[test]
fn does_not_converge_without_auto_converge_and_converges_with_it() {
    let g = converging_guest(11);
    let m = migrator(g.clone(), false, false);
    set(&m, converging_params());
    m.set_pass_limit(Some(12));
    let (info, _) = migrate(&m);
    assert_eq!(info.status, MigrationStatus::Failed);
    assert!(info.error_desc.unwrap().contains("did not converge"));
    assert!(g.is_running());

    let (h, throttles) = recording_throttles(g.clone());
    let m = Migrator::new(h.clone());
    m.set_capabilities(Capabilities {
        auto_converge: true,
        ..Default::default()
    })
    .unwrap();
    set(&m, converging_params());
    set(
        &m,
        ParameterUpdate {
            cpu_throttle_initial: Some(40),
            ..Default::default()
        },
    );
    m.set_pass_limit(Some(2000));
    let (info, r) = migrate(&m);
    completed(&info);
    assert_same(&g, &r.unwrap());
    let t = throttles.lock().unwrap().clone();
    assert!(t.first() == Some(&40), "{t:?}");
    assert_eq!(t.last(), Some(&0), "throttle off at the end: {t:?}");
}

#[test]
fn throttle_goes_20_30_40_under_default_parameters() {
    let g = Arc::new(
        SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), 4 << 20)],
            workload: SimWorkload::Sparse,
            dirty_rate: 40_000,
            vcpus: 1,
            seed: 5,
            initial_zero_percent: 0,
        })
        .unwrap(),
    );
    let (h, throttles) = recording_throttles(g.clone());
    let m = Migrator::new(h.clone());
    m.set_capabilities(Capabilities {
        auto_converge: true,
        ..Default::default()
    })
    .unwrap();
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(8 << 20),
            ..Default::default()
        },
    );
    let d = destination();
    m.start(&d.uri).unwrap();
    let mut seen = Vec::new();
    for _ in 0..300 {
        seen = throttles.lock().unwrap().clone();
        if seen.len() >= 3 || m.status().is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    m.cancel();
    let info = m.wait().unwrap();
    let _ = d.thread.join();
    assert_eq!(&seen[..3], [20, 30, 40], "{seen:?}");
    assert_eq!(info.status, MigrationStatus::Cancelled);
    assert_eq!(g.throttle(), 0);
}

#[test]
fn parameters_change_while_running_and_the_cache_resizes_in_place() {
    let g = sim(SimWorkload::HotSet, 8, 5000, 9);
    let m = migrator(g.clone(), true, true);
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(4 << 20),
            downtime_limit: Some(5),
            xbzrle_cache_size: Some(1 << 20),
            ..Default::default()
        },
    );
    m.set_pass_limit(Some(1000));
    let d = destination();
    m.start(&d.uri).unwrap();
    assert_eq!(
        m.wait_for_status(MigrationStatus::Active, Duration::from_secs(10)),
        MigrationStatus::Active
    );
    std::thread::sleep(Duration::from_millis(700));
    // Out of range: typed error, nothing changes.
    assert!(matches!(
        m.set_parameters(&ParameterUpdate {
            xbzrle_cache_size: Some(3 << 20),
            ..Default::default()
        }),
        Err(MigrateError::Parameter(_))
    ));
    set(
        &m,
        ParameterUpdate {
            xbzrle_cache_size: Some(4 << 20),
            ..Default::default()
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        m.query().xbzrle_cache.map(|x| x.cache_size),
        Some(4 << 20),
        "cache resized while active"
    );
    set(
        &m,
        ParameterUpdate {
            xbzrle_cache_size: Some(256 << 10),
            max_bandwidth: Some(0),
            downtime_limit: Some(300),
            ..Default::default()
        },
    );
    let info = m.wait().unwrap();
    completed(&info);
    assert_eq!(m.parameters().downtime_limit, 300);
    assert_same(&g, &d.thread.join().unwrap().unwrap());
}

#[test]
fn blockers_and_bad_uris() {
    let g = idle_guest(16);
    let m = Migrator::new(g.clone());
    let b = m.add_blocker("device foo does not support migration");
    match m.start("tcp:127.0.0.1:1") {
        Err(MigrateError::Blocked { reasons }) => assert_eq!(reasons.len(), 1),
        other => panic!("{other:?}"),
    }
    assert!(m.remove_blocker(b));
    assert!(!m.remove_blocker(b));
    assert!(matches!(
        m.start("rdma:1.2.3.4:5"),
        Err(MigrateError::Transport(
            precopy_engine::TransportError::UnknownScheme(_)
        ))
    ));
    assert_eq!(m.status(), MigrationStatus::None);
    assert!(matches!(m.wait(), Err(MigrateError::NotStarted)));
    // Nobody listens on port 1: a failed migration, source untouched.
    assert!(m.start("tcp:127.0.0.1:1").is_err());
    assert_eq!(m.status(), MigrationStatus::Failed);
    assert!(m.query().error_desc.unwrap().contains("connect"));
    assert!(g.is_running());
}

#[test]
fn parallel_encoding_roundtrip() {
    for w in [SimWorkload::Mix, SimWorkload::HotSet] {
        let g = sim(w, 8, 4000, 21);
        let m = Migrator::new(g.clone());
        m.set_capabilities(Capabilities {
            xbzrle: true,
            auto_converge: true,
            x_parallel_encoding: true,
            multifd: false,
        })
        .unwrap();
        quick(&m);
        let (info, r) = migrate(&m);
        completed(&info);
        let r = r.unwrap();
        assert_same(&g, &r);
        assert_eq!(info.ram.as_ref().unwrap().transferred, r.bytes);
    }
}

#[test]
fn unix_file_and_exec_transports() {
    let dir = std::env::temp_dir().join(format!("precopy-engine-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let g = idle_guest(128);
    let m = migrator(g.clone(), true, false);

    // unix:
    let sock = dir.join("sock");
    let l = precopy_engine::IncomingListener::bind(&format!("unix:{}", sock.display())).unwrap();
    let d = std::thread::spawn(move || Destination::new().accept_and_receive(l, Limits::default()));
    m.start(&format!("unix:{}", sock.display())).unwrap();
    completed(&m.wait().unwrap());
    assert_same(&g, &d.join().unwrap().unwrap());
    g.resume().unwrap();

    // file:
    let file = dir.join("stream");
    m.start(&format!("file:{}", file.display())).unwrap();
    completed(&m.wait().unwrap());
    let l = precopy_engine::IncomingListener::bind(&format!("file:{}", file.display())).unwrap();
    assert_same(
        &g,
        &Destination::new()
            .accept_and_receive(l, Limits::default())
            .unwrap(),
    );
    g.resume().unwrap();

    // exec: (the command writes the stream to a file)
    let file2 = dir.join("stream2");
    m.start(&format!("exec:cat > {}", file2.display())).unwrap();
    let info = m.wait().unwrap();
    completed(&info);
    let bytes = std::fs::read(&file2).unwrap();
    assert_eq!(bytes.len() as u64, info.ram.unwrap().transferred);
    let l =
        precopy_engine::IncomingListener::bind(&format!("exec:cat {}", file2.display())).unwrap();
    assert_same(
        &g,
        &Destination::new()
            .accept_and_receive(l, Limits::default())
            .unwrap(),
    );
    g.resume().unwrap();

    // exec: whose command fails is a failed migration.
    m.start("exec:exit 3").unwrap();
    assert_eq!(m.wait().unwrap().status, MigrationStatus::Failed);
    assert!(g.is_running());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn query_migrate_json_while_active_has_expected_downtime() {
    let g = idle_guest(4096);
    let m = migrator(g.clone(), true, true);
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(4 << 20),
            ..Default::default()
        },
    );
    let d = destination();
    m.start(&d.uri).unwrap();
    m.wait_for_status(MigrationStatus::Active, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(400));
    let j = serde_json::to_value(m.query()).unwrap();
    assert_eq!(j["status"], "active");
    assert!(j["expected-downtime"].as_u64().is_some(), "{j}");
    assert!(j["ram"]["transferred"].as_u64().unwrap() > 0);
    assert!(j.get("downtime").is_none());
    m.cancel();
    m.wait().unwrap();
    let _ = d.thread.join();
    let mut w = Vec::new();
    writeln!(w, "{}", serde_json::to_string(&m.query()).unwrap()).unwrap();
    assert!(
        String::from_utf8(w)
            .unwrap()
            .contains("\"status\":\"cancelled\"")
    );
}
