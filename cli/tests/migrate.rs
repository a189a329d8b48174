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
