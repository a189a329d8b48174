//! `precopy migrate` / `precopy incoming` as a user runs them: bad options are refused
//! with a clear message and exit status 1, never a panic or an abort.

use std::process::{Command, Output, Stdio};

fn precopy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run precopy")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn mem_larger_than_the_host_is_a_clear_error() {
    // 1 PiB cannot be allocated anywhere: typed error, exit 1, no SIGABRT.
    let o = precopy(&["migrate", "--mem", "1024T", "--dirty-rate", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("not enough memory"), "{e}");
    assert!(!e.contains("memory allocation of"), "{e}");
}

#[test]
fn mem_not_a_multiple_of_the_page_is_refused() {
    let o = precopy(&["migrate", "--mem", "5000", "--dirty-rate", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("not a multiple of the 4096-byte page"), "{e}");
}

fn json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn external_destination_reports_verified_null_and_succeeds() {
    // The source cannot verify what an external command received.
    let o = precopy(&[
        "migrate",
        "--mem",
        "8M",
        "--dirty-rate",
        "0",
        "--to",
        "exec:cat >/dev/null",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["status"], "completed", "{v}");
    assert!(v["verified"].is_null(), "{v}");
}

#[test]
fn in_process_destination_reports_verified_true() {
    let o = precopy(&["migrate", "--mem", "8M", "--dirty-rate", "0", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)["verified"], true);
}

#[test]
fn failed_migration_says_so_and_claims_no_verification() {
    let args = [
        "migrate",
        "--mem",
        "8M",
        "--dirty-rate",
        "0",
        "--to",
        "exec:false",
    ];
    let o = precopy(&args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Migration status: failed"), "{out}");
    assert!(out.contains("verified: no (the migration failed"), "{out}");
    assert!(!out.contains("by the destination"), "{out}");
    let mut j = args.to_vec();
    j.push("--json");
    let o = precopy(&j);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["verified"], false, "{v}");
    // Bytes sent before the failure are pre-copy bytes, as in QEMU.
    let ram = &v["ram"];
    if !ram.is_null() {
        assert_eq!(ram["precopy-bytes"], ram["transferred"], "{v}");
        assert_eq!(ram["downtime-bytes"], 0, "{v}");
    }
}

#[test]
fn destination_gone_mid_precopy_counts_sent_bytes_as_precopy_bytes() {
    // The destination reads 1 MB and exits: the migration fails during pre-copy.
    let o = precopy(&[
        "migrate",
        "--mem",
        "64M",
        "--dirty-rate",
        "0",
        "--to",
        "exec:head -c 1000000 >/dev/null",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["verified"], false, "{v}");
    let ram = &v["ram"];
    assert!(ram["transferred"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(ram["precopy-bytes"], ram["transferred"], "{v}");
    assert_eq!(ram["downtime-bytes"], 0, "{v}");
}
