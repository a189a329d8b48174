//! `precopy inspect` as a user runs it: on the real QEMU vectors (xz), on
//! our own stream through stdin and as zstd, and on a broken stream.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use precopy_stream::{RamBlockInfo, StreamWriter};

/// True (after a `SKIPPED` line) when the QEMU vectors are absent; panics
/// instead under `PRECOPY_REQUIRE_VECTORS=1` (see `precopy_testsupport`).
fn skipped(test: &str) -> bool {
    precopy_testsupport::vectors_or_skip(test).is_none()
}

/// The QEMU vectors folder (call after `skipped` said they are present).
fn vectors_dir() -> PathBuf {
    precopy_testsupport::Vectors::locate()
        .unwrap_or_else(|e| panic!("{e}"))
        .dir()
        .to_path_buf()
}

fn inspect(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_precopy"))
        .arg("inspect")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run precopy");
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(vectors_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check_qemu_vector(file: &str, key: &str) {
    let path = vectors_dir().join(file);
    let v = json_of(&inspect(&["--json", path.to_str().unwrap()], None));
    let e = expected();
    let blocks = v["blocks"].as_array().unwrap();
    let want = e["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), want.len());
    for (b, w) in blocks.iter().zip(want) {
        assert_eq!(b["name"], w["name"]);
        assert_eq!(b["length"], w["length"]);
        assert_eq!(b["sha256"], w["sha256"]);
    }
    let s = &e[key];
    for k in ["zero", "page", "xbzrle"] {
        assert_eq!(v["records"][k], s["records"][k], "{file} {k}");
    }
    assert_eq!(v["records"]["mem_size"], 1);
    assert_eq!(v["bytes"], s["ram_data_ends_at"]);
    assert_eq!(v["stopped_at"]["offset"], s["ram_data_ends_at"]);
    assert_eq!(v["stopped_at"]["section"]["name"], "timer");
    assert_eq!(v["machine_type"], e["machine_type_in_stream"]);
    assert_eq!(v["compression"], "xz");
    assert_eq!(v["vm_description"]["devices"], 31);
}

#[test]
fn inspect_xbzrle_vector() {
    if skipped("inspect_xbzrle_vector") {
        return;
    }
    check_qemu_vector("xbzrle-stream.bin.xz", "xbzrle_stream");
    let e = expected();
    let path = vectors_dir().join("xbzrle-stream.bin.xz");
    let v = json_of(&inspect(&["--json", path.to_str().unwrap()], None));
    assert_eq!(
        v["xbzrle"]["delta_bytes"],
        e["xbzrle_stream"]["xbzrle_encoded_bytes_total"]
    );
    assert_eq!(v["records"]["eos"], e["xbzrle_stream"]["eos_markers"]);
    assert_eq!(
        v["vm_description"]["offset"],
        e["xbzrle_stream"]["vmdescription_at"]
    );
}

#[test]
fn inspect_plain_vector_text() {
    if skipped("inspect_plain_vector_text") {
        return;
    }
    check_qemu_vector("plain-stream.bin.xz", "plain_stream");
    let path = vectors_dir().join("plain-stream.bin.xz");
    let out = inspect(&[path.to_str().unwrap()], None);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("machine type: pc-i440fx-7.2"), "{text}");
    assert!(text.contains("9ed1ad8818e6f0fe9282ee515342049918b7c992fb763aefdc1e8ae12bc9cdae"));
    assert!(
        text.contains("stopped at byte 62147296: FULL section 'timer'"),
        "{text}"
    );
}

fn our_stream() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.write_header("pc-q35-7.2").unwrap();
    w.ram_setup(&[RamBlockInfo::new("pc.ram", 4 * 4096)])
        .unwrap();
    w.begin_ram_iteration().unwrap();
    w.write_page(0, 0, &[0x11; 4096]).unwrap();
    w.write_zero_page(0, 4096).unwrap();
    w.end_ram_section().unwrap();
    w.begin_ram_complete().unwrap();
    w.write_xbzrle_page(0, 0, &[3, 1, 0x22]).unwrap();
    w.end_ram_section().unwrap();
    w.write_device_state("precopy/vcpu", 0, 1, &[0; 100])
        .unwrap();
    w.write_eof().unwrap();
    w.write_vm_description(br#"{"page_size": 4096, "devices": []}"#)
        .unwrap();
    w.finish().unwrap()
}

#[test]
fn inspect_our_stream_from_stdin_plain_and_zstd() {
    let s = our_stream();
    let mut page = [0x11u8; 4096];
    page[3] = 0x22;
    let mut ram = page.to_vec();
    ram.resize(4 * 4096, 0);
    let want_sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&ram)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let zst = zstd::encode_all(&s[..], 3).unwrap();
    for input in [&s[..], &zst[..]] {
        let v = json_of(&inspect(&["--json", "-"], Some(input)));
        assert_eq!(v["blocks"][0]["sha256"], want_sha.as_str());
        assert_eq!(v["records"]["page"], 1);
        assert_eq!(v["records"]["zero"], 1);
        assert_eq!(v["records"]["xbzrle"], 1);
        assert_eq!(v["records"]["eos"], 3);
        assert_eq!(v["bytes"], s.len() as u64);
        assert_eq!(v["stopped_at"]["reason"], "end of stream (EOF)");
        assert_eq!(v["device_states"][0]["name"], "precopy/vcpu");
        assert_eq!(v["device_states"][0]["length"], 100);
        assert_eq!(v["vm_description"]["devices"], 0);
    }
    let v = json_of(&inspect(&["--json", "-"], Some(&zst)));
    assert_eq!(v["compression"], "zstd");
}

#[test]
fn inspect_reports_errors_with_their_offset() {
    let s = our_stream();
    // Cut inside the first PAGE record.
    let cut = &s[..200];
    let out = inspect(&["-"], Some(cut));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid stream at byte") && err.contains("truncated"),
        "{err}"
    );
    // A ZERO record with fill byte 0x41.
    let mut bad = s.clone();
    let zero_at = bad.windows(2).position(|w| w == [0x10, 0x22]).unwrap() + 1;
    bad[zero_at + 1] = 0x41;
    let out = inspect(&["--json", "-"], Some(&bad));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("byte {}", zero_at - 7)), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error-desc"].as_str().unwrap().contains("fill byte 0x41"));
    // A missing file.
    let out = inspect(&["/nonexistent/stream.bin"], None);
    assert!(!out.status.success());
}

#[test]
fn inspect_into_a_closed_pipe_does_not_panic() {
    let s = our_stream();
    let mut child = Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args(["inspect", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run precopy");
    drop(child.stdout.take()); // as `precopy inspect - | head -c0` would
    child.stdin.take().unwrap().write_all(&s).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
