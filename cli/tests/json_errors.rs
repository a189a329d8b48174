//! One JSON error key everywhere: every `--json` failure of `precopy migrate`,
//! `precopy incoming` and `precopy inspect` says why under QEMU's `error-desc` (never
//! `error`), for the simulated guest and for `--guest kvm`; and `--guest kvm` goes through
//! the same migrate / incoming paths as the simulated guest.

use std::path::PathBuf;

mod common;
use common::{json, precopy};

/// Exit status 1 and a JSON object whose failure reason is under `error-desc` only;
/// returns the object.
fn failed_with_error_desc(args: &[&str]) -> serde_json::Value {
    let o = precopy(args);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {}", common::stderr(&o));
    let v = json(&o);
    let desc = v["error-desc"].as_str();
    assert!(desc.is_some_and(|d| !d.is_empty()), "{args:?}: {v}");
    assert!(v.get("error").is_none(), "{args:?}: {v}");
    v
}

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Migrates a 16 MiB guest of kind `guest` (idle) to `file:` a temp file called `name`;
/// returns the URI and the `--json` object, once the migration succeeded.
fn migrate_to_file(guest: &str, name: &str) -> (String, serde_json::Value) {
    let file = format!("file:{}", tmp(name).display());
    let o = precopy(&[
        "migrate",
        "--guest",
        guest,
        "--mem",
        "16M",
        "--dirty-rate",
        "0",
        "--to",
        &file,
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    (file, json(&o))
}

/// Whether a KVM guest can run here; prints why a test is skipped when not (and panics
/// instead when PRECOPY_REQUIRE_KVM=1).
fn kvm_available(test: &str) -> bool {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    let probe = precopy_engine::kvm::KvmVm::probe().map_err(|e| e.to_string());
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    let probe: Result<(), String> = Err("--guest kvm needs Linux on x86_64".into());
    precopy_testsupport::kvm_or_skip(test, probe)
}

#[test]
fn failed_migrate_uses_error_desc() {
    // Nobody listening: the migration cannot start.
    let v = failed_with_error_desc(&[
        "migrate",
        "--mem",
        "16M",
        "--to",
        "tcp:127.0.0.1:1",
        "--json",
    ]);
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["verified"], false, "{v}");
    // The destination goes away: the engine's query-migrate object says why.
    let v = failed_with_error_desc(&[
        "migrate",
        "--mem",
        "8M",
        "--dirty-rate",
        "0",
        "--to",
        "exec:false",
        "--json",
    ]);
    assert_eq!(v["status"], "failed", "{v}");
    // A URI we do not know.
    let v = failed_with_error_desc(&["migrate", "--mem", "8M", "--to", "rdma:x", "--json"]);
    assert_eq!(v["verified"], false, "{v}");
}

#[test]
fn failed_kvm_migrate_uses_error_desc() {
    if !kvm_available("failed_kvm_migrate_uses_error_desc") {
        return;
    }
    for to in ["tcp:127.0.0.1:1", "exec:false"] {
        let v = failed_with_error_desc(&[
            "migrate", "--guest", "kvm", "--mem", "16M", "--to", to, "--json",
        ]);
        assert_eq!(v["status"], "failed", "{to}: {v}");
        // A failed migration claims no verification, as for the simulated guest.
        assert_eq!(v["verified"], false, "{to}: {v}");
    }
}

#[test]
fn failed_incoming_uses_error_desc() {
    // Not a stream.
    let path = tmp("json-errors-not-a-stream.bin");
    std::fs::write(&path, b"this is not a migration stream").unwrap();
    let uri = format!("file:{}", path.display());
    for guest in ["sim", "kvm"] {
        let v = failed_with_error_desc(&["incoming", &uri, "--guest", guest, "--json"]);
        assert_eq!(v["status"], "failed", "{guest}: {v}");
        assert_eq!(v["verified"], false, "{guest}: {v}");
        assert!(
            v["error-desc"].as_str().unwrap().contains("at byte 0"),
            "{v}"
        );
    }
    // Nothing to listen on.
    let v = failed_with_error_desc(&["incoming", "unix:/nonexistent-precopy/dir/sock", "--json"]);
    assert_eq!(v["bytes"], 0, "{v}");
    // No such file.
    failed_with_error_desc(&["incoming", "file:/nonexistent-precopy-stream", "--json"]);
}

#[test]
fn kvm_incoming_of_a_stream_without_vcpu_state_uses_error_desc() {
    if !kvm_available("kvm_incoming_of_a_stream_without_vcpu_state_uses_error_desc") {
        return;
    }
    // A simulated guest's stream: good RAM, but no precopy/vcpu section to resume from.
    let (file, _) = migrate_to_file("sim", "json-errors-sim-stream.bin");
    let v = failed_with_error_desc(&["incoming", "--guest", "kvm", &file, "--json"]);
    // The stream was read, but no guest could be built from it: a failed migration.
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["verified"], false, "{v}");
    assert!(
        v["error-desc"].as_str().unwrap().contains("precopy/vcpu"),
        "{v}"
    );
    // The text report says the same: failed, and not "verified: yes".
    let o = precopy(&["incoming", "--guest", "kvm", &file]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Migration status: failed"), "{out}");
    assert!(!out.contains("verified: yes"), "{out}");
    assert!(out.contains("precopy/vcpu"), "{out}");
}

#[test]
fn inspect_json_error_uses_error_desc_with_the_offset() {
    let path = tmp("json-errors-inspect.bin");
    std::fs::write(&path, b"this is not a migration stream").unwrap();
    let v = failed_with_error_desc(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(
        v["error-desc"].as_str().unwrap().contains("at byte 0"),
        "{v}"
    );
    assert_eq!(v["offset"], 0, "{v}");
    let v = failed_with_error_desc(&["inspect", "--json", "/nonexistent-precopy-stream"]);
    assert!(v["offset"].is_null(), "{v}");
}

#[test]
fn kvm_guest_through_a_file_verifies_on_both_sides() {
    if !kvm_available("kvm_guest_through_a_file_verifies_on_both_sides") {
        return;
    }
    // The source loads the file back, compares RAM and resumes a VM from it.
    let (file, v) = migrate_to_file("kvm", "json-errors-kvm-stream.bin");
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["guest"]["self_check"], "ok", "{v}");
    // `precopy incoming --guest kvm` takes the same file through the one incoming path.
    let o = precopy(&["incoming", "--guest", "kvm", &file, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    let v = json(&o);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert!(v["normal-pages"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["guest"]["self_check"], "ok", "{v}");
}
