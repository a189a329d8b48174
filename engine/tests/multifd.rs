//! multifd end to end over loopback sockets: every workload with 1, 2 and 4 page channels,
//! XBZRLE on and off, RAM digest-verified; channels connecting in reverse order; strays
//! refused; a channel dying mid-migration; cancel; file: refused.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use precopy_engine::{
    Capabilities, ChannelRefused, Destination, HELLO_TIMEOUT, IncomingError, IncomingListener,
    MigrateError, MigrationStatus, Migrator, ParameterUpdate, SimGuest, SimWorkload, VcpuControl,
};
use precopy_stream::Limits;
use precopy_stream::multifd::{HELLO_LEN, Hello};

fn multifd_migrator(g: Arc<SimGuest>, xbzrle: bool, channels: u16) -> Migrator {
    let m = Migrator::new(g);
    m.set_capabilities(Capabilities {
        xbzrle,
        auto_converge: true,
        multifd: true,
        ..Default::default()
    })
    .unwrap();
    set(
        &m,
        ParameterUpdate {
            multifd_channels: Some(channels),
            max_bandwidth: Some(64 << 20),
            downtime_limit: Some(50),
            xbzrle_cache_size: Some(1 << 20),
            ..Default::default()
        },
    );
    m.set_pass_limit(Some(400));
    m
}

#[test]
fn every_workload_with_1_2_and_4_channels_lands_exactly() {
    let mut seed = 0;
    for w in SimWorkload::ALL {
        for channels in [1u16, 2, 4] {
            for xbzrle in [false, true] {
                seed += 1;
                let g = sim(w, 4, 3000, seed);
                let m = multifd_migrator(g.clone(), xbzrle, channels);
                let (info, r) = migrate(&m);
                completed(&info);
                let r = r.unwrap_or_else(|e| panic!("{w:?} {channels} xbzrle {xbzrle}: {e}"));
                assert_same(&g, &r);
                assert!(r.verified);
                assert_eq!(r.multifd_channels, channels);
                let ram = info.ram.as_ref().unwrap();
                // Stats add up over the channels: every byte the destination read.
                assert_eq!(ram.transferred, r.bytes, "{w:?} {channels} {xbzrle}");
                assert_eq!(ram.normal, r.stats.page.count);
                assert_eq!(ram.duplicate, r.stats.zero.count);
                if xbzrle {
                    assert_eq!(
                        info.xbzrle_cache.as_ref().unwrap().pages,
                        r.stats.xbzrle.count
                    );
                } else {
                    assert_eq!(r.stats.xbzrle.count, 0);
                }
                assert!(r.refused_connections.is_empty());
            }
        }
    }
}

/// A guest that rewrites page 5 and one page in each of the next four 64-page runs (so
/// on every channel) at every sync with
/// the sync number, for `passes` passes: the destination must end with the last value.
#[test]
fn a_page_dirtied_in_every_iteration_lands_with_its_last_content() {
    const HOT: [u64; 5] = [5, 70, 135, 200, 265];
    use precopy_engine::Hooked;
    for channels in [2u16, 4] {
        let inner = sim(SimWorkload::Sparse, 4, 0, 77);
        let hooked = Hooked::new(inner.clone()).on_sync(|g: &SimGuest, n| {
            if n <= 12 {
                for p in HOT {
                    let mut page = [0u8; 4096];
                    page[..8].copy_from_slice(&n.to_le_bytes());
                    page[100] = p as u8;
                    g.write_page(0, p, &page).unwrap();
                }
            }
        });
        let guest = Arc::new(hooked);
        let m = Migrator::new(guest.clone());
        m.set_capabilities(Capabilities {
            xbzrle: true,
            multifd: true,
            ..Default::default()
        })
        .unwrap();
        set(
            &m,
            ParameterUpdate {
                multifd_channels: Some(channels),
                max_bandwidth: Some(0),
                // Never below the threshold while the hook dirties: 12 passes at least.
                downtime_limit: Some(0),
                ..Default::default()
            },
        );
        let d = destination();
        m.start(&d.uri).unwrap();
        let info = m.wait().unwrap();
        completed(&info);
        let r = d.thread.join().unwrap().unwrap();
        assert!(
            info.ram.as_ref().unwrap().dirty_sync_count >= 12,
            "{info:?}"
        );
        for p in HOT {
            let data = &r.image.blocks()[0].data()[p as usize * 4096..][..4096];
            let n = u64::from_le_bytes(data[..8].try_into().unwrap());
            assert_eq!(n, 12, "page {p} with {channels} channels");
        }
        assert_same(&inner, &r);
    }
}

