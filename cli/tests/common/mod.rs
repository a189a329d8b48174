//! Running the `precopy` binary as a user does, for the CLI's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::process::{Command, Output, Stdio};

/// Runs `precopy ARGS` with no stdin and returns its status and output.
pub(crate) fn precopy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run precopy")
}

/// Its stderr as text.
pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The single JSON value on its stdout (panics with stdout and stderr when there is none).
pub(crate) fn json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{e}: stdout {out:?}, stderr {:?}", stderr(o)))
}
