//! `precopy migrate --multifd on` as a user runs it: against `precopy incoming` over a unix
//! socket (two processes; the destination follows the source and verifies the digest),
//! into the in-process destination with 1 and 4 channels, and refused for a file.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::json;

fn precopy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_precopy"));
    c.stdin(Stdio::null());
    c
}

/// `precopy incoming unix:<tmp>/precopy-NAME-PID.sock --json`, once its socket exists:
/// the process (stdout and stderr piped), the socket path, the URI.
fn incoming_on_unix(name: &str) -> (std::process::Child, PathBuf, String) {
    let sock: PathBuf =
        std::env::temp_dir().join(format!("precopy-{name}-{}.sock", std::process::id()));
    let uri = format!("unix:{}", sock.display());
    let dest = precopy()
        .args(["incoming", &uri, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    (dest, sock, uri)
}

#[test]
fn migrate_with_multifd_to_precopy_incoming_over_unix() {
    let (dest, _, uri) = incoming_on_unix("multifd");
    let src = precopy()
        .args([
            "migrate",
            "--mem",
            "32M",
            "--workload",
            "mix",
            "--multifd",
            "on",
            "--multifd-channels",
            "3",
            "--max-bandwidth",
            "64M",
            "--to",
            &uri,
            "--json",
        ])
        .output()
        .unwrap();
    let dest = dest.wait_with_output().unwrap();
    let s = json(&src);
    let d = json(&dest);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(d["verified"], true, "{d}");
    assert_eq!(d["multifd-channels"], 3, "{d}");
    assert_eq!(s["multifd-channels"], 3, "{s}");
    assert_eq!(
        d["bytes"], s["ram"]["transferred"],
        "every byte sent was read"
    );
    assert!(
        s["ram"]["multifd-bytes"].as_u64().unwrap() > 16 << 20,
        "{s}"
    );
    assert!(src.status.success() && dest.status.success());
}

/// A stray that sends garbage to a waiting `precopy incoming` is refused and said on
/// stderr at once; the destination waits on, and the real source's migration lands.
#[test]
fn incoming_refuses_a_garbage_stray_and_waits_for_its_source() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let (mut dest, sock, uri) = incoming_on_unix("stray");
    let mut stray = UnixStream::connect(&sock).unwrap();
    stray.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    // The refusal is said before any source came: read stderr up to it.
    let mut err = BufReader::new(dest.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while !seen.contains("refused a connection") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "stderr ended: {seen}"
        );
        seen.push_str(&line);
    }
    assert!(seen.contains("first four bytes 0x5353482d"), "{seen}");
    let src = precopy()
        .args(["migrate", "--mem", "16M", "--to", &uri, "--json"])
        .output()
        .unwrap();
    let dest = dest.wait_with_output().unwrap();
    let s = json(&src);
    let d = json(&dest);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["multifd-channels"], 0, "{s}");
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(d["verified"], true, "{d}");
    let refused = d["refused-connections"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{d}");
    drop(stray);
}

/// At a limit of 256 open files (below the destination's own caps), 150 silent strays
/// and 150 page hellos of other migrations held open exhaust the descriptors: the oldest
/// give way ("too many connections waiting"), so a 4-channel source still lands.
#[test]
fn incoming_out_of_file_descriptors_lets_the_oldest_strays_give_way() {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let uri = format!("tcp:{addr}");
    let dest = Command::new("bash")
        .args([
            "-c",
            "ulimit -Sn 256 && ulimit -Hn 256 && exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_precopy"),
            "incoming",
            &uri,
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut strays = Vec::new();
    while strays.is_empty() {
        match TcpStream::connect(&addr) {
            Ok(s) => strays.push(s),
            Err(_) => {
                assert!(t.elapsed() < Duration::from_secs(30), "no listener");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    for i in 0..300u32 {
        let mut s = TcpStream::connect(&addr).unwrap();
        if i % 2 == 0 {
            // PCMF, version 1, an id of its own, page channel 1 of 2.
            let mut h = b"PCMF\0\0\0\x01".to_vec();
            h.extend_from_slice(&[0xee; 12]);
            h.extend_from_slice(&i.to_be_bytes());
            h.extend_from_slice(&[0, 1, 0, 2]);
            s.write_all(&h).unwrap();
        }
        strays.push(s);
    }
    let src = precopy()
        .args([
            "migrate",
            "--mem",
            "16M",
            "--multifd",
            "on",
            "--multifd-channels",
            "4",
            "--to",
            &uri,
            "--json",
        ])
        .output()
        .unwrap();
    let dest = dest.wait_with_output().unwrap();
    let s = json(&src);
    let d = json(&dest);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(d["verified"], true, "{d}");
    let refused = d["refused-connections"].as_array().unwrap();
    assert!(
        refused
            .iter()
            .any(|r| r.as_str().unwrap().contains("too many connections")),
        "{d}"
    );
    drop(strays);
}

#[test]
fn migrate_with_multifd_in_process_verifies_and_prints_the_channels() {
    for channels in ["1", "4"] {
        let out = precopy()
            .args([
                "migrate",
                "--mem",
                "32M",
                "--workload",
                "hotset",
                "--multifd",
                "on",
                "--multifd-channels",
                channels,
                "--max-bandwidth",
                "64M",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("multifd: on"), "{text}");
        assert!(
            text.contains(&format!("multifd-channels: {channels}")),
            "{text}"
        );
        assert!(text.contains("verified: yes"), "{text}");
    }
}

#[test]
fn multifd_to_a_file_is_refused_before_anything_starts() {
    let path = std::env::temp_dir().join(format!("precopy-multifd-{}.bin", std::process::id()));
    let out = precopy()
        .args([
            "migrate",
            "--mem",
            "8M",
            "--multifd",
            "on",
            "--to",
            &format!("file:{}", path.display()),
            "--json",
        ])
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["status"], "failed");
    assert!(v["error-desc"].as_str().unwrap().contains("socket"), "{v}");
    assert!(!out.status.success());
    assert!(!path.exists(), "nothing was written");
    let bad = precopy()
        .args([
            "migrate",
            "--mem",
            "8M",
            "--multifd",
            "on",
            "--multifd-channels",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("multifd-channels")
            || String::from_utf8_lossy(&bad.stderr).contains("multifd-channels")
    );
}
