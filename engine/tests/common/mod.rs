//! Shared helpers for the engine's integration tests: a destination on loopback TCP and a
//! guest wrapper with hooks.
#![allow(dead_code)]

use std::sync::Arc;
use std::thread::JoinHandle;

use precopy_engine::{
    Capabilities, Destination, IncomingError, IncomingListener, MigrationInfo, MigrationStatus,
    Migrator, ParameterUpdate, Received, SimConfig, SimGuest, SimWorkload,
};
use precopy_stream::Limits;

/// A destination listening on an ephemeral loopback port, running on a thread.
pub(crate) struct Dest {
    pub(crate) uri: String,
    pub(crate) state: Destination,
    pub(crate) thread: JoinHandle<Result<Received, IncomingError>>,
}

pub(crate) fn destination() -> Dest {
    let l = IncomingListener::bind("tcp:127.0.0.1:0").unwrap();
    let uri = l.local_uri();
    let state = Destination::new();
    let s2 = state.clone();
    let thread = std::thread::spawn(move || s2.accept_and_receive(l, Limits::default()));
    Dest { uri, state, thread }
}

pub(crate) fn sim(workload: SimWorkload, mib: u64, dirty_rate: u64, seed: u64) -> Arc<SimGuest> {
    Arc::new(
        SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), mib << 20), ("vga.vram".into(), 256 << 10)],
            workload,
            dirty_rate,
            vcpus: 2,
            seed,
            initial_zero_percent: 30,
        })
        .unwrap(),
    )
}

pub(crate) fn migrator(guest: Arc<SimGuest>, xbzrle: bool, auto_converge: bool) -> Migrator {
    let m = Migrator::new(guest);
    m.set_capabilities(Capabilities {
        xbzrle,
        auto_converge,
        ..Default::default()
    })
    .unwrap();
    m
}

pub(crate) fn set(m: &Migrator, u: ParameterUpdate) {
    m.set_parameters(&u).unwrap();
}

/// Migrate over loopback TCP; returns the source's final info and the destination result.
pub(crate) fn migrate(m: &Migrator) -> (MigrationInfo, Result<Received, IncomingError>) {
    let d = destination();
    m.start(&d.uri).unwrap();
    let info = m.wait().unwrap();
    let r = d.thread.join().unwrap();
    (info, r)
}

/// Destination RAM equals the source's RAM.
pub(crate) fn assert_same(guest: &SimGuest, r: &Received) {
    let src = guest.snapshot();
    let blocks = r.image.blocks();
    assert_eq!(src.len(), blocks.len());
    for (s, d) in src.iter().zip(blocks) {
        if s[..] != d.data()[..] {
            let p = s
                .chunks(4096)
                .zip(d.data().chunks(4096))
                .position(|(a, b)| a != b)
                .unwrap();
            panic!("block {} differs first at page {p}", d.name());
        }
    }
}

pub(crate) fn completed(info: &MigrationInfo) {
    assert_eq!(
        info.status,
        MigrationStatus::Completed,
        "{:?}",
        info.error_desc
    );
}
