//! End-to-end smoke test.
mod common;
use common::*;
use precopy_engine::{ParameterUpdate, SimWorkload};

#[test]
fn smoke() {
    let g = sim(SimWorkload::Sparse, 8, 2000, 1);
    let m = migrator(g.clone(), true, true);
    set(
        &m,
        ParameterUpdate {
            max_bandwidth: Some(16 << 20),
            downtime_limit: Some(20),
            ..Default::default()
        },
    );
    let (info, r) = migrate(&m);
    println!("{}", serde_json::to_string(&info).unwrap());
    completed(&info);
    let r = r.unwrap();
    assert_same(&g, &r);
}
