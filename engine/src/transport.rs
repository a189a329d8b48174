//! Transports by URI, spelled as QEMU spells them (`migrate URI`, `-incoming URI`):
//!
//! | URI | source (outgoing) | destination (incoming) |
//! |---|---|---|
//! | `tcp:HOST:PORT` | connect | listen on HOST:PORT, accept one connection |
//! | `unix:PATH` | connect to the socket | bind PATH (removing a stale socket), accept one |
//! | `file:PATH` | create/truncate PATH and write | open PATH and read |
//! | `exec:CMD` | `sh -c CMD`, stream to its stdin | `sh -c CMD`, stream from its stdout |
//! | `fd:N` | write to inherited file descriptor N | read from file descriptor N |
//!
//! An unknown scheme is [`TransportError::UnknownScheme`].

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::str::FromStr;

/// A parsed migration URI.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationUri {
    /// `tcp:HOST:PORT` (HOST may be `[v6addr]`).
    Tcp {
        /// Host name or address, without brackets.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `file:PATH`.
    File(PathBuf),
    /// `exec:CMD` (run with `sh -c`).
    Exec(String),
    /// `fd:N`.
    Fd(i32),
}

/// A transport error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The URI has no scheme or one we do not know.
    #[error(
        "unknown migration URI scheme in {0:?} (expected tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD or fd:N)"
    )]
    UnknownScheme(String),
    /// The URI has a known scheme but a malformed rest.
    #[error("bad migration URI {uri:?}: {why}")]
    BadUri {
        /// The URI.
        uri: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Connecting, binding, opening or spawning failed.
    #[error("{what} {uri}: {source}")]
    Io {
        /// What was being done (`connect to`, `listen on`, ...).
        what: &'static str,
        /// The URI.
        uri: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl FromStr for MigrationUri {
    type Err = TransportError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let bad = |why| TransportError::BadUri {
            uri: uri.to_owned(),
            why,
        };
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| TransportError::UnknownScheme(uri.to_owned()))?;
        match scheme {
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("expected HOST:PORT"))?;
                let port = port
                    .parse()
                    .map_err(|_| bad("port is not a number 0..=65535"))?;
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                if host.is_empty() {
                    return Err(bad("empty host"));
                }
                Ok(MigrationUri::Tcp {
                    host: host.to_owned(),
                    port,
                })
            }
            "unix" | "file" if rest.is_empty() => Err(bad("empty path")),
            "unix" => Ok(MigrationUri::Unix(rest.into())),
            "file" => Ok(MigrationUri::File(rest.into())),
            "exec" if rest.trim().is_empty() => Err(bad("empty command")),
            "exec" => Ok(MigrationUri::Exec(rest.to_owned())),
            "fd" => rest
                .parse::<i32>()
                .ok()
                .filter(|n| *n >= 0)
                .map(MigrationUri::Fd)
                .ok_or_else(|| bad("fd must be a non-negative number")),
            _ => Err(TransportError::UnknownScheme(uri.to_owned())),
        }
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUri::File(p) => write!(f, "file:{}", p.display()),
            MigrationUri::Exec(c) => write!(f, "exec:{c}"),
            MigrationUri::Fd(n) => write!(f, "fd:{n}"),
        }
    }
}

fn inherited_fd(n: i32, uri: &str) -> Result<File, TransportError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // Check the descriptor is open before taking ownership of it.
    if std::fs::metadata(format!("/proc/self/fd/{n}")).is_err() {
        return Err(TransportError::Io {
            what: "use file descriptor",
            uri: uri.to_owned(),
            source: io::Error::from_raw_os_error(9), // EBADF
        });
    }
    // SAFETY: fd N is open (checked above) and was handed to this process by the operator
    // through the `fd:N` URI, exactly as QEMU's fd: migration takes ownership of a passed
    // descriptor; nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(n) };
    Ok(File::from(owned))
}

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
pub struct AbortHandle(Option<AbortKind>);