/// Connect the channels ourselves, last page channel first and the main one last.
#[test]
fn channels_connecting_in_reverse_order_are_matched_up() {
    let g = sim(SimWorkload::Mix, 4, 2000, 5);
    let m = multifd_migrator(g.clone(), true, 3);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    let mut conns: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    conns.reverse();
    // conns[0] connected last: it becomes the main channel.
    let main = conns.remove(0);
    conns.reverse();
    // Page channel 1 connected second to last, channel 3 first.
    m.start_multifd_to(main, conns).unwrap();
    let info = m.wait().unwrap();
    completed(&info);
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    assert_eq!(r.multifd_channels, 3);
}

fn hello(id: [u8; 16], index: u16, channels: u16) -> [u8; HELLO_LEN] {
    Hello {
        migration_id: id,
        index,
        channels,
    }
    .to_bytes()
}

#[test]
fn strays_and_duplicates_are_refused_without_disturbing_the_migration() {
    let g = sim(SimWorkload::HotSet, 4, 2000, 9);
    let m = multifd_migrator(g.clone(), true, 2);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    // Before the migration: a page channel of another migration. It waits for its main
    // channel, then is refused when the real main channel names another id.
    let mut other = TcpStream::connect(&addr).unwrap();
    other.write_all(&hello([9; 16], 1, 2)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // The migration connects its main channel first, which defines the migration.
    m.start(&d.uri).unwrap();
    // Strays while it runs: garbage, and a channel index that is taken.
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.0\r\n\r\n____________")
        .unwrap();
    let mut dup = TcpStream::connect(&addr).unwrap();
    dup.write_all(&hello([1; 16], 1, 2)).unwrap();
    let info = m.wait().unwrap();
    completed(&info);
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    let refused = &r.refused_connections;
    assert!(
        refused.contains(&ChannelRefused::OtherMigration { index: 1 }),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|e| matches!(e, ChannelRefused::NotAMigration { found: 0x4745_5420 })),
        "{refused:?}"
    );
    // The hello with a taken index came after gathering, with another id.
    assert_eq!(
        refused
            .iter()
            .filter(|e| **e == ChannelRefused::OtherMigration { index: 1 })
            .count(),
        2,
        "{refused:?}"
    );
}

/// A sink that fails once `limit` bytes went through: a page channel whose connection
/// breaks mid-migration.
struct Breaks {
    inner: TcpStream,
    left: usize,
}

impl Write for Breaks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let _ = self.inner.shutdown(std::net::Shutdown::Both);
            return Err(std::io::ErrorKind::ConnectionReset.into());
        }
        let n = buf.len().min(self.left);
        let n = self.inner.write(&buf[..n])?;
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl precopy_engine::MigrationSink for Breaks {}

#[test]
fn a_channel_dying_mid_migration_fails_it_cleanly_and_the_source_runs_on() {
    let g = sim(SimWorkload::Mix, 8, 2000, 13);
    let m = multifd_migrator(g.clone(), true, 3);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    let sinks: Vec<Breaks> = (0..4)
        .map(|i| Breaks {
            inner: TcpStream::connect(&addr).unwrap(),
            // Channel 2 breaks after 1 MiB; the others never.
            left: if i == 2 { 1 << 20 } else { usize::MAX },
        })
        .collect();
    let mut sinks = sinks.into_iter();
    let main = sinks.next().unwrap();
    m.start_multifd_to(main, sinks.collect()).unwrap();
    let info = m.wait().unwrap();
    assert_eq!(info.status, MigrationStatus::Failed);
    let e = info.error_desc.unwrap();
    assert!(e.contains("multifd channel 2"), "{e}");
    assert!(g.is_running(), "the source guest runs on");
    let r = d.thread.join().unwrap();
    assert!(r.is_err(), "the destination fails too");
    assert_eq!(d.state.status(), MigrationStatus::Failed);
    // A new migration of the same guest can start and complete.
    let m2 = multifd_migrator(g.clone(), true, 2);
    let (info, r) = migrate(&m2);
    completed(&info);
    assert_same(&g, &r.unwrap());
}

