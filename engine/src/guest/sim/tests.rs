//! Unit tests of the simulated guest.

use std::time::Duration;

use xbzrle::PAGE_SIZE;

use super::*;

fn guest(rate: u64) -> SimGuest {
    SimGuest::new(SimConfig {
        blocks: vec![("a".into(), 1 << 20), ("b".into(), 64 << 10)],
        workload: SimWorkload::Mix,
        dirty_rate: rate,
        vcpus: 2,
        seed: 3,
        initial_zero_percent: 50,
    })
    .unwrap()
}

#[test]
fn workload_names_roundtrip() {
    for w in SimWorkload::ALL {
        assert_eq!(w.name().parse::<SimWorkload>().unwrap(), w);
    }
    assert!("nope".parse::<SimWorkload>().is_err());
}

#[test]
fn bad_configs_are_typed_errors() {
    let c = SimConfig::default();
    let e = |c: SimConfig| SimGuest::new(c).unwrap_err();
    assert_eq!(
        e(SimConfig {
            vcpus: 0,
            ..c.clone()
        }),
        SimConfigError::NoVcpu
    );
    assert_eq!(
        e(SimConfig {
            vcpus: 100_000,
            ..c.clone()
        }),
        SimConfigError::TooManyVcpus {
            requested: 100_000,
            max: SimGuest::MAX_VCPUS
        }
    );
    assert_eq!(
        e(SimConfig {
            blocks: vec![],
            ..c.clone()
        }),
        SimConfigError::NoRam
    );
    assert!(matches!(
        e(SimConfig {
            blocks: vec![("x".into(), 4096), ("x".into(), 4096)],
            ..c.clone()
        }),
        SimConfigError::DuplicateName(_)
    ));
    assert!(matches!(
        e(SimConfig {
            blocks: vec![(String::new(), 4096)],
            ..c.clone()
        }),
        SimConfigError::BadName(_)
    ));
    assert_eq!(
        e(SimConfig {
            initial_zero_percent: 101,
            ..c
        }),
        SimConfigError::ZeroPercent(101)
    );
}

#[test]
fn ram_not_a_whole_number_of_pages_is_refused() {
    let e = SimGuest::new(SimConfig {
        blocks: vec![("pc.ram".into(), 5000)],
        ..SimConfig::default()
    })
    .unwrap_err();
    assert_eq!(
        e,
        SimConfigError::Unaligned {
            block: "pc.ram".into(),
            bytes: 5000
        }
    );
}

#[test]
fn ram_larger_than_the_host_is_a_typed_error() {
    // 1 PiB: more than any host (or x86-64 user address space) can provide.
    let e = SimGuest::new(SimConfig {
        blocks: vec![("pc.ram".into(), 1 << 50)],
        ..SimConfig::default()
    })
    .unwrap_err();
    assert_eq!(
        e,
        SimConfigError::OutOfMemory {
            block: "pc.ram".into(),
            bytes: 1 << 50
        }
    );
    assert!(e.to_string().contains("not enough memory"), "{e}");
}

#[test]
fn out_of_range_access_is_an_error() {
    let g = guest(0);
    let mut p = [0u8; PAGE_SIZE];
    assert!(matches!(
        g.read_page(2, 0, &mut p),
        Err(GuestError::NoSuchBlock { block: 2 })
    ));
    assert!(matches!(
        g.read_page(1, 16, &mut p),
        Err(GuestError::PageOutOfRange { pages: 16, .. })
    ));
    let mut bm = vec![0u64; 3];
    assert!(matches!(
        g.fetch_and_clear(0, &mut bm),
        Err(GuestError::BitmapSize { expected: 4, .. })
    ));
}

#[test]
fn writes_are_logged_and_stop_really_stops() {
    let g = guest(20_000);
    g.log_start().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    g.stop().unwrap();
    assert!(!g.is_running());
    let w = g.writes();
    assert!(w > 0);
    let mut bm = vec![0u64; 4];
    g.fetch_and_clear(0, &mut bm).unwrap();
    assert!(bm.iter().any(|&x| x != 0));
    // Stopped: nothing more is written or logged.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.writes(), w);
    let mut again = vec![0u64; 4];
    g.fetch_and_clear(0, &mut again).unwrap();
    assert!(again.iter().all(|&x| x == 0));
    // A page written by hand is logged and read back.
    let page = [9u8; PAGE_SIZE];
    g.write_page(1, 3, &page).unwrap();
    let mut bm1 = vec![0u64; 1];
    g.fetch_and_clear(1, &mut bm1).unwrap();
    assert_eq!(bm1[0] & (1 << 3), 1 << 3);
    let mut out = [0u8; PAGE_SIZE];
    g.read_page(1, 3, &mut out).unwrap();
    assert_eq!(out, page);
    g.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(g.writes() > w + 1);
}

#[test]
fn dirty_rate_and_throttle_are_honoured() {
    let g = guest(4000);
    std::thread::sleep(Duration::from_millis(500));
    let free = g.writes();
    // 4000 pages/s for 0.5 s: about 2000, never far above.
    assert!((200..=3000).contains(&free), "{free}");
    g.set_throttle(99).unwrap();
    assert_eq!(g.throttle(), 99);
    std::thread::sleep(Duration::from_millis(60));
    let w0 = g.writes();
    std::thread::sleep(Duration::from_millis(500));
    // At 99 % each vCPU runs 10 ms per second: at most one slice here.
    let throttled = g.writes() - w0;
    assert!(throttled * 4 < free, "{throttled} vs {free}");
    g.set_throttle(0).unwrap();
}
