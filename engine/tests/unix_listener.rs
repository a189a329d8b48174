//! `unix:` listeners: a stale socket file (nobody listening) is replaced, a socket a live
//! process listens on is refused and left working.

use std::os::unix::net::{UnixListener, UnixStream};

use precopy_engine::IncomingListener;

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let p = std::env::temp_dir().join(format!("precopy-unix-listener-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let uri = format!("unix:{}", p.display());
    let live = UnixListener::bind(&p).unwrap();
    let e = IncomingListener::bind(&uri).unwrap_err();
    assert!(
        e.to_string().contains("another process is listening"),
        "{e}"
    );
    // The other process's listener still works.
    UnixStream::connect(&p).unwrap();
    drop(live);
    // Now the file is stale: replaced.
    let l = IncomingListener::bind(&uri).unwrap();
    drop(l);
    let _ = std::fs::remove_file(&p);
}
