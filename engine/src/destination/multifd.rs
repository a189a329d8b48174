//! The multifd destination: accept the main channel and the page channels in any order,
//! then load them in parallel with the sync points of [`precopy_stream::multifd`].
//!
//! # Accepting
//!
//! An acceptor thread owns the listener from the start ([`accept_source`]). Each
//! connection's first bytes are read on its own short-lived thread, at most
//! [`HELLO_TIMEOUT`], so no connection holds another up. A plain stream (`QEVM`) that
//! comes before any multifd main channel is the migration: accepting stops. A multifd main
//! channel's hello names a migration (id and number of page channels); page channels that
//! came before it wait for it, and several migrations may gather at once until one has
//! every channel. A connection that does not fit — silent, closed before its fourth byte,
//! neither `QEVM` nor `PCMF`, a bad hello, another migration's id, another channel count, a
//! channel index already taken — is refused ([`ChannelRefused`]) and closed, and the wait
//! or the migration goes on. A migration still incomplete [`GATHER_TIMEOUT`] after its
//! first connection, or whose waiting connections closed, is dropped the same way, so
//! nothing before a migration's stream starts fails the destination. After every channel
//! arrived, any further connection is refused until the migration ends, and one still
//! silent then is refused as [`ChannelRefused::Late`].
//!
//! # Loading
//!
//! The main channel is read on the calling thread with the [`Loader`]; at its MEM_SIZE the
//! RAM is set up and one thread per page channel starts, each decoding its records
//! ([`Decoder::multifd_channel`]), checking that each page is one of the channel's own
//! ([`channel_of_page`]), and applying them ([`PageApplier`]) under a lock on the RAM
//! target (one page at a time). Sync point `k` is a barrier between all of them: a
//! page channel that reads it waits until the main channel read its own `k` and every
//! page channel read theirs; the main channel waits likewise. So no page sent after sync
//! `k` lands before a page sent before it. The migration completes when the main channel
//! reached the end of its stream and every page channel its EOS and the end of its
//! connection. Any error on any connection shuts every other down, so no thread stays
//! blocked, and fails the migration naming the channel and the offset (counted from the
//! first byte after the hello).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use precopy_stream::format::FILE_MAGIC;
use precopy_stream::multifd::{HELLO_LEN, Hello, HelloError, MULTIFD_MAGIC, channel_of_page};
use precopy_stream::{
    Control, Decoder, Item, Limits, LoadStats, Loader, PageApplier, RamBlockInfo, RamRecord,
    RamTarget, StreamReader, TargetError,
};
use xbzrle::Page;

use super::{Counting, IncomingError};
use crate::transport::{AbortHandle, Incoming, IncomingListener, TransportError};

/// How long a connection may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a multifd migration's connections wait, from the first of them, for the rest
/// to connect, unless set with
/// [`Destination::with_gather_timeout`](super::Destination::with_gather_timeout); then
/// they are refused ([`ChannelRefused::Incomplete`]) and the destination waits on for a
/// source.
pub const GATHER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a connection to a multifd destination was refused (the migration goes on).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelRefused {
    /// The hello is malformed or not a multifd hello.
    #[error("refused a connection: {0}")]
    BadHello(#[from] HelloError),
    /// Silent: neither a stream header nor a whole hello within [`HELLO_TIMEOUT`].
    #[error(
        "refused a connection: it sent no migration stream header nor multifd hello within {} s",
        HELLO_TIMEOUT.as_secs()
    )]
    NoHello,
    /// It closed (or reset) before its fourth byte.
    #[error("refused a connection: it closed after {got} bytes, before saying what it is")]
    Closed {
        /// Bytes it sent.
        got: usize,
    },
    /// Its first four bytes are neither `QEVM` (a migration stream) nor `PCMF` (a
    /// multifd hello).
    #[error(
        "refused a connection: first four bytes {found:#010x} are neither a migration stream \
         (0x5145564d \"QEVM\") nor a multifd hello (0x50434d46 \"PCMF\")"
    )]
    NotAMigration {
        /// The first four bytes, big-endian.
        found: u32,
    },
    /// A plain migration stream (`QEVM`) while a multifd migration is connecting (a main
    /// channel whose migration had a connection within [`HELLO_TIMEOUT`]) or runs.
    #[error(
        "refused a connection: a plain migration stream while a multifd migration is connecting or running"
    )]
    PlainStream,
    /// Its migration's other channels did not all connect within the gather timeout
    /// ([`GATHER_TIMEOUT`] by default) of its first; the destination waits on for a source.
    #[error(
        "refused multifd channel {index}: its migration's other channels did not all connect within {waited:?}"
    )]
    Incomplete {
        /// Its channel index.
        index: u16,
        /// The gather timeout.
        waited: Duration,
    },
    /// A channel waiting for the rest of its migration closed (its source gave up); the
    /// destination waits on for a source.
    #[error(
        "refused multifd channel {index}: it closed while waiting for its migration's other channels"
    )]
    Abandoned {
        /// Its channel index.
        index: u16,
    },
    /// It had not said what it is when the destination stopped accepting (the migration
    /// had begun or ended); it was shut down.
    #[error(
        "refused a connection: it had not said what it is when the destination stopped accepting"
    )]
    Late,
    /// The hello names another migration.
    #[error("refused multifd channel {index}: it belongs to another migration")]
    OtherMigration {
        /// Its channel index.
        index: u16,
    },
    /// The hello's channel count differs from the main channel's.
    #[error(
        "refused multifd channel {index}: it says {got} page channels, the migration has {expected}"
    )]
    ChannelCount {
        /// Its channel index.
        index: u16,
        /// Its count.
        got: u16,
        /// The main channel's count.
        expected: u16,
    },
    /// That channel of this migration is already connected (index 0: the main channel).
    #[error("refused multifd channel {index}: it is already connected")]
    Duplicate {
        /// The channel index.
        index: u16,
    },
    /// Too many connections were waiting (for their first bytes, or for their
    /// migration's other channels) at once, or the process ran out of file descriptors:
    /// the oldest gave way to a new connection.
    #[error("refused a connection: too many connections waiting for their migration")]
    TooMany,
}

