//! The destination side of a transport: bind, open or spawn, accept, then read.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

use super::{MigrationUri, TransportError, inherited_fd};

enum ListenKind {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    Ready(Incoming),
}

/// The destination side before a source connected: bound socket, opened file, or spawned
/// command.
pub struct IncomingListener {
    kind: ListenKind,
    uri: String,
}

impl fmt::Debug for IncomingListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingListener")
            .field("uri", &self.uri)
            .finish()
    }
}

enum InKind {
    Tcp(TcpStream),
    Unix(UnixStream),
    File(File),
    Exec(Child, ChildStdout),
}

/// The destination side of a transport: a byte source.
pub struct Incoming {
    kind: InKind,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Incoming")
    }
}

impl IncomingListener {
    /// Bind / open / spawn for `uri`. `tcp:HOST:0` binds an ephemeral port; see
    /// [`local_uri`](IncomingListener::local_uri). A `unix:` path that is a stale socket
    /// (nobody accepts on it) is replaced; one a live process listens on is refused
    /// (`AddrInUse`), as is any other existing file.
    pub fn bind(uri: &str) -> Result<IncomingListener, TransportError> {
        let parsed: MigrationUri = uri.parse()?;
        let io = TransportError::io_for(uri);
        let kind = match parsed {
            MigrationUri::Tcp { host, port } => ListenKind::Tcp(
                TcpListener::bind((host.as_str(), port)).map_err(|e| io("listen on", e))?,
            ),
            MigrationUri::Unix(p) => {
                if std::fs::symlink_metadata(&p)
                    .map(|m| {
                        use std::os::unix::fs::FileTypeExt;
                        m.file_type().is_socket()
                    })
                    .unwrap_or(false)
                {
                    // A socket file nobody listens on is stale (a crashed run): replace it.
                    // One that accepts connections belongs to a live process: refuse it.
                    if std::os::unix::net::UnixStream::connect(&p).is_ok() {
                        return Err(io(
                            "listen on",
                            io::Error::new(
                                io::ErrorKind::AddrInUse,
                                "another process is listening on this socket",
                            ),
                        ));
                    }
                    let _ = std::fs::remove_file(&p);
                }
                ListenKind::Unix(UnixListener::bind(&p).map_err(|e| io("listen on", e))?, p)
            }
            MigrationUri::File(p) => ListenKind::Ready(Incoming {
                kind: InKind::File(File::open(p).map_err(|e| io("open", e))?),
            }),
            MigrationUri::Exec(cmd) => {
                let mut child = Command::new("sh")
                    .arg("-c")
                    .arg(&cmd)
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(|e| io("spawn", e))?;
                let out = child
                    .stdout
                    .take()
                    .ok_or_else(|| io("spawn", io::Error::other("no stdout pipe")))?;
                ListenKind::Ready(Incoming {
                    kind: InKind::Exec(child, out),
                })
            }
            MigrationUri::Fd(n) => ListenKind::Ready(Incoming {
                kind: InKind::File(inherited_fd(n, uri)?),
            }),
        };
        Ok(IncomingListener {
            kind,
            uri: uri.to_owned(),
        })
    }

    /// Whether this listener accepts connections one after another (`tcp:`, `unix:`)
    /// rather than holding one stream ready (`file:`, `exec:`, `fd:`).
    pub fn accepts_many(&self) -> bool {
        !matches!(self.kind, ListenKind::Ready(_))
    }