#[test]
fn cancel_in_setup_and_while_active_leaves_the_source_running() {
    for wait_active in [false, true] {
        let g = sim(SimWorkload::Mix, 8, 5000, 17);
        let m = multifd_migrator(g.clone(), true, 2);
        set(
            &m,
            ParameterUpdate {
                max_bandwidth: Some(4 << 20),
                ..Default::default()
            },
        );
        let d = destination();
        m.start(&d.uri).unwrap();
        if wait_active {
            assert_eq!(
                m.wait_for_status(MigrationStatus::Active, Duration::from_secs(10)),
                MigrationStatus::Active
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        m.cancel();
        let info = m.wait().unwrap();
        assert_eq!(info.status, MigrationStatus::Cancelled, "{info:?}");
        assert!(g.is_running());
        // In setup every hello was sent at connect, so the destination normally had the
        // whole set and fails on the cut channels. Had it seen the main channel close
        // before the last hello, it dropped the attempt as abandoned and waits for a
        // source: a retry then lands on it.
        for _ in 0..500 {
            if d.thread.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !wait_active && !d.thread.is_finished() {
            assert_eq!(d.state.status(), MigrationStatus::Setup);
            let m2 = multifd_migrator(g.clone(), true, 2);
            m2.start(&d.uri).unwrap();
            completed(&m2.wait().unwrap());
            assert_same(&g, &d.thread.join().unwrap().unwrap());
            continue;
        }
        assert!(d.thread.join().unwrap().is_err());
    }
}

#[test]
fn multifd_needs_a_socket_transport() {
    let g = sim(SimWorkload::Sparse, 1, 0, 1);
    let m = multifd_migrator(g, false, 2);
    for uri in ["file:/tmp/precopy-multifd-x", "exec:cat >/dev/null", "fd:1"] {
        let e = m.start(uri).unwrap_err();
        assert!(matches!(e, MigrateError::Multifd { .. }), "{uri}: {e:?}");
        assert!(e.to_string().contains("socket"), "{e}");
        assert_eq!(m.status(), MigrationStatus::None);
    }
    assert!(matches!(
        m.start_multifd_to(Vec::new(), Vec::<Vec<u8>>::new()),
        Err(MigrateError::Multifd { .. })
    ));
}

#[test]
fn a_multifd_stream_in_a_file_is_refused_by_the_destination() {
    let g = sim(SimWorkload::Sparse, 1, 0, 1);
    let m = multifd_migrator(g, false, 1);
    // Main channel into a file, the page channel into memory.
    let path = std::env::temp_dir().join(format!("precopy-multifd-main-{}", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    type Sink = Box<dyn precopy_engine::MigrationSink>;
    let page: Sink = Box::<Vec<u8>>::default();
    m.start_multifd_to(Box::new(f) as Sink, vec![page]).unwrap();
    completed(&m.wait().unwrap());
    let l = IncomingListener::bind(&format!("file:{}", path.display())).unwrap();
    let e = Destination::new()
        .accept_and_receive(l, Limits::default())
        .unwrap_err();
    assert!(matches!(e, IncomingError::Multifd { .. }), "{e:?}");
    assert!(e.to_string().contains("socket"), "{e}");
    let _ = std::fs::remove_file(path);
}

/// `max-bandwidth` bounds the sum over all connections, and the cache resizes in place
/// across the shards while the migration runs.
#[test]
fn the_rate_limit_holds_over_all_channels_and_the_cache_resizes_while_running() {
    let g = sim(SimWorkload::HotSet, 16, 2000, 21);
    let m = multifd_migrator(g.clone(), true, 4);
    let limit = 16u64 << 20;
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(limit),
            ..Default::default()
        },
    );
    let d = destination();
    m.start(&d.uri).unwrap();
    assert_eq!(
        m.wait_for_status(MigrationStatus::Active, Duration::from_secs(10)),
        MigrationStatus::Active
    );
    set(
        &m,
        ParameterUpdate {
            xbzrle_cache_size: Some(4 << 20),
            ..Default::default()
        },
    );
    let info = m.wait().unwrap();
    completed(&info);
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    assert_eq!(info.xbzrle_cache.as_ref().unwrap().cache_size, 4 << 20);
    let ram = info.ram.as_ref().unwrap();
    // Everything but the final, unlimited stage went at most at the limit (plus one
    // 100 ms slice of slack).
    let active_ms = info.total_time.unwrap() - info.downtime.unwrap_or(0);
    let allowed = limit as f64 * (active_ms as f64 / 1000.0 + 0.1);
    assert!(
        (ram.precopy_bytes as f64) <= allowed * 1.05,
        "{} bytes before switchover in {active_ms} ms at {limit} B/s",
        ram.precopy_bytes
    );
    assert!(ram.multifd_bytes > ram.transferred / 2);
}

/// A destination that accepts every connection, reads a little and dies: the source
/// fails, says which connection broke, and its guest runs on.
#[test]
fn a_dead_destination_fails_the_migration_and_the_source_runs_on() {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    let dead = std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..3).map(|_| l.accept().unwrap().0).collect();
        let mut buf = [0u8; 4096];
        for c in &mut conns {
            let _ = c.read(&mut buf);
        }
        std::thread::sleep(Duration::from_millis(100));
        drop(conns);
    });
    let g = sim(SimWorkload::Mix, 16, 2000, 31);
    let m = multifd_migrator(g.clone(), true, 2);
    m.start(&uri).unwrap();
    let info = m.wait().unwrap();
    dead.join().unwrap();
    assert_eq!(info.status, MigrationStatus::Failed, "{info:?}");
    let e = info.error_desc.unwrap();
    assert!(e.contains("stream") || e.contains("multifd channel"), "{e}");
    assert!(g.is_running());
}

