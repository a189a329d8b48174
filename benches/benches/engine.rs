//! Criterion benches for `precopy-engine`: a whole migration of an idle simulated guest into
//! an in-process sink (no bandwidth limit), per guest kind, with and without XBZRLE and with
//! parallel encoding. Throughput is guest RAM bytes migrated. The bench binary
//! `engine-throughput` puts the steady-state XBZRLE pass next to memcpy bandwidth.

// criterion_group!/criterion_main! generate undocumented public functions.
#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use precopy_engine::{
    Capabilities, MigrationStatus, Migrator, ParameterUpdate, SimConfig, SimGuest, SimWorkload,
};

const MIB: u64 = 16;

fn guest(zero_percent: u8) -> Arc<SimGuest> {
    Arc::new(
        SimGuest::new(SimConfig {
            blocks: vec![("pc.ram".into(), MIB << 20)],
            workload: SimWorkload::Sparse,
            dirty_rate: 0,
            vcpus: 1,
            seed: 1,
            initial_zero_percent: zero_percent,
        })
        .expect("guest"),
    )
}

fn migrate(g: Arc<SimGuest>, caps: Capabilities) {
    let m = Migrator::new(g);
    m.set_capabilities(caps).unwrap();
    m.set_parameters(&ParameterUpdate {
        max_bandwidth: Some(0),
        ..Default::default()
    })
    .unwrap();
    m.start_to(std::io::sink()).unwrap();
    let info = m.wait().unwrap();
    assert_eq!(info.status, MigrationStatus::Completed);
}

fn whole_migration(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine/migrate-idle-16MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(MIB << 20));
    for (name, zero) in [("zero-heavy", 100u8), ("random", 0u8)] {
        for (cname, caps) in [
            ("plain", Capabilities::default()),
            (
                "xbzrle",
                Capabilities {
                    xbzrle: true,
                    ..Default::default()
                },
            ),
            (
                "xbzrle-parallel",
                Capabilities {
                    xbzrle: true,
                    x_parallel_encoding: true,
                    ..Default::default()
                },
            ),
        ] {
            g.bench_function(format!("{name}/{cname}"), |b| {
                b.iter_batched(
                    || guest(zero),
                    |gu| migrate(gu, caps),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, whole_migration);
criterion_main!(benches);