    /// The URI a source should use, with the bound port filled in for `tcp:` (e.g.
    /// `tcp:127.0.0.1:40123` after binding `tcp:127.0.0.1:0`).
    pub fn local_uri(&self) -> String {
        match &self.kind {
            ListenKind::Tcp(l) => match l.local_addr() {
                Ok(a) => MigrationUri::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                }
                .to_string(),
                Err(_) => self.uri.clone(),
            },
            _ => self.uri.clone(),
        }
    }

    /// Accept one more connection and keep listening (`tcp:` and `unix:` only; a multifd
    /// destination accepts its main and page channels this way). With `nonblocking`,
    /// `Ok(None)` when no connection is waiting. The connection itself is blocking.
    ///
    /// Errors: [`TransportError::Io`]; [`TransportError::BadUri`] for `file:`, `exec:` and
    /// `fd:`, which have one stream only.
    pub fn accept_next(&self, nonblocking: bool) -> Result<Option<Incoming>, TransportError> {
        let io = |source| TransportError::Io {
            what: "accept on",
            uri: self.uri.clone(),
            source,
        };
        let r = match &self.kind {
            ListenKind::Tcp(l) => {
                l.set_nonblocking(nonblocking).map_err(io)?;
                l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Ok(InKind::Tcp(s))
                })
            }
            ListenKind::Unix(l, _) => {
                l.set_nonblocking(nonblocking).map_err(io)?;
                l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Ok(InKind::Unix(s))
                })
            }
            ListenKind::Ready(_) => {
                return Err(TransportError::BadUri {
                    uri: self.uri.clone(),
                    why: "only tcp: and unix: accept more than one connection",
                });
            }
        };
        match r {
            Ok(kind) => Ok(Some(Incoming { kind })),
            Err(e) if nonblocking && e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// Stop listening; a `unix:` socket file is removed.
    pub fn close(self) {
        if let ListenKind::Unix(_, p) = &self.kind {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Wait for the source (accept one connection).
    pub fn accept(self) -> Result<Incoming, TransportError> {
        let io = |source| TransportError::Io {
            what: "accept on",
            uri: self.uri.clone(),
            source,
        };
        match self.kind {
            ListenKind::Tcp(l) => Ok(Incoming {
                kind: InKind::Tcp(l.accept().map_err(io)?.0),
            }),
            ListenKind::Unix(l, p) => {
                let s = l.accept().map_err(io)?.0;
                let _ = std::fs::remove_file(p);
                Ok(Incoming {
                    kind: InKind::Unix(s),
                })
            }
            ListenKind::Ready(i) => Ok(i),
        }
    }
}

impl Incoming {
    /// Bound how long a read waits (`None`: forever); sockets only, a no-op otherwise.
    ///
    /// Errors: the OS refused the timeout.
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match &self.kind {
            InKind::Tcp(s) => s.set_read_timeout(t),
            InKind::Unix(s) => s.set_read_timeout(t),
            _ => Ok(()),
        }
    }

    /// The socket's file descriptor (tcp: and unix: only).
    pub(crate) fn socket_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match &self.kind {
            InKind::Tcp(s) => Some(s.as_raw_fd()),
            InKind::Unix(s) => Some(s.as_raw_fd()),
            _ => None,
        }
    }

    /// Whether the peer has closed (or reset) the connection, without reading or
    /// waiting: bytes not yet read, or nothing yet, count as open. Sockets only; false
    /// for files and pipes.
    pub fn peer_closed(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match &self.kind {
            InKind::Tcp(s) => s.as_raw_fd(),
            InKind::Unix(s) => s.as_raw_fd(),
            _ => return false,
        };
        let mut b = [0u8; 1];
        // SAFETY: `fd` is this connection's open socket (borrowed from `self` for the
        // call); `b` is a valid 1-byte buffer; MSG_PEEK leaves the byte in the socket and
        // MSG_DONTWAIT makes the call return at once, so the stream is not disturbed.
        let n = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => true,
            n if n > 0 => false,
            _ => !matches!(
                io::Error::last_os_error().kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ),
        }
    }

    /// A handle that shuts the connection down from another thread, so a blocked read
    /// returns (sockets only; a no-op for files and pipes).
    pub fn abort_handle(&self) -> super::AbortHandle {
        match &self.kind {
            InKind::Tcp(s) => super::outgoing::abort_tcp(s),
            InKind::Unix(s) => super::outgoing::abort_unix(s),
            _ => super::AbortHandle::join([]),
        }
    }
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.kind {
            InKind::Tcp(s) => s.read(buf),
            InKind::Unix(s) => s.read(buf),
            InKind::File(f) => f.read(buf),
            InKind::Exec(_, o) => o.read(buf),
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let InKind::Exec(child, _) = &mut self.kind {
            let _ = child.wait();
        }
    }
}
