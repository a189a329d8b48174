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
    Capabilities, ChannelRefused, Destination, IncomingError, IncomingListener, MigrateError,
    MigrationStatus, Migrator, ParameterUpdate, SimGuest, SimWorkload,
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
    let workloads = [
        SimWorkload::Sparse,
        SimWorkload::CacheLine,
        SimWorkload::FullPage,
        SimWorkload::Zeroing,
        SimWorkload::HotSet,
        SimWorkload::Mix,
    ];
    let mut seed = 0;
    for w in workloads {
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