/// A hand-made multifd source whose page channel 1 carries a page of channel 2: the
/// destination refuses it, naming the channel, and fails.
#[test]
fn a_page_on_another_channel_than_its_own_is_refused() {
    use precopy_stream::{Encoder, RamBlockInfo};
    let blocks = [RamBlockInfo::new("pc.ram", 256 * 4096)];
    let id = [5u8; 16];
    let mut main = hello(id, 0, 2).to_vec();
    let mut e = Encoder::new();
    e.file_header(&mut main, "m").unwrap();
    e.ram_setup(&mut main, &blocks).unwrap();
    e.begin_ram_iteration(&mut main).unwrap();
    e.multifd_flush(&mut main, 1).unwrap();
    e.end_ram_section(&mut main).unwrap();
    let mut ch1 = hello(id, 1, 2).to_vec();
    let mut c1 = Encoder::page_records_only(&blocks);
    // Page 64 starts the second run of 64 pages: channel 2's.
    c1.page(&mut ch1, 0, 64 * 4096, &[7; 4096]).unwrap();
    c1.multifd_flush(&mut ch1, 1).unwrap();
    let mut ch2 = hello(id, 2, 2).to_vec();
    let mut c2 = Encoder::page_records_only(&blocks);
    c2.multifd_flush(&mut ch2, 1).unwrap();

    let l = IncomingListener::bind("tcp:127.0.0.1:0").unwrap();
    let addr = l.local_uri().strip_prefix("tcp:").unwrap().to_owned();
    let d = std::thread::spawn(move || {
        Destination::new()
            .with_verify(false)
            .accept_and_receive(l, Limits::default())
    });
    let mut conns: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    for (c, bytes) in conns.iter_mut().zip([&main, &ch1, &ch2]) {
        c.write_all(bytes).unwrap();
    }
    let e = d.join().unwrap().unwrap_err();
    assert!(
        matches!(e, IncomingError::Channel { channel: 1, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("another page channel"), "{e}");
}

/// More page channels than the listen backlog (128): each connection says its hello at
/// once, so the destination starts accepting after the first one.
#[test]
fn two_hundred_channels_over_tcp_get_past_the_listen_backlog() {
    let g = sim(SimWorkload::Mix, 2, 1000, 41);
    let m = multifd_migrator(g.clone(), true, 200);
    let (info, r) = migrate(&m);
    completed(&info);
    let r = r.unwrap();
    assert_same(&g, &r);
    assert_eq!(r.multifd_channels, 200);
}

/// Strays before the source: a silent connection, a main-channel hello of another
/// migration, a page hello that then hangs up. The real migration still completes and
/// the strays are named.
#[test]
fn strays_before_the_source_neither_hang_nor_take_over_the_destination() {
    let g = sim(SimWorkload::HotSet, 4, 2000, 43);
    let m = multifd_migrator(g.clone(), true, 2);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    let silent = TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut fake_main = TcpStream::connect(&addr).unwrap();
    fake_main.write_all(&hello([0xaa; 16], 0, 2)).unwrap();
    let mut quitter = TcpStream::connect(&addr).unwrap();
    quitter.write_all(&hello([0xbb; 16], 1, 2)).unwrap();
    drop(quitter);
    // Silent strays while it gathers do not hold the real channels up.
    let more: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    m.start(&d.uri).unwrap();
    let info = m.wait().unwrap();
    completed(&info);
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    let refused = &r.refused_connections;
    // The silent ones: still silent when the migration ended.
    assert_eq!(
        refused
            .iter()
            .filter(|e| matches!(e, ChannelRefused::NoHello | ChannelRefused::Late))
            .count(),
        11,
        "{refused:?}"
    );
    assert!(
        refused.contains(&ChannelRefused::OtherMigration { index: 0 }),
        "{refused:?}"
    );
    drop((silent, fake_main, more));
}

/// Silent connections that came before the source are read on their own threads: they
/// do not delay the source by [`HELLO_TIMEOUT`] each (12 of them one after another would
/// have been a minute, past [`GATHER_TIMEOUT`]), for a plain stream or a multifd one. Each
/// is refused, named, and told to a subscriber as it happens.
#[test]
fn silent_strays_before_the_source_do_not_delay_it() {
    for channels in [0u16, 2] {
        let g = sim(SimWorkload::HotSet, 4, 2000, 53);
        let m = if channels == 0 {
            migrator(g.clone(), true, true)
        } else {
            multifd_migrator(g.clone(), true, channels)
        };
        let l = IncomingListener::bind("tcp:127.0.0.1:0").unwrap();
        let uri = l.local_uri();
        let addr = uri.strip_prefix("tcp:").unwrap().to_owned();
        let d = Destination::new();
        let told = d.subscribe_refusals();
        let d2 = d.clone();
        let thread = std::thread::spawn(move || d2.accept_and_receive(l, Limits::default()));
        let strays: Vec<TcpStream> = (0..12)
            .map(|_| TcpStream::connect(&addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let t = std::time::Instant::now();
        m.start(&uri).unwrap();
        let info = m.wait().unwrap();
        completed(&info);
        let r = thread.join().unwrap().unwrap();
        let took = t.elapsed();
        assert_same(&g, &r);
        assert_eq!(r.multifd_channels, channels);
        // Serially it would take 12 x 5 s; allow a slow machine, not a serial wait.
        assert!(
            took < HELLO_TIMEOUT * 12 / 2,
            "{channels} channels: took {took:?} behind 12 silent strays"
        );
        let strays_refused: Vec<_> = r
            .refused_connections
            .iter()
            .filter(|e| matches!(e, ChannelRefused::NoHello | ChannelRefused::Late))
            .collect();
        assert_eq!(strays_refused.len(), 12, "{:?}", r.refused_connections);
        let live: Vec<ChannelRefused> = told.try_iter().collect();
        assert_eq!(live, r.refused_connections);
        drop(strays);
    }
}

/// Before a plain-stream source: a stray that sends garbage, one that sends half a
/// stream header and closes, one that connects and closes. Each is refused as what it is,
/// and the destination goes on waiting for the real source (QEMU's `-incoming` would
/// have failed on the first).
#[test]
fn garbage_and_cut_connections_before_the_source_are_refused() {
    let g = sim(SimWorkload::HotSet, 4, 2000, 59);
    let m = migrator(g.clone(), true, true);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut cut = TcpStream::connect(&addr).unwrap();
    cut.write_all(b"QE").unwrap();
    drop(cut);
    drop(TcpStream::connect(&addr).unwrap());
    // Each is read and refused within this; none ends the destination.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!d.thread.is_finished(), "a stray ended the destination");
    assert_eq!(d.state.status(), MigrationStatus::Setup);
    m.start(&d.uri).unwrap();
    completed(&m.wait().unwrap());
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    let refused = &r.refused_connections;
    for want in [
        ChannelRefused::NotAMigration { found: 0x4745_5420 },
        ChannelRefused::Closed { got: 2 },
        ChannelRefused::Closed { got: 0 },
    ] {
        assert!(refused.contains(&want), "{want:?} not in {refused:?}");
    }
    drop(garbage);
}

/// A multifd source that gave up while connecting (its main channel and one of two page
/// channels connected, then closed) does not hold the destination: its connections are
/// dropped as abandoned, and a retry with one stream is accepted and lands.
#[test]
fn an_abandoned_multifd_attempt_does_not_hold_the_destination() {
    let g = sim(SimWorkload::HotSet, 4, 2000, 67);
    let m = migrator(g.clone(), true, true);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    let mut main = TcpStream::connect(&addr).unwrap();
    main.write_all(&hello([7; 16], 0, 2)).unwrap();
    let mut page = TcpStream::connect(&addr).unwrap();
    page.write_all(&hello([7; 16], 1, 2)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop((main, page));
    m.start(&d.uri).unwrap();
    completed(&m.wait().unwrap());
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    assert_eq!(r.multifd_channels, 0);
    for index in [0, 1] {
        assert!(
            r.refused_connections
                .contains(&ChannelRefused::Abandoned { index }),
            "{:?}",
            r.refused_connections
        );
    }
}

/// A stray main-channel hello that stays open, whose page channels never come, is dropped
/// after the gather timeout: it neither fails the destination nor keeps a plain-stream
/// source out for good.
#[test]
fn an_incomplete_multifd_attempt_is_dropped_after_the_gather_timeout() {
    let g = sim(SimWorkload::HotSet, 4, 2000, 71);
    let m = migrator(g.clone(), true, true);
    let l = IncomingListener::bind("tcp:127.0.0.1:0").unwrap();
    let uri = l.local_uri();
    let addr = uri.strip_prefix("tcp:").unwrap().to_owned();
    let waited = Duration::from_millis(300);
    let d = Destination::new().with_gather_timeout(waited);
    let d2 = d.clone();
    let thread = std::thread::spawn(move || d2.accept_and_receive(l, Limits::default()));
    let mut stray = TcpStream::connect(&addr).unwrap();
    stray.write_all(&hello([5; 16], 0, 2)).unwrap();
    std::thread::sleep(waited * 3);
    assert!(!thread.is_finished(), "the stray failed the destination");
    m.start(&uri).unwrap();
    completed(&m.wait().unwrap());
    let r = thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    assert!(
        r.refused_connections
            .contains(&ChannelRefused::Incomplete { index: 0, waited }),
        "{:?}",
        r.refused_connections
    );
    drop(stray);
}

/// Lets this process hold a few thousand sockets (the soft limit may be 1024).
fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for getrlimit to fill and setrlimit to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// A stray main-channel hello held open, whose migration had no connection for
/// [`HELLO_TIMEOUT`], is no multifd source connecting: a plain-stream source is taken.
#[test]
fn a_stray_main_hello_left_alone_does_not_keep_a_plain_source_out() {
    let g = sim(SimWorkload::HotSet, 4, 2000, 73);
    let m = migrator(g.clone(), true, true);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    let mut stray = TcpStream::connect(&addr).unwrap();
    stray.write_all(&hello([3; 16], 0, 4)).unwrap();
    std::thread::sleep(HELLO_TIMEOUT + Duration::from_millis(300));
    m.start(&d.uri).unwrap();
    completed(&m.wait().unwrap());
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    assert!(
        r.refused_connections
            .contains(&ChannelRefused::OtherMigration { index: 0 }),
        "{:?}",
        r.refused_connections
    );
    drop(stray);
}

/// More silent strays than hellos read at once, held open: the ones silent the longest
/// give way, so a source that comes right after them lands (it used to be refused until
/// they timed out).
#[test]
fn silent_strays_beyond_the_reader_cap_do_not_keep_a_source_out() {
    raise_fd_limit();
    let g = sim(SimWorkload::HotSet, 4, 2000, 79);
    let m = multifd_migrator(g.clone(), true, 2);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    let strays: Vec<TcpStream> = (0..600)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    m.start(&d.uri).unwrap();
    completed(&m.wait().unwrap());
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    let refused = &r.refused_connections;
    assert!(refused.contains(&ChannelRefused::TooMany), "{refused:?}");
    // Every stray is accounted for: made way, or still silent at the end.
    assert_eq!(
        refused
            .iter()
            .filter(|e| matches!(
                e,
                ChannelRefused::TooMany | ChannelRefused::Late | ChannelRefused::NoHello
            ))
            .count(),
        600,
        "{refused:?}"
    );
    drop(strays);
}

/// More page-channel hellos of other migrations than connections held, all open: the
/// migrations that began longest ago give way to the source connecting now.
#[test]
fn page_hellos_beyond_the_pending_cap_do_not_keep_a_multifd_source_out() {
    raise_fd_limit();
    let g = sim(SimWorkload::HotSet, 4, 2000, 83);
    let m = multifd_migrator(g.clone(), true, 2);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    let strays: Vec<TcpStream> = (0..1030u32)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(&hello(id, 1, 2)).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    m.start(&d.uri).unwrap();
    completed(&m.wait().unwrap());
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    assert!(
        r.refused_connections.contains(&ChannelRefused::TooMany),
        "{:?}",
        r.refused_connections
    );
    drop(strays);
}

/// [`HELLO_TIMEOUT`] bounds a connection's whole opening, not each read: a stray that
/// drips a hello a byte a second, and one that sends `QEVM` alone and holds on, are both
/// refused as silent, and the source that comes after them is taken.
#[test]
fn slow_and_half_openings_are_refused_after_the_hello_timeout() {
    let g = sim(SimWorkload::HotSet, 4, 2000, 89);
    let m = migrator(g.clone(), true, true);
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    let mut half = TcpStream::connect(&addr).unwrap();
    half.write_all(b"QEVM").unwrap();
    let drip_addr = addr.clone();
    let drip = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&drip_addr).unwrap();
        for b in hello([4; 16], 0, 2) {
            if s.write_all(&[b]).is_err() {
                return true; // refused and shut down
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    });
    std::thread::sleep(HELLO_TIMEOUT + Duration::from_millis(700));
    m.start(&d.uri).unwrap();
    completed(&m.wait().unwrap());
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    assert_eq!(
        r.refused_connections
            .iter()
            .filter(|e| **e == ChannelRefused::NoHello)
            .count(),
        2,
        "{:?}",
        r.refused_connections
    );
    drop(half);
    drip.join().unwrap();
}

/// While a multifd migration runs, a plain stream is refused as such.
#[test]
fn a_plain_stream_during_a_multifd_migration_is_refused() {
    let g = sim(SimWorkload::Mix, 8, 5000, 61);
    let m = multifd_migrator(g.clone(), true, 2);
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(16 << 20),
            ..Default::default()
        },
    );
    let d = destination();
    let addr = d.uri.strip_prefix("tcp:").unwrap().to_owned();
    m.start(&d.uri).unwrap();
    assert_eq!(
        m.wait_for_status(MigrationStatus::Active, Duration::from_secs(10)),
        MigrationStatus::Active
    );
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain.write_all(b"QEVM\0\0\0\x03").unwrap();
    completed(&m.wait().unwrap());
    let r = d.thread.join().unwrap().unwrap();
    assert_same(&g, &r);
    assert!(
        r.refused_connections.contains(&ChannelRefused::PlainStream),
        "{:?}",
        r.refused_connections
    );
    drop(plain);
}

/// A cache that works for one stream works split over the channels: each gets at least
/// a page.
#[test]
fn a_one_page_cache_works_with_four_channels() {
    let g = sim(SimWorkload::Sparse, 4, 2000, 47);
    let m = multifd_migrator(g.clone(), true, 4);
    set(
        &m,
        ParameterUpdate {
            xbzrle_cache_size: Some(4096),
            ..Default::default()
        },
    );
    let (info, r) = migrate(&m);
    completed(&info);
    assert_same(&g, &r.unwrap());
}
