//! `precopy relay` as a user runs it, between `precopy migrate` and `precopy incoming`
//! (three processes, unix sockets): the destination verifies the RAM digest the source
//! sent through the relay; a destination that is not there fails the relay (naming the
//! destination side) and the source.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::json;

fn sock(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("precopy-relay-{}-{name}.sock", std::process::id()))
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run precopy")
}

/// Waits until `p` exists (a unix listener is bound), at most 30 s.
fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn uri(p: &Path) -> String {
    format!("unix:{}", p.display())
}

#[test]
fn migrate_through_the_relay_verifies_at_the_destination() {
    for xbzrle in ["on", "off"] {
        let (a, b) = (sock(&format!("a-{xbzrle}")), sock(&format!("b-{xbzrle}")));
        let dest = spawn(&["incoming", &uri(&b), "--json"]);
        wait_for(&b);
        let relay = spawn(&[
            "relay",
            "--from",
            &uri(&a),
            "--to",
            &uri(&b),
            "--xbzrle",
            xbzrle,
            "--json",
        ]);
        wait_for(&a);
        let src = spawn(&[
            "migrate",
            "--mem",
            "16M",
            "--workload",
            "mix",
            "--xbzrle",
            "on",
            "--max-bandwidth",
            "64M",
            "--to",
            &uri(&a),
            "--json",
        ]);
        let (src, relay, dest) = (
            src.wait_with_output().unwrap(),
            relay.wait_with_output().unwrap(),
            dest.wait_with_output().unwrap(),
        );
        let (s, r, d) = (json(&src), json(&relay), json(&dest));
        assert_eq!(s["status"], "completed", "{s}");
        assert_eq!(r["status"], "completed", "{r}");
        assert_eq!(d["status"], "completed", "{d}");
        assert_eq!(d["verified"], true, "{d}");
        assert!(r["failed-side"].is_null());
        // The destination read every byte the relay wrote.
        assert_eq!(r["bytes-out"], d["bytes"], "{r} {d}");
        assert!(
            r["bytes-in"].as_u64().unwrap() >= r["pages-in"]["normal"].as_u64().unwrap() * 4096
        );
        if xbzrle == "off" {
            assert_eq!(r["pages-out"]["xbzrle"], 0, "{r}");
        }
        assert_eq!(src.status.code(), Some(0));
        assert_eq!(relay.status.code(), Some(0));
        assert_eq!(dest.status.code(), Some(0));
    }
}

#[test]
fn a_missing_destination_fails_the_relay_and_the_source() {
    let (a, b) = (sock("a-missing"), sock("b-missing"));
    let relay = spawn(&["relay", "--from", &uri(&a), "--to", &uri(&b), "--json"]);
    wait_for(&a);
    let src = spawn(&["migrate", "--mem", "16M", "--to", &uri(&a), "--json"]);
    let (src, relay) = (
        src.wait_with_output().unwrap(),
        relay.wait_with_output().unwrap(),
    );
    let r = json(&relay);
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["failed-side"], "destination", "{r}");
    assert!(
        r["error-desc"]
            .as_str()
            .unwrap()
            .starts_with("destination:"),
        "{r}"
    );
    assert_eq!(relay.status.code(), Some(1));
    let s = json(&src);
    assert_eq!(s["status"], "failed", "{s}");
    assert_eq!(src.status.code(), Some(1));
}

#[test]
fn a_stray_connection_never_reaches_the_destination() {
    use std::io::Write as _;
    use std::os::unix::net::{UnixListener, UnixStream};
    let (a, b) = (sock("a-stray"), sock("b-stray"));
    let _ = std::fs::remove_file(&b);
    let dest = UnixListener::bind(&b).unwrap();
    dest.set_nonblocking(true).unwrap();
    let relay = spawn(&["relay", "--from", &uri(&a), "--to", &uri(&b), "--json"]);
    wait_for(&a);
    let mut c = UnixStream::connect(&a).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    drop(c);
    let relay = relay.wait_with_output().unwrap();
    let r = json(&relay);
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["failed-side"], "source", "{r}");
    assert_eq!(relay.status.code(), Some(1));
    // The destination was never connected to.
    assert_eq!(
        dest.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    std::fs::remove_file(&b).unwrap();
}

#[test]
fn a_bad_destination_uri_is_refused_before_listening() {
    let a = sock("a-bad-uri");
    let o = common::precopy(&["relay", "--from", &uri(&a), "--to", "bogus:x", "--json"]);
    let r = json(&o);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(r["failed-side"], "destination", "{r}");
    assert!(!a.exists(), "the relay listened anyway");
}
