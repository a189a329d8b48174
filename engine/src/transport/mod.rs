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
use std::io::{self, Write};
use std::path::PathBuf;
use std::str::FromStr;

mod incoming;
mod outgoing;

pub use incoming::{Incoming, IncomingListener};
pub use outgoing::{AbortHandle, END_CONFIRM_TIMEOUT, Outgoing};

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

impl TransportError {
    /// The constructor of [`TransportError::Io`] for `uri`: `what` was being
    /// done when the OS said `source`.
    pub(crate) fn io_for(uri: &str) -> impl Fn(&'static str, io::Error) -> TransportError + '_ {
        move |what, source| TransportError::Io {
            what,
            uri: uri.to_owned(),
            source,
        }
    }
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

/// A byte sink a migration can be sent to: any `Write + Send`; [`close`](MigrationSink::close)
/// is called once after the last byte (flush by default; [`Outgoing`] also shuts a socket
/// down for writing, syncs a file, or waits for an `exec:` command and fails if it failed).
pub trait MigrationSink: Write + Send {
    /// Called after the stream is complete.
    fn close(&mut self) -> io::Result<()> {
        self.flush()
    }
}

impl MigrationSink for Box<dyn MigrationSink> {
    fn close(&mut self) -> io::Result<()> {
        (**self).close()
    }
}
impl MigrationSink for Vec<u8> {}
impl MigrationSink for io::Sink {}
impl MigrationSink for std::net::TcpStream {}
impl MigrationSink for std::os::unix::net::UnixStream {}
impl MigrationSink for std::fs::File {}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its hard limit,
/// for a destination that accepts many connections: a multifd migration takes one per
/// channel, and strays take theirs until refused. At a soft limit of 1024 (a common
/// default) `accept` fails with EMFILE before the destination's own caps are reached.
/// Returns the soft limit now in force.
///
/// Errors: the OS refused to report or change the limit.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit; getrlimit only fills it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: `r` is a valid rlimit whose soft limit does not exceed its hard limit;
        // setrlimit only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(r.rlim_cur)
}

pub(crate) fn inherited_fd(n: i32, uri: &str) -> Result<File, TransportError> {
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
#[cfg(test)]
mod tests {
    use std::io::Read;

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
