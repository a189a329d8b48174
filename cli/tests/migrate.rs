//! `precopy migrate` / `precopy incoming` as a user runs them: bad options are refused
//! with a clear message and exit status 1, never a panic or an abort.

use std::process::{Command, Stdio};

mod common;
use common::{json, precopy, stderr};

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

#[test]
fn external_destination_reports_verified_null_and_succeeds() {
    // The source cannot verify what an external command received.
    let o = migrate_json_to("8M", "exec:cat >/dev/null");
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
    let o = migrate_json_to("64M", "exec:head -c 1000000 >/dev/null");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["verified"], false, "{v}");
    let ram = &v["ram"];
    assert!(ram["transferred"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(ram["precopy-bytes"], ram["transferred"], "{v}");
    assert_eq!(ram["downtime-bytes"], 0, "{v}");
}

/// True (after a `SKIPPED` line) when the QEMU vectors are absent; panics
/// instead under `PRECOPY_REQUIRE_VECTORS=1` (see `precopy_testsupport`).
fn skipped(test: &str) -> bool {
    precopy_testsupport::vectors_or_skip(test).is_none()
}

/// The real QEMU 7.2 plain stream, decompressed once into the test's temp dir.
fn qemu_plain_stream() -> std::path::PathBuf {
    let v = precopy_testsupport::Vectors::locate().unwrap_or_else(|e| panic!("{e}"));
    let bytes = v
        .read("plain-stream.bin.xz")
        .unwrap_or_else(|e| panic!("QEMU vector: {e}"));
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qemu-plain-stream.bin");
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn incoming_takes_a_qemu_stream_with_verify_off() {
    if skipped("incoming_takes_a_qemu_stream_with_verify_off") {
        return;
    }
    let path = qemu_plain_stream();
    let uri = format!("file:{}", path.display());
    // Default: QEMU streams carry no RAM digest of ours, so verification refuses it.
    let o = precopy(&["incoming", &uri, "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["error-desc"].as_str().unwrap().contains("digest"), "{v}");
    // --verify off: it loads, and says it was not checked.
    let o = precopy(&["incoming", &uri, "--verify", "off", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["status"], "completed", "{v}");
    assert!(v["verified"].is_null(), "{v}");
    // pc.ram (128 MiB) plus QEMU's ROM/VGA blocks.
    assert!(v["ram-total"].as_u64().unwrap() >= 128u64 << 20, "{v}");
    let o = precopy(&["incoming", &uri, "--verify", "off"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("verified: not checked"), "{out}");
}

#[test]
fn every_size_option_takes_suffixes_and_refuses_fractions() {
    // inspect --max-ram used to take only plain bytes.
    let o = precopy(&["inspect", "--max-ram", "2T", "/nonexistent-precopy-stream"]);
    let e = stderr(&o);
    assert!(!e.contains("invalid digit"), "{e}");
    assert!(!e.contains("invalid value"), "{e}");
    let o = precopy(&["migrate", "--mem", "1.5G"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("fractions are not accepted"), "{e}");
}

#[test]
fn rate_limited_migration_keeps_reporting_progress() {
    // 1 byte/s is a legitimate setting: without a terminal the status line is printed once
    // a second so the user sees it is alive.
    let mut child = Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args(["migrate", "--max-bandwidth", "1", "--mem", "16M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run precopy");
    std::thread::sleep(std::time::Duration::from_millis(2600));
    child.kill().unwrap();
    let o = child.wait_with_output().unwrap();
    let e = stderr(&o);
    let progress = e.lines().filter(|l| l.contains("| pass ")).count();
    assert!(progress >= 2, "{e}");
    assert!(e.contains("active | pass 1 | sent"), "{e}");
}

#[test]
fn stream_errors_name_the_offset_once_and_inspect_json_carries_it() {
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("not-a-stream.bin");
    std::fs::write(&path, b"this is not a migration stream").unwrap();
    let uri = format!("file:{}", path.display());
    let o = precopy(&["incoming", &uri, "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = json(&o);
    let desc = v["error-desc"].as_str().unwrap();
    assert_eq!(desc.matches("byte").count(), 1, "{desc}");
    assert!(desc.contains("at byte 0"), "{desc}");

    let o = precopy(&["inspect", "--json", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = json(&o);
    assert!(
        v["error-desc"].as_str().unwrap().contains("at byte 0"),
        "{v}"
    );
    assert_eq!(v["offset"], 0, "{v}");
    // Not a stream problem (no such file): no offset.
    let o = precopy(&["inspect", "--json", "/nonexistent-precopy-stream"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(json(&o)["offset"].is_null());
}

/// `precopy migrate --mem MEM --dirty-rate 0 --to URI --json`: an idle
/// simulated guest sent to `uri`.
fn migrate_json_to(mem: &str, uri: &str) -> std::process::Output {
    precopy(&[
        "migrate",
        "--mem",
        mem,
        "--dirty-rate",
        "0",
        "--to",
        uri,
        "--json",
    ])
}
