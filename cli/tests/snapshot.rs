//! `precopy snapshot take / restore / merge` as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn precopy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args(args)
        .output()
        .expect("run precopy")
}

fn lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

#[test]
fn take_restore_merge_and_refuse_a_wrong_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = precopy(&[
        "snapshot",
        "take",
        "--dir",
        d.to_str().unwrap(),
        "--count",
        "4",
        "--interval-ms",
        "100",
        "--mem",
        "32M",
        "--dirty-rate",
        "20000",
        "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v = lines(&o);
    assert_eq!(v.len(), 5);
    assert_eq!(v[0]["kind"], "full");
    for (i, s) in v[1..4].iter().enumerate() {
        assert_eq!(s["kind"], "diff");
        assert_eq!(s["sequence"], i as u64 + 1);
        // A diff holds the dirtied pages only: far smaller than the full snapshot.
        assert!(s["file-bytes"].as_u64().unwrap() < v[0]["file-bytes"].as_u64().unwrap() / 2);
    }
    assert_eq!(v[4]["verified"], true);

    let chain = [
        p(d, "snap-000.full"),
        p(d, "snap-001.diff"),
        p(d, "snap-002.diff"),
        p(d, "snap-003.diff"),
    ];
    let mut args = vec!["snapshot", "restore", "--json"];
    args.extend(chain.iter().map(String::as_str));
    let o = precopy(&args);
    assert!(o.status.success(), "{o:?}");
    let restored = &lines(&o)[0];
    assert_eq!(restored["sequence"], 3);

    let merged = p(d, "merged.full");
    let mut args = vec!["snapshot", "merge", "--json", "--out", &merged];
    args.extend(chain.iter().map(String::as_str));
    assert!(precopy(&args).status.success());
    let o = precopy(&["snapshot", "restore", "--json", &merged]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(lines(&o)[0]["digest"], restored["digest"]);
    assert_eq!(lines(&o)[0]["id"], restored["id"]);

    // Diff 2 straight onto the full snapshot: refused, exit status 1, error-desc names it.
    let o = precopy(&["snapshot", "restore", "--json", &chain[0], &chain[2]]);
    assert!(!o.status.success());
    let e = &lines(&o)[0];
    assert!(
        e["error-desc"].as_str().unwrap().contains("applies onto"),
        "{e}"
    );
}

#[test]
fn a_folder_with_a_chain_and_an_out_that_is_an_input_are_refused() {
    let dir = std::env::temp_dir().join(format!("precopy-snap-refuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let take = |extra: &[&str]| {
        let mut a = vec![
            "snapshot", "take", "--dir", d, "--count", "2", "--mem", "8M",
        ];
        a.extend_from_slice(extra);
        precopy(&a)
    };
    assert_eq!(take(&[]).status.code(), Some(0));
    let again = take(&["--json"]);
    assert_eq!(again.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert!(
        v["error-desc"]
            .as_str()
            .unwrap()
            .contains("already holds snapshot files"),
        "{v}"
    );
    let base = dir.join("snap-000.full");
    let diff = dir.join("snap-001.diff");
    let (b, df) = (base.to_str().unwrap(), diff.to_str().unwrap());
    let m = precopy(&["snapshot", "merge", "--out", b, b, df]);
    assert_eq!(m.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&m.stderr).contains("one of the files being merged")
            || String::from_utf8_lossy(&m.stdout).contains("one of the files being merged")
    );
    // The chain is intact.
    assert_eq!(
        precopy(&["snapshot", "restore", b, df]).status.code(),
        Some(0)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