#[derive(Debug)]
enum AbortKind {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AbortHandle {
    /// Shut the connection down (both directions); blocked reads and writes return.
    pub fn abort(&self) {
        match &self.0 {
            Some(AbortKind::Tcp(s)) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Some(AbortKind::Unix(s)) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            None => {}
        }
    }
}

impl Outgoing {
    /// Open the transport for `uri` (connect, create, spawn).
    pub fn open(uri: &str) -> Result<Outgoing, TransportError> {
        let parsed: MigrationUri = uri.parse()?;
        let io = |what, source| TransportError::Io {
            what,
            uri: uri.to_owned(),
            source,
        };
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

    /// The URI this transport was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A handle that can abort blocked I/O from another thread (sockets only; files and
    /// pipes do not block indefinitely on a live peer, and exec children are killed on drop).
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(match &self.kind {
            OutKind::Tcp(s) => s.try_clone().ok().map(AbortKind::Tcp),
            OutKind::Unix(s) => s.try_clone().ok().map(AbortKind::Unix),
            _ => None,
        })
    }

    /// Flush and close. For `exec:` waits for the command and fails if it failed.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush()?;
        match &mut self.kind {
            OutKind::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Write);
                Ok(())
            }
            OutKind::Unix(s) => {
                let _ = s.shutdown(Shutdown::Write);
                Ok(())
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
    /// [`local_uri`](IncomingListener::local_uri).
    pub fn bind(uri: &str) -> Result<IncomingListener, TransportError> {
        let parsed: MigrationUri = uri.parse()?;
        let io = |what, source| TransportError::Io {
            what,
            uri: uri.to_owned(),
            source,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_uris() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<MigrationUri>().unwrap(),
            MigrationUri::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<MigrationUri>().unwrap(),
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 4444
            }
        );
        assert_eq!(
            "tcp:[::1]:4444"
                .parse::<MigrationUri>()
                .unwrap()
                .to_string(),
            "tcp:[::1]:4444"
        );
        assert_eq!(
            "unix:/tmp/s".parse::<MigrationUri>().unwrap(),
            MigrationUri::Unix("/tmp/s".into())
        );
        assert_eq!(
            "file:/tmp/f".parse::<MigrationUri>().unwrap(),
            MigrationUri::File("/tmp/f".into())
        );
        assert_eq!(
            "exec:cat > /dev/null".parse::<MigrationUri>().unwrap(),
            MigrationUri::Exec("cat > /dev/null".into())
        );
        assert_eq!("fd:3".parse::<MigrationUri>().unwrap(), MigrationUri::Fd(3));
    }

    #[test]
    fn rejects_bad_uris_clearly() {
        for u in ["rdma:1.2.3.4:5", "http://x", "nothing"] {
            let e = u.parse::<MigrationUri>().unwrap_err();
            assert!(matches!(e, TransportError::UnknownScheme(_)), "{u}: {e:?}");
            assert!(e.to_string().contains("unknown migration URI scheme"));
        }
        for u in [
            "tcp:host",
            "tcp:host:99999",
            "tcp::4",
            "unix:",
            "fd:-1",
            "fd:x",
            "exec: ",
        ] {
            assert!(
                matches!(
                    u.parse::<MigrationUri>(),
                    Err(TransportError::BadUri { .. })
                ),
                "{u}"
            );
        }
    }

    #[test]
    fn file_roundtrip() {
        let dir = std::env::temp_dir().join(format!("precopy-transport-{}", std::process::id()));
        let uri = format!("file:{}", dir.display());
        let mut o = Outgoing::open(&uri).unwrap();
        o.write_all(b"hello").unwrap();
        o.finish().unwrap();
        let mut i = IncomingListener::bind(&uri).unwrap().accept().unwrap();
        let mut s = String::new();
        i.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        let _ = std::fs::remove_file(dir);
    }

    #[test]
    fn exec_failure_is_reported() {
        let mut o = Outgoing::open("exec:cat >/dev/null; exit 3").unwrap();
        o.write_all(b"x").unwrap();
        assert!(o.finish().is_err());
    }
}