/// The connections of one multifd migration, in channel order.
pub(super) struct Gathered {
    pub(super) hello: Hello,
    pub(super) main: Incoming,
    pub(super) channels: Vec<Incoming>,
    pub(super) acceptor: Acceptor,
}

/// The acceptor thread: refuses strays until stopped.
pub(super) struct Acceptor {
    stop: Arc<AtomicBool>,
    refusals: Refusals,
    /// This migration's refusals start here in `refusals`.
    from: usize,
    thread: Option<thread::JoinHandle<()>>,
}

impl Acceptor {
    /// Stop accepting; the connections refused so far.
    pub(super) fn finish(mut self) -> Vec<ChannelRefused> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.refusals.since(self.from)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fills `buf` from its `got`-th byte by `deadline` (one read timeout per call, so a
/// connection that drips a byte at a time gets no longer than one that sends nothing).
/// Errors: `NoHello` at the deadline, `Closed { got }` when the peer closes or resets.
fn read_by(
    conn: &mut Incoming,
    buf: &mut [u8],
    mut got: usize,
    deadline: Instant,
) -> Result<(), ChannelRefused> {
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ChannelRefused::NoHello);
        }
        let _ = conn.set_read_timeout(Some(left));
        match conn.read(&mut buf[got..]) {
            Ok(0) => return Err(ChannelRefused::Closed { got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Err(ChannelRefused::Closed { got }),
        }
    }
    Ok(())
}

/// Reads the rest of a hello whose first four bytes were `first4`, by `deadline`.
fn read_hello(
    conn: &mut Incoming,
    first4: [u8; 4],
    deadline: Instant,
) -> Result<Hello, ChannelRefused> {
    let mut b = [0u8; HELLO_LEN];
    b[..4].copy_from_slice(&first4);
    // Four bytes: a wrong magic is refused as such, a right one is "truncated" so far.
    match Hello::parse(&first4) {
        Err(HelloError::Truncated { .. }) | Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    match read_by(conn, &mut b, 4, deadline) {
        Err(ChannelRefused::Closed { got }) => return Err(HelloError::Truncated { got }.into()),
        r => r?,
    }
    Ok(Hello::parse(&b)?)
}

/// Most connections held while migrations gather (channels waiting for the rest of their
/// migration). Beyond it the migration whose first connection is the oldest is dropped
/// ([`ChannelRefused::TooMany`]): a source connecting now beats strays held open.
const MAX_PENDING: usize = 1024;

/// Hellos read at once, one thread each: room for a whole migration at the most
/// channels (255 + the main one) twice over. Beyond it the connection silent the longest
/// is shut down and refused ([`ChannelRefused::TooMany`]), so silent strays cannot keep a
/// source out.
const MAX_HELLO_READERS: usize = 2 * (precopy_stream::multifd::MAX_CHANNELS as usize + 1);

/// How often connections waiting for their migration are checked for a closed peer.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// The connections of one candidate migration (one id) while gathering.
struct Candidate {
    main: Option<(Hello, Incoming)>,
    pages: BTreeMap<u16, (Hello, Incoming)>,
    /// When its first connection came.
    since: Instant,
    /// When its latest connection came.
    last: Instant,
}

/// Matches hellos to migrations: several ids may gather at once (a stray hello must not
/// take the destination over); the first whose main channel and every page channel
/// arrived is the migration, every other connection is then refused.
struct Matcher {
    /// How long a candidate may wait for its channels.
    gather_timeout: Duration,
    cands: HashMap<[u8; 16], Candidate>,
    /// The migration once complete: its id and page-channel count.
    chosen: Option<([u8; 16], u16)>,
}

impl Matcher {
    /// Drops the migration whose first connection is the oldest (other than `keep`): a
    /// `TooMany` per connection; none when there is no other.
    fn evict_oldest(&mut self, keep: Option<[u8; 16]>) -> Vec<ChannelRefused> {
        let oldest = self
            .cands
            .iter()
            .filter(|(id, _)| Some(**id) != keep)
            .min_by_key(|(_, c)| c.since)
            .map(|(id, _)| *id);
        let Some(c) = oldest.and_then(|id| self.cands.remove(&id)) else {
            return Vec::new();
        };
        let n = usize::from(c.main.is_some()) + c.pages.len();
        vec![ChannelRefused::TooMany; n]
    }

    /// Whether a multifd source is connecting: a main channel waits for its page channels
    /// and its migration had a connection within [`HELLO_TIMEOUT`] (a source opens all its
    /// channels at once; a main hello left alone longer is no reason to turn a plain-stream
    /// source away).
    fn connecting(&self) -> bool {
        self.cands
            .values()
            .any(|c| c.main.is_some() && c.last.elapsed() < HELLO_TIMEOUT)
    }

    /// Drops every waiting connection: the destination took another migration or stopped.
    fn refuse_all(&mut self) -> Vec<ChannelRefused> {
        let mut refused = Vec::new();
        for (_, c) in self.cands.drain() {
            for (p, _) in c.main.iter().chain(c.pages.values()) {
                refused.push(ChannelRefused::OtherMigration { index: p.index });
            }
        }
        refused
    }

    /// Drops the waiting connections whose peer closed, and the migrations whose channels
    /// did not all come within the gather timeout: a source that gave up (cancelled while
    /// connecting, or one of its channels failed) or a stray hello must not hold the
    /// destination.
    fn drop_stale(&mut self) -> Vec<ChannelRefused> {
        let mut refused = Vec::new();
        self.cands.retain(|_, c| {
            if c.since.elapsed() < self.gather_timeout {
                return true;
            }
            for (p, _) in c.main.iter().chain(c.pages.values()) {
                refused.push(ChannelRefused::Incomplete {
                    index: p.index,
                    waited: self.gather_timeout,
                });
            }
            false
        });
        for c in self.cands.values_mut() {
            if c.main.as_ref().is_some_and(|(_, conn)| conn.peer_closed()) {
                refused.push(ChannelRefused::Abandoned { index: 0 });
                c.main = None;
            }
            c.pages.retain(|&i, (_, conn)| {
                let closed = conn.peer_closed();
                if closed {
                    refused.push(ChannelRefused::Abandoned { index: i });
                }
                !closed
            });
        }
        self.cands
            .retain(|_, c| c.main.is_some() || !c.pages.is_empty());
        refused
    }

    fn pending(&self) -> usize {
        self.cands
            .values()
            .map(|c| usize::from(c.main.is_some()) + c.pages.len())
            .sum()
    }

    /// Why a connection that came after the migration was chosen is refused.
    fn refusal_after(&self, h: &Hello) -> ChannelRefused {
        match self.chosen {
            Some((id, _)) if id != h.migration_id => {
                ChannelRefused::OtherMigration { index: h.index }
            }
            Some((_, n)) if n != h.channels => ChannelRefused::ChannelCount {
                index: h.index,
                got: h.channels,
                expected: n,
            },
            _ => ChannelRefused::Duplicate { index: h.index },
        }
    }

    /// Takes a connection with its hello. Returns the refusals it causes (its own, or
    /// page channels of its migration that do not fit the main channel's count) and, when
    /// it completes a migration, that migration's connections (every other candidate's
    /// are then refused too).
    fn offer(&mut self, h: Hello, conn: Incoming) -> (Vec<ChannelRefused>, Option<Complete>) {
        if self.chosen.is_some() {
            return (vec![self.refusal_after(&h)], None);
        }
        // Room for it: the migrations that began longest ago give way.
        let mut evicted = Vec::new();
        while self.pending() >= MAX_PENDING {
            let gone = self.evict_oldest(Some(h.migration_id));
            if gone.is_empty() {
                return (vec![ChannelRefused::TooMany], None);
            }
            evicted.extend(gone);
        }
        let (refused, complete) = self.place(h, conn);
        evicted.extend(refused);
        (evicted, complete)
    }

    /// [`offer`](Self::offer) once there is room.
    fn place(&mut self, h: Hello, conn: Incoming) -> (Vec<ChannelRefused>, Option<Complete>) {
        let c = self
            .cands
            .entry(h.migration_id)
            .or_insert_with(|| Candidate {
                main: None,
                pages: BTreeMap::new(),
                since: Instant::now(),
                last: Instant::now(),
            });
        c.last = Instant::now();
        let mut refused = Vec::new();
        if h.index == 0 {
            if c.main.is_some() {
                return (vec![ChannelRefused::Duplicate { index: 0 }], None);
            }
            // Page channels that came first and do not fit this main channel.
            let bad: Vec<u16> = c
                .pages
                .iter()
                .filter(|(i, (p, _))| **i > h.channels || p.channels != h.channels)
                .map(|(i, _)| *i)
                .collect();
            for i in bad {
                if let Some((p, _)) = c.pages.remove(&i) {
                    refused.push(ChannelRefused::ChannelCount {
                        index: i,
                        got: p.channels,
                        expected: h.channels,
                    });
                }
            }
            c.main = Some((h, conn));
        } else {
            if let Some((m, _)) = &c.main
                && m.channels != h.channels
            {
                return (
                    vec![ChannelRefused::ChannelCount {
                        index: h.index,
                        got: h.channels,
                        expected: m.channels,
                    }],
                    None,
                );
            }
            if c.pages.contains_key(&h.index) {
                return (vec![ChannelRefused::Duplicate { index: h.index }], None);
            }
            c.pages.insert(h.index, (h, conn));
        }
        let id = h.migration_id;
        let complete = match &c.main {
            Some((m, _)) => (1..=m.channels).all(|i| c.pages.contains_key(&i)),
            None => false,
        };
        if !complete {
            return (refused, None);
        }
        let mut c = self.cands.remove(&id).expect("present");
        let (m, main) = c.main.take().expect("complete");
        let channels = (1..=m.channels)
            .map(|i| c.pages.remove(&i).expect("complete").1)
            .collect();
        self.chosen = Some((id, m.channels));
        refused.extend(self.refuse_all());
        (refused, Some((m, main, channels)))
    }
}

/// Connections refused so far (in order), and the subscribers told of each as it happens
/// ([`Destination::subscribe_refusals`](super::Destination::subscribe_refusals)).
#[derive(Clone, Default)]
pub(super) struct Refusals(Arc<Mutex<RefusalLog>>);

#[derive(Default)]
struct RefusalLog {
    list: Vec<ChannelRefused>,
    listeners: Vec<mpsc::Sender<ChannelRefused>>,
}

impl Refusals {
    pub(super) fn push(&self, e: ChannelRefused) {
        let mut l = lock(&self.0);
        l.listeners.retain(|tx| tx.send(e.clone()).is_ok());
        l.list.push(e);
    }

    /// How many were refused so far (where one migration's list starts).
    pub(super) fn len(&self) -> usize {
        lock(&self.0).list.len()
    }

    /// The refusals from the `from`-th on.
    pub(super) fn since(&self, from: usize) -> Vec<ChannelRefused> {
        lock(&self.0).list.get(from..).unwrap_or_default().to_vec()
    }

    pub(super) fn subscribe(&self) -> mpsc::Receiver<ChannelRefused> {
        let (tx, rx) = mpsc::channel();
        lock(&self.0).listeners.push(tx);
        rx
    }
}

/// How an incoming migration began, once its first connections said what they are.
pub(super) enum Opened {
    /// A plain stream: its file header (`QEVM` and the version), the connection, and the
    /// connections refused before it.
    Plain([u8; 8], Incoming, Vec<ChannelRefused>),
    /// A multifd migration, every channel connected.
    Multifd(Gathered),
}

/// Waits on `listener` (a socket) for a source: every connection's first bytes are read on
/// its own short-lived thread (at most [`HELLO_TIMEOUT`]), so a silent, slow or garbage
/// connection holds no other up. The first to complete wins:
///
/// - a plain stream (`QEVM`), unless a multifd main channel is already waiting for its page
///   channels: the listener is then closed, as a single-stream destination has one source;
/// - a multifd migration whose main channel and every page channel connected: the acceptor
///   thread keeps the listener, refusing every further connection, until the migration
///   ends ([`Acceptor::finish`]).
///
/// Anything else is refused ([`ChannelRefused`], pushed to `refusals`) and the wait goes
/// on: silence, a connection that closes or resets before its fourth byte, first bytes that
/// are neither `QEVM` nor `PCMF`, a bad hello, a hello that does not fit. The destination
/// waits for its source without a time limit, like QEMU's `-incoming`.
///
/// A multifd migration whose channels have not all connected within `gather_timeout` of
/// its first, or whose waiting connections close, is dropped the same way: no connection
/// before the migration's stream starts can fail the destination.
///
/// Errors: [`IncomingError::Multifd`] when the acceptor thread cannot start or stops.
pub(super) fn accept_source(
    listener: IncomingListener,
    refusals: Refusals,
    gather_timeout: Duration,
) -> Result<Opened, IncomingError> {
    let stop = Arc::new(AtomicBool::new(false));
    let from = refusals.len();
    let (tx, rx) = mpsc::channel();
    let thread = {
        let (stop, refusals) = (Arc::clone(&stop), refusals.clone());
        thread::Builder::new()
            .name("migration-accept".into())
            .spawn(move || accept_loop(listener, &stop, &refusals, gather_timeout, tx))
            .map_err(|e| IncomingError::Multifd {
                why: format!("cannot start the acceptor thread: {e}"),
            })?
    };
    let acceptor = Acceptor {
        stop,
        refusals,
        from,
        thread: Some(thread),
    };
    // The acceptor sends once, when a source came, or drops its end when it stops.
    match rx.recv() {
        Ok(Gathering::Complete((hello, main, channels))) => Ok(Opened::Multifd(Gathered {
            hello,
            main,
            channels,
            acceptor,
        })),
        Ok(Gathering::Plain(magic, conn)) => {
            let refused = acceptor.finish();
            Ok(Opened::Plain(magic, conn, refused))
        }
        Err(_) => {
            let refused = acceptor.finish();
            let list: Vec<String> = refused.iter().map(ToString::to_string).collect();
            Err(IncomingError::Multifd {
                why: format!(
                    "the acceptor thread stopped before a source came (refused: {})",
                    if list.is_empty() {
                        "none".to_owned()
                    } else {
                        list.join("; ")
                    }
                ),
            })
        }
    }
}

type Complete = (Hello, Incoming, Vec<Incoming>);

/// What the acceptor tells [`accept_source`].
enum Gathering {
    /// A multifd migration has every channel.
    Complete(Complete),
    /// A plain stream came first; the acceptor has stopped.
    Plain([u8; 8], Incoming),
}

/// What a connection's first bytes say it is.
enum Opening {
    /// A multifd hello (`PCMF`).
    Hello(Hello),
    /// A plain migration stream: its file header, `QEVM` and the version (a source,
    /// QEMU's or ours, writes both at once; the loader checks the version).
    Plain([u8; 8]),
}

/// Reads the first bytes of a connection, all within [`HELLO_TIMEOUT`] of the start: a
/// whole hello after `PCMF`, the 8-byte file header after `QEVM`.
fn opening_of(conn: &mut Incoming) -> Result<Opening, ChannelRefused> {
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let mut head = [0u8; 8];
    let r = read_by(conn, &mut head[..4], 0, deadline).and_then(|()| {
        let m = [head[0], head[1], head[2], head[3]];
        match u32::from_be_bytes(m) {
            MULTIFD_MAGIC => read_hello(conn, m, deadline).map(Opening::Hello),
            FILE_MAGIC => read_by(conn, &mut head, 4, deadline).map(|()| Opening::Plain(head)),
            found => Err(ChannelRefused::NotAMigration { found }),
        }
    });
    let _ = conn.set_read_timeout(None);
    r
}

/// A reader thread's result: its id, what it read, the connection.
type Opened1 = (u64, Result<Opening, ChannelRefused>, Incoming);

/// The connections whose first bytes are being read: reader id to socket descriptor.
/// Each reader takes itself out (and sends its result) under this lock, and only then
/// may drop its connection; so a descriptor found here is open and still this reader's,
/// and when accepting stops (or a reader must give way) every reader is either still
/// here (its connection is shut down: [`ChannelRefused::Late`] or `TooMany`) or its
/// result is in the channel. No duplicate descriptor is held: at a limit of 1024 open
/// files, 512 readers must not take 1024.
type InFlight = Arc<Mutex<BTreeMap<u64, std::os::fd::RawFd>>>;

/// Shuts down the socket `fd` (both directions), so its reader's blocked read returns.
fn shut_down(fd: std::os::fd::RawFd) {
    // shutdown() closes nothing; it only ends the connection's traffic.
    // SAFETY: `fd` is from the in-flight map, held locked by the caller: it is open and
    // its reader cannot close it before taking it out of the map under that lock.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

fn accept_loop(
    listener: IncomingListener,
    stop: &AtomicBool,
    refusals: &Refusals,
    gather_timeout: Duration,
    tx: mpsc::Sender<Gathering>,
) {
    let mut m = Matcher {
        gather_timeout,
        cands: HashMap::new(),
        chosen: None,
    };
    let (otx, orx) = mpsc::channel::<Opened1>();
    let in_flight: InFlight = Arc::default();
    let mut next_id = 0u64;
    let mut spawn_reader = |mut conn: Incoming| {
        // Room for it: the connection silent the longest gives way (its reader then
        // ends, its result unsent).
        {
            let mut f = lock(&in_flight);
            while f.len() >= MAX_HELLO_READERS {
                if let Some((_, fd)) = f.pop_first() {
                    shut_down(fd);
                    refusals.push(ChannelRefused::TooMany);
                }
            }
        }
        let Some(fd) = conn.socket_fd() else {
            return;
        };
        let id = next_id;
        next_id += 1;
        lock(&in_flight).insert(id, fd);
        let (otx, flight) = (otx.clone(), Arc::clone(&in_flight));
        let spawned = thread::Builder::new()
            .name("migration-hello".into())
            .spawn(move || {
                let r = opening_of(&mut conn);
                let mut f = lock(&flight);
                if f.remove(&id).is_some() {
                    let _ = otx.send((id, r, conn));
                }
            });
        if spawned.is_err() {
            lock(&in_flight).remove(&id);
            refusals.push(ChannelRefused::TooMany);
        }
    };
    // Drops waiting connections that closed or waited too long.
    let sweep = |m: &mut Matcher| {
        for e in m.drop_stale() {
            refusals.push(e);
        }
    };
    let mut last_sweep = Instant::now();
    'accepting: while !stop.load(Ordering::Relaxed) {
        let mut idle = true;
        if m.chosen.is_none() && last_sweep.elapsed() >= SWEEP_EVERY {
            sweep(&mut m);
            last_sweep = Instant::now();
        }
        while let Ok((_, r, conn)) = orx.try_recv() {
            idle = false;
            match r {
                Err(e) => refusals.push(e),
                Ok(Opening::Plain(magic)) => {
                    if m.chosen.is_none() && m.connecting() {
                        // A source that gave up and retries with one stream.
                        sweep(&mut m);
                    }
                    if m.chosen.is_some() || m.connecting() {
                        refusals.push(ChannelRefused::PlainStream);
                        continue;
                    }
                    for e in m.refuse_all() {
                        refusals.push(e);
                    }
                    let _ = tx.send(Gathering::Plain(magic, conn));
                    break 'accepting;
                }
                Ok(Opening::Hello(h)) => {
                    let (refusals_now, complete) = m.offer(h, conn);
                    for e in refusals_now {
                        refusals.push(e);
                    }
                    if let Some(c) = complete {
                        let _ = tx.send(Gathering::Complete(c));
                    }
                }
            }
        }
        match listener.accept_next(true) {
            Ok(Some(conn)) => {
                idle = false;
                spawn_reader(conn);
            }
            Ok(None) => {}
            Err(TransportError::Io { source, .. })
                if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) =>
            {
                // Out of descriptors before the caps: the oldest connection gives way,
                // a reader still waiting for its first bytes, else a migration that
                // began longest ago, so a source connecting now is not shut out.
                let evicted = lock(&in_flight).pop_first().map(|(_, fd)| shut_down(fd));
                match evicted {
                    Some(()) => refusals.push(ChannelRefused::TooMany),
                    None => {
                        for e in m.evict_oldest(None) {
                            refusals.push(e);
                        }
                    }
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
        if idle {
            thread::sleep(Duration::from_millis(5));
        }
    }
    listener.close();
    // Connections still saying what they are: shut down and refused. Results sent before
    // are drained: they came too late as well.
    {
        let mut f = lock(&in_flight);
        for (_, fd) in std::mem::take(&mut *f) {
            shut_down(fd);
            refusals.push(ChannelRefused::Late);
        }
    }
    while let Ok((_, r, _)) = orx.try_recv() {
        refusals.push(match r {
            Err(e) => e,
            Ok(Opening::Hello(h)) if m.chosen.is_some() => m.refusal_after(&h),
            Ok(_) => ChannelRefused::Late,
        });
    }
    for e in m.refuse_all() {
        refusals.push(e);
    }
}

/// The RAM target seen by the main channel's [`Loader`] while page channels write it:
/// MEM_SIZE goes through to the target under the lock; the main channel carries no page
/// records, so it never needs a page.
struct MainView<'a, T> {
    ram: &'a Mutex<T>,
    blocks: Vec<(String, u64)>,
}

impl<T: RamTarget> RamTarget for MainView<'_, T> {
    fn set_blocks(&mut self, blocks: &[RamBlockInfo], max_bytes: u64) -> Result<(), TargetError> {
        lock(self.ram).set_blocks(blocks, max_bytes)?;
        self.blocks = blocks
            .iter()
            .map(|b| (b.name.clone(), b.used_length))
            .collect();
        Ok(())
    }

    fn block_count(&self) -> usize {
        self.blocks.len()
    }

    fn block_info(&self, block: usize) -> Option<(&str, u64)> {
        self.blocks.get(block).map(|(n, l)| (n.as_str(), *l))
    }

    fn page_mut(&mut self, _block: usize, _offset: u64) -> Option<&mut Page> {
        // Page records on the main channel are refused before they reach the loader.
        None
    }

    fn block_parts(&self, _block: usize) -> Vec<&[u8]> {
        // The digest is computed over the target itself once every channel ended.
        Vec::new()
    }
}

/// Sync-point state shared by the main channel and the page channels.
struct Barrier {
    m: Mutex<BarrierState>,
    cv: Condvar,
}

struct BarrierState {
    /// Per page channel: the last sync point it read.
    reached: Vec<u64>,
    /// Per page channel: it read its EOS (or stopped).
    ended: Vec<bool>,
    /// The last sync point every channel went past.
    released: u64,
    /// A connection failed: everyone stops.
    failed: bool,
}

fn multifd_err(why: String) -> IncomingError {
    IncomingError::Multifd { why }
}

/// What a thread that was stopped because another failed returns.
fn stopped() -> IncomingError {
    multifd_err("stopped: another channel failed".into())
}

impl Barrier {
    fn new(n: usize) -> Barrier {
        Barrier {
            m: Mutex::new(BarrierState {
                reached: vec![0; n],
                ended: vec![false; n],
                released: 0,
                failed: false,
            }),
            cv: Condvar::new(),
        }
    }

    fn fail(&self) {
        lock(&self.m).failed = true;
        self.cv.notify_all();
    }

    /// Page channel `i` (0-based) read sync point `seq`: wait until it is released.
    fn channel_reached(&self, i: usize, seq: u64) -> Result<(), IncomingError> {
        let mut st = lock(&self.m);
        if seq != st.reached[i] + 1 {
            return Err(multifd_err(format!(
                "channel {}: sync point {seq} after sync point {}",
                i + 1,
                st.reached[i]
            )));
        }
        st.reached[i] = seq;
        self.cv.notify_all();
        while st.released < seq && !st.failed {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.failed { Err(stopped()) } else { Ok(()) }
    }

    fn channel_ended(&self, i: usize) {
        lock(&self.m).ended[i] = true;
        self.cv.notify_all();
    }

    /// The main channel read sync point `seq`: wait until every page channel read it,
    /// then release them.
    fn main_reached(&self, seq: u64) -> Result<(), IncomingError> {
        let mut st = lock(&self.m);
        if seq != st.released + 1 {
            return Err(multifd_err(format!(
                "main channel: sync point {seq} after sync point {}",
                st.released
            )));
        }
        loop {
            if st.failed {
                return Err(stopped());
            }
            if let Some(i) = (0..st.reached.len()).find(|&i| st.ended[i] && st.reached[i] < seq) {
                return Err(multifd_err(format!(
                    "channel {} ended before sync point {seq}",
                    i + 1
                )));
            }
            if st.reached.iter().all(|&r| r >= seq) {
                break;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.released = seq;
        self.cv.notify_all();
        Ok(())
    }
}

/// What [`load`] returns: the main channel's load (its `image` is unit: the RAM is
/// `target`), the RAM, the connections refused, and the page channels' record counts.
pub(super) struct MultifdLoaded<T> {
    pub(super) loaded: precopy_stream::Loaded<()>,
    pub(super) target: T,
    pub(super) refused: Vec<ChannelRefused>,
    pub(super) page_stats: LoadStats,
}

/// Who failed first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Party {
    Main,
    Channel(usize),
}

fn stream_err(e: precopy_stream::Error) -> IncomingError {
    IncomingError::Stream {
        offset: e.offset(),
        source: e,
    }
}

/// Loads a gathered multifd migration into `target`. `bytes` counts every connection's
/// bytes; `on_first` runs at the first byte.
///
/// Errors: [`IncomingError::Stream`] for the main channel, [`IncomingError::Channel`]
/// for a page channel, [`IncomingError::Multifd`] for the sync rules; the first failure
/// is reported (the others were caused by it: every connection is shut down then).
pub(super) fn load<T: RamTarget + Send>(
    g: Gathered,
    limits: Limits,
    target: T,
    bytes: &Arc<AtomicU64>,
    on_first: Box<dyn FnOnce() + Send>,
) -> Result<MultifdLoaded<T>, IncomingError> {
    let n = g.channels.len();
    let ram = Mutex::new(target);
    let barrier = Barrier::new(n);
    let abort_all = AbortHandle::join(
        std::iter::once(g.main.abort_handle()).chain(g.channels.iter().map(Incoming::abort_handle)),
    );
    let first: Mutex<Option<Party>> = Mutex::new(None);
    let fail = |who: Party| {
        lock(&first).get_or_insert(who);
        barrier.fail();
        abort_all.abort();
    };
    let mut channels: Vec<Option<Incoming>> = g.channels.into_iter().map(Some).collect();
    let (main_result, channel_results) = thread::scope(|s| {
        let mut handles = Vec::with_capacity(n);
        let mut loader = Loader::with_target(
            limits,
            MainView {
                ram: &ram,
                blocks: Vec::new(),
            },
        );
        let counting = Counting {
            inner: g.main,
            bytes: Arc::clone(bytes),
            on_first: Some(on_first),
        };
        let mut reader = StreamReader::new(counting, limits);
        let mut main_items = || -> Result<(), IncomingError> {
            loop {
                let step = reader
                    .next_with(|off, item, len| -> Result<Control, IncomingError> {
                        match item {
                            Item::Ram(RamRecord::MultifdFlush { seq }) => {
                                barrier.main_reached(*seq)?;
                                Ok(Control::Continue)
                            }
                            Item::Ram(
                                RamRecord::Zero { .. }
                                | RamRecord::Page { .. }
                                | RamRecord::Xbzrle { .. }
                                | RamRecord::Compressed { .. },
                            ) => Err(stream_err(precopy_stream::Error::Format {
                                offset: off,
                                kind: precopy_stream::FormatError::Multifd {
                                    why: "page record on the main channel",
                                },
                            })),
                            _ => {
                                let c = loader.apply(off, item, len).map_err(stream_err)?;
                                if let Item::Ram(RamRecord::MemSize { blocks, .. }) = item
                                    && handles.is_empty()
                                {
                                    // The RAM is set up: the page channels may start.
                                    for (i, slot) in channels.iter_mut().enumerate() {
                                        let Some(conn) = slot.take() else { continue };
                                        let (ram, barrier, fail) = (&ram, &barrier, &fail);
                                        let blocks = blocks.clone();
                                        let n = n as u16;
                                        let bytes = Arc::clone(bytes);
                                        handles.push(s.spawn(move || {
                                            let r = run_channel(
                                                (i, n),
                                                conn,
                                                blocks,
                                                limits,
                                                (ram, barrier),
                                                bytes,
                                            );
                                            match &r {
                                                Ok(_) => barrier.channel_ended(i),
                                                Err(_) => fail(Party::Channel(i)),
                                            }
                                            r
                                        }));
                                    }
                                }
                                Ok(c)
                            }
                        }
                    })
                    .map_err(stream_err)?;
                match step {
                    None => return Ok(()),
                    Some(r) => {
                        if r? == Control::Stop {
                            return Err(multifd_err(
                                "a foreign device section on a multifd main channel".into(),
                            ));
                        }
                    }
                }
            }
        };
        let mut r = main_items();
        if r.is_ok() && handles.is_empty() {
            r = Err(multifd_err(
                "the main channel ended without MEM_SIZE".into(),
            ));
        }
        if r.is_err() {
            fail(Party::Main);
        }
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(multifd_err("a page channel's thread panicked".into())))
            })
            .collect();
        let main = r
            .and_then(|()| loader.finish().map_err(stream_err))
            .map(|l| precopy_stream::Loaded {
                image: (),
                stats: l.stats,
                stop: l.stop,
                device_states: l.device_states,
                vm_description: l.vm_description,
                machine_type: l.machine_type,
                file_version: l.file_version,
                foreign_device_state: l.foreign_device_state,
            });
        (main, results)
    });
    let who = *lock(&first);
    let mut channel_results = channel_results;
    match who {
        Some(Party::Channel(i)) => {
            if i < channel_results.len()
                && let Err(e) = channel_results.swap_remove(i)
            {
                return Err(e);
            }
            main_result?;
            return Err(stopped());
        }
        Some(Party::Main) => {
            main_result?;
            return Err(stopped());
        }
        None => {}
    }
    let loaded = main_result?;
    let mut page_stats = LoadStats::default();
    for r in channel_results {
        page_stats.add_pages(&r?);
    }
    let refused = g.acceptor.finish();
    let target = ram.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(MultifdLoaded {
        loaded,
        target,
        refused,
        page_stats,
    })
}

const PAGE: u64 = xbzrle::PAGE_SIZE as u64;

/// Block index and byte offset of a page record (the decoder checked both).
fn page_of(rec: &RamRecord<'_>) -> Option<(usize, u64)> {
    match *rec {
        RamRecord::Zero { block, offset, .. }
        | RamRecord::Page { block, offset, .. }
        | RamRecord::Xbzrle { block, offset, .. }
        | RamRecord::Compressed { block, offset, .. }
        | RamRecord::CompressedPage { block, offset, .. } => Some((block, offset)),
        _ => None,
    }
}

/// One page channel: decode and apply its records, meet the sync points, end at EOS and
/// the end of the connection.
fn run_channel<T: RamTarget>(
    (i, n): (usize, u16),
    conn: Incoming,
    blocks: Vec<RamBlockInfo>,
    limits: Limits,
    (ram, barrier): (&Mutex<T>, &Barrier),
    bytes: Arc<AtomicU64>,
) -> Result<LoadStats, IncomingError> {
    let channel = i as u16 + 1;
    // Flat page index of each block's first page: a page must come on its own channel.
    let mut first_page = Vec::with_capacity(blocks.len());
    let mut total = 0u64;
    for b in &blocks {
        first_page.push(total);
        total += b.used_length / PAGE;
    }
    // Closed explicitly at the end: the abort handles hold the socket open otherwise, and
    // the source waits for this end to close before it closes the main channel.
    let close = conn.abort_handle();
    let counting = Counting {
        inner: conn,
        bytes,
        on_first: None,
    };
    let mut reader = StreamReader::with_decoder(counting, Decoder::multifd_channel(limits, blocks));
    let mut ap = PageApplier::new();
    let mut stats = LoadStats::default();
    let chan_err = |source: precopy_stream::Error| IncomingError::Channel {
        channel,
        offset: source.offset(),
        source,
    };
    loop {
        let step = reader
            .next_with(|off, item, len| -> Result<(), IncomingError> {
                match item {
                    Item::Ram(RamRecord::MultifdFlush { seq }) => barrier.channel_reached(i, *seq),
                    Item::Ram(RamRecord::Eos) => Ok(()),
                    Item::Ram(rec) => {
                        if let Some((block, offset)) = page_of(rec)
                            && channel_of_page(first_page[block] + offset / PAGE, n) != channel
                        {
                            return Err(chan_err(precopy_stream::Error::Format {
                                offset: off,
                                kind: precopy_stream::FormatError::Multifd {
                                    why: "a page on another page channel than its own \
                                          (channel 1 + (page / 64) mod N)",
                                },
                            }));
                        }
                        let mut g = lock(ram);
                        ap.apply(&mut *g, off, rec, len, &mut stats)
                            .map_err(chan_err)
                    }
                    _ => Err(chan_err(precopy_stream::Error::Format {
                        offset: off,
                        kind: precopy_stream::FormatError::Multifd {
                            why: "not a page record on a page channel",
                        },
                    })),
                }
            })
            .map_err(chan_err)?;
        match step {
            None => break,
            Some(r) => r?,
        }
    }
    stats.bytes = reader.decoder().position();
    close.abort();
    Ok(stats)
}
