//! The source side of a transport: connect, create or spawn, then write.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use super::{MigrationSink, MigrationUri, TransportError, inherited_fd};

enum OutKind {
    Tcp(TcpStream),
    Unix(UnixStream),
    File(File),
    Exec(Child, Option<ChildStdin>),
}

/// The source side of a transport: a byte sink.
pub struct Outgoing {
    kind: OutKind,
    uri: String,
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing").field("uri", &self.uri).finish()
    }
}

/// A handle that aborts a blocked transport from another thread (used by cancel).
#[derive(Debug)]
pub struct AbortHandle(Vec<AbortKind>);

#[derive(Debug)]
enum AbortKind {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// An abort handle for a TCP connection (empty when the socket cannot be cloned).
pub(super) fn abort_tcp(s: &TcpStream) -> AbortHandle {
    AbortHandle(s.try_clone().ok().map(AbortKind::Tcp).into_iter().collect())
}

/// An abort handle for a Unix connection (empty when the socket cannot be cloned).
pub(super) fn abort_unix(s: &UnixStream) -> AbortHandle {
    AbortHandle(
        s.try_clone()
            .ok()
            .map(AbortKind::Unix)
            .into_iter()
            .collect(),
    )
}

impl AbortHandle {
    /// Shut the connection down (both directions); blocked reads and writes return.
    pub fn abort(&self) {
        for k in &self.0 {
            match k {
                AbortKind::Tcp(s) => {
                    let _ = s.shutdown(Shutdown::Both);
                }
                AbortKind::Unix(s) => {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// One handle that aborts every connection of `handles` (a multifd migration's).
    pub fn join(handles: impl IntoIterator<Item = AbortHandle>) -> AbortHandle {
        AbortHandle(handles.into_iter().flat_map(|h| h.0).collect())
    }
}

impl Outgoing {
    /// Open the transport for `uri` (connect, create, spawn).
    pub fn open(uri: &str) -> Result<Outgoing, TransportError> {
        let parsed: MigrationUri = uri.parse()?;
        let io = TransportError::io_for(uri);
        let kind = match parsed {
            MigrationUri::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| io("resolve", e))?
                    .collect();
                let s = TcpStream::connect(&addrs[..]).map_err(|e| io("connect to", e))?;
                let _ = s.set_nodelay(true);
                OutKind::Tcp(s)
            }
            MigrationUri::Unix(p) => {
                OutKind::Unix(UnixStream::connect(p).map_err(|e| io("connect to", e))?)
            }
            MigrationUri::File(p) => OutKind::File(File::create(p).map_err(|e| io("create", e))?),
            MigrationUri::Exec(cmd) => {
                let mut child = Command::new("sh")
                    .arg("-c")
                    .arg(&cmd)
                    .stdin(Stdio::piped())
                    .spawn()
                    .map_err(|e| io("spawn", e))?;
                let stdin = child.stdin.take();
                OutKind::Exec(child, stdin)
            }
            MigrationUri::Fd(n) => OutKind::File(inherited_fd(n, uri)?),
        };
        Ok(Outgoing {
            kind,
            uri: uri.to_owned(),
        })
    }

    /// Bound how long one write may block (`None`: forever); sockets only, a no-op for
    /// files and commands. A write that times out fails with `WouldBlock`/`TimedOut`.
    pub fn set_write_timeout(&self, t: Option<Duration>) {
        match &self.kind {
            OutKind::Tcp(s) => {
                let _ = s.set_write_timeout(t);
            }
            OutKind::Unix(s) => {
                let _ = s.set_write_timeout(t);
            }
            _ => {}
        }
    }

    /// The URI this transport was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A handle that can abort blocked I/O from another thread (sockets only; files and
    /// pipes do not block indefinitely on a live peer, and exec children are killed on drop).
    pub fn abort_handle(&self) -> AbortHandle {
        match &self.kind {
            OutKind::Tcp(s) => abort_tcp(s),
            OutKind::Unix(s) => abort_unix(s),
            _ => AbortHandle(Vec::new()),
        }
    }

    /// Flush and close (see [`MigrationSink::close`]). For `exec:` waits for the command
    /// and fails if it failed.
    pub fn finish(mut self) -> io::Result<()> {
        self.close()
    }
}

/// How long closing a socket waits for the destination to close its end
/// ([`MigrationSink::close`] of [`Outgoing`]).
pub const END_CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// After our end was shut down for writing: wait until the destination closes its end.
///
/// A destination closes once it has read the stream to its end (ours, and QEMU's, which
/// reads the VM description "so the sender does not error"). A clean close (read returns 0)
/// means it read everything: a socket closed with our bytes still unread is reset
/// instead, and the read fails. Bytes the destination sends meanwhile are ignored.
fn await_peer_close(s: &mut impl Read) -> io::Result<()> {
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "the destination did not confirm that it read the whole stream \
                         (its end of the connection did not close cleanly within {} s): {e}",
                        END_CONFIRM_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
    }
}

/// Closing flushes, then: for a socket, shuts it down for writing and waits (at most
/// [`END_CONFIRM_TIMEOUT`]) for the destination to close its end, which it does once it
/// has read the whole stream, so the source says completed only once the destination has
/// everything (an error otherwise); syncs a file; or closes an `exec:` command's stdin and
/// waits for it (an error if it failed). Writes after that fail.
impl MigrationSink for Outgoing {
    fn close(&mut self) -> io::Result<()> {
        self.flush()?;
        match &mut self.kind {
            OutKind::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Write);
                s.set_read_timeout(Some(END_CONFIRM_TIMEOUT))?;
                await_peer_close(s)
            }
            OutKind::Unix(s) => {
                let _ = s.shutdown(Shutdown::Write);
                s.set_read_timeout(Some(END_CONFIRM_TIMEOUT))?;
                await_peer_close(s)
            }
            OutKind::File(f) => f.sync_data().or(Ok(())),
            OutKind::Exec(child, stdin) => {
                drop(stdin.take());
                let st = child.wait()?;
                if st.success() {
                    Ok(())
                } else {
                    Err(io::Error::other(format!("exec command exited with {st}")))
                }
            }
        }
    }
}

impl Write for Outgoing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.kind {
            OutKind::Tcp(s) => s.write(buf),
            OutKind::Unix(s) => s.write(buf),
            OutKind::File(f) => f.write(buf),
            OutKind::Exec(_, Some(s)) => s.write(buf),
            OutKind::Exec(_, None) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.kind {
            OutKind::Tcp(s) => s.flush(),
            OutKind::Unix(s) => s.flush(),
            OutKind::File(f) => f.flush(),
            OutKind::Exec(_, Some(s)) => s.flush(),
            OutKind::Exec(_, None) => Ok(()),
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let OutKind::Exec(child, stdin) = &mut self.kind {
            drop(stdin.take());
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
