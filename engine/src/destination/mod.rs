//! The destination side (`-incoming URI`): read the stream into RAM, track the state the way
//! the source does, verify the RAM digest the source put in the VM description.
//!
//! States: none → setup (waiting for the source) → active (reading) → completed, or failed
//! with the stream byte offset of the error. Completed only once the stream was read to
//! the end of its input: after EOF and the VM description, and after QEMU's device state
//! too, which is kept as bytes ([`Received::foreign_device_state`]). A destination that
//! closed the connection earlier would make a QEMU source fail its last writes and keep
//! the VM while the destination believed it had it. A digest mismatch, or a stream without our
//! digest, fails the migration unless verification is turned off
//! ([`Destination::with_verify`]), as for a QEMU stream, which carries no RAM digest.
//!
//! The RAM is held once: the stream's records are loaded straight into a
//! [`RamTarget`], which the caller may supply ([`Destination::receive_into`]), the digest is
//! computed over that target, and it comes back as [`Received::image`]. That is the one way
//! received RAM enters a guest:
//!
//! - a KVM guest (feature `kvm`): the target is `kvm::KvmIncomingRam`, the guest memory
//!   itself, mapped when MEM_SIZE arrives; `KvmVm::from_loaded` then builds the VM around
//!   it, without copying a page;
//! - the simulated destination ([`Destination::receive`]) keeps a [`RamImage`] as its RAM:
//!   it has no guest to resume, so the image is the guest's RAM.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Instant;

use precopy_stream::multifd::{HELLO_LEN, MULTIFD_MAGIC};
use precopy_stream::{
    ForeignDeviceState, Limits, LoadStats, Loader, OwnedDeviceState, RamImage, RamTarget,
    StreamReader,
};

mod multifd;

pub use multifd::{ChannelRefused, GATHER_TIMEOUT, HELLO_TIMEOUT};

use crate::info::{MigrationStatus, StateChange};
use crate::transport::{IncomingListener, TransportError};
use crate::vmdesc::{digest_from_vm_description, image_digest};

/// Why a destination failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IncomingError {
    /// Binding or accepting failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The stream is malformed or the transport dropped; `offset` is the stream byte offset.
    // The stream error already names the byte offset: say it once.
    #[error("migration stream error: {source}")]
    Stream {
        /// Stream byte offset of the error.
        offset: u64,
        /// The stream error.
        #[source]
        source: precopy_stream::Error,
    },
    /// The VM description carries no RAM digest of ours (or is not JSON).
    #[error(
        "the stream has no RAM digest in its VM description (a QEMU source sends none: \
         receive its migration with verification off, `--verify off`)"
    )]
    MissingDigest,
    /// A multifd page channel's stream is malformed or its connection dropped; `offset`
    /// counts from the first byte after its hello.
    #[error("multifd channel {channel}: migration stream error: {source}")]
    Channel {
        /// Page channel, 1..=N.
        channel: u16,
        /// Byte offset in the channel's records.
        offset: u64,
        /// The stream error.
        #[source]
        source: precopy_stream::Error,
    },
    /// A multifd migration broke the rules of [`precopy_stream::multifd`]: a bad first
    /// hello, channels missing, sync points out of order, a file transport.
    #[error("multifd: {why}")]
    Multifd {
        /// What happened.
        why: String,
    },
    /// The RAM read does not match the source's digest.
    #[error("RAM digest mismatch: source {expected}, destination {actual}")]
    DigestMismatch {
        /// The source's digest.
        expected: String,
        /// The digest of the RAM we built.
        actual: String,
    },
}

/// A completed, verified incoming migration, with the [`RamTarget`] `T` it was loaded into
/// (default a [`RamImage`]).
#[derive(Debug)]
pub struct Received<T = RamImage> {
    /// The RAM, blocks in MEM_SIZE order: the target the records were loaded into.
    pub image: T,
    /// Record counts and bytes per kind.
    pub stats: LoadStats,
    /// Our device sections (`precopy/...`), in stream order.
    pub device_states: Vec<OwnedDeviceState>,
    /// QEMU's device state after the RAM (from a QEMU source), kept as bytes and split
    /// into its sections; None for our own streams.
    pub foreign_device_state: Option<ForeignDeviceState>,
    /// The VM description JSON (`Null` when the stream has none or it is not JSON; only
    /// possible with verification off).
    pub vm_description: serde_json::Value,
    /// The digest of the RAM received (hex); equal to the source's when `verified`.
    pub digest: String,
    /// Whether the digest was checked against the source's (false only when the destination
    /// was built with [`Destination::with_verify`]`(false)`, e.g. for a QEMU stream, which
    /// carries no RAM digest).
    pub verified: bool,
    /// Stream bytes read (all connections of a multifd migration).
    pub bytes: u64,
    /// multifd page channels of the migration (0: a single stream).
    pub multifd_channels: u16,
    /// Connections refused while the destination waited for its source, and while a
    /// multifd migration was accepted or ran (strays, duplicates, other migrations): they
    /// did not disturb it.
    pub refused_connections: Vec<ChannelRefused>,
    /// ms from the first byte to the verified end.
    pub total_time_ms: u64,
}

struct State {
    status: MigrationStatus,
    error: Option<String>,
    listeners: Vec<mpsc::Sender<StateChange>>,
}

/// The destination's state, shareable with a thread that reports progress.
#[derive(Clone)]
pub struct Destination {
    state: Arc<Mutex<State>>,
    bytes: Arc<AtomicU64>,
    verify: bool,
    refusals: multifd::Refusals,
    gather_timeout: std::time::Duration,
}

impl Default for Destination {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("status", &self.status())
            .field("bytes", &self.bytes_received())
            .finish()
    }
}

struct Counting<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
    on_first: Option<Box<dyn FnOnce() + Send>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0
            && let Some(f) = self.on_first.take()
        {
            f();
        }
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Destination {
    /// A destination in state none.
    pub fn new() -> Destination {
        Destination {
            state: Arc::new(Mutex::new(State {
                status: MigrationStatus::None,
                error: None,
                listeners: Vec::new(),
            })),
            bytes: Arc::new(AtomicU64::new(0)),
            verify: true,
            refusals: multifd::Refusals::default(),
            gather_timeout: GATHER_TIMEOUT,
        }
    }

    /// Whether to require and check the source's RAM digest (default true). With false, a
    /// stream without our digest (such as QEMU's own, whose VM description has none) loads,
    /// and [`Received::verified`] is false.
    pub fn with_verify(mut self, verify: bool) -> Destination {
        self.verify = verify;
        self
    }

    /// How long a multifd migration's connections wait, from the first, for the rest to
    /// connect before they are refused and the destination waits on (default
    /// [`GATHER_TIMEOUT`], 60 s).
    pub fn with_gather_timeout(mut self, timeout: std::time::Duration) -> Destination {
        self.gather_timeout = timeout;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, to: MigrationStatus) {
        set_status(&mut self.lock(), to);
    }

    /// The state.
    pub fn status(&self) -> MigrationStatus {
        self.lock().status
    }

    /// Why it failed, once failed.
    pub fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    /// Stream bytes read so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Receive every state change from now on.
    pub fn subscribe(&self) -> mpsc::Receiver<StateChange> {
        let (tx, rx) = mpsc::channel();
        self.lock().listeners.push(tx);
        rx
    }

    /// A receiver of every connection refused from now on, as it is refused (strays while
    /// waiting for the source or during a multifd migration; see
    /// [`accept_and_receive_into`](Destination::accept_and_receive_into)). The same
    /// refusals come back in [`Received::refused_connections`] at the end.
    pub fn subscribe_refusals(&self) -> mpsc::Receiver<ChannelRefused> {
        self.refusals.subscribe()
    }

    /// Every connection refused so far by this destination, in order (also after a
    /// failed migration, which has no [`Received`]).
    pub fn refused_connections(&self) -> Vec<ChannelRefused> {
        self.refusals.since(0)
    }

    /// Accept one source on `listener` and [`receive`](Destination::receive) from it.
    pub fn accept_and_receive(
        &self,
        listener: IncomingListener,
        limits: Limits,
    ) -> Result<Received, IncomingError> {
        self.accept_and_receive_into(listener, limits, RamImage::default())
    }

    /// Accept one source on `listener` and [`receive_into`](Destination::receive_into)
    /// `target` from it. The source decides the shape: a plain stream (first bytes
    /// `QEVM`), or a multifd migration (first bytes `PCMF`, [`precopy_stream::multifd`]),
    /// whose main and page channels are accepted in any order on `listener` (`tcp:` and
    /// `unix:`), loaded in parallel.
    ///
    /// On `tcp:` and `unix:` the destination waits for its source without a time limit,
    /// reading every connection's first bytes on its own thread: a connection that is
    /// silent for [`HELLO_TIMEOUT`], closes before its fourth byte, or starts with neither
    /// `QEVM` nor `PCMF` is refused and the wait goes on, as are strays during a multifd
    /// migration. Each refusal is a [`ChannelRefused`], told as it happens
    /// ([`subscribe_refusals`](Destination::subscribe_refusals)) and listed in
    /// [`Received::refused_connections`]. On `file:`, `exec:` and `fd:` the one stream is
    /// the source, whatever it holds.
    ///
    /// Errors: as [`receive_into`](Destination::receive_into), plus
    /// [`IncomingError::Transport`] when accepting fails, [`IncomingError::Channel`] and
    /// [`IncomingError::Multifd`] for a multifd migration; the state is then failed.
    pub fn accept_and_receive_into<T: RamTarget + Send>(
        &self,
        listener: IncomingListener,
        limits: Limits,
        target: T,
    ) -> Result<Received<T>, IncomingError> {
        self.set(MigrationStatus::Setup);
        let r = self.accept_first(listener).and_then(|first| match first {
            First::Single(conn, refused) => self.receive_into(conn, limits, target).map(|mut r| {
                r.refused_connections = refused;
                r
            }),
            First::Multifd(g) => self.receive_multifd(g, limits, target),
        });
        if let Err(e) = &r
            && self.status() != MigrationStatus::Failed
        {
            self.fail(e.to_string());
        }
        r
    }

    /// The first connection: a plain stream (its first four bytes put back in front), or
    /// a multifd migration's connections, gathered ([`multifd::accept_source`]: on a
    /// socket, strays are refused and the wait goes on).
    fn accept_first(&self, listener: IncomingListener) -> Result<First, IncomingError> {
        if !listener.accepts_many() {
            // file:, exec:, fd: have their one stream ready.
            return self.first_of_one(listener);
        }
        Ok(
            match multifd::accept_source(listener, self.refusals.clone(), self.gather_timeout)? {
                multifd::Opened::Plain(magic, conn, refused) => First::Single(
                    Box::new(io::Cursor::new(magic.to_vec()).chain(conn)),
                    refused,
                ),
                multifd::Opened::Multifd(g) => First::Multifd(g),
            },
        )
    }

    fn first_of_one(&self, listener: IncomingListener) -> Result<First, IncomingError> {
        let mut conn = listener.accept()?;
        let mut magic = [0u8; 4];
        let got = read_up_to(&mut conn, &mut magic)?;
        if got == 4 && u32::from_be_bytes(magic) == MULTIFD_MAGIC {
            return Err(IncomingError::Multifd {
                why: "a multifd stream needs a socket transport (tcp: or unix:), \
                      its page channels are separate connections"
                    .into(),
            });
        }
        Ok(First::Single(
            Box::new(io::Cursor::new(magic[..got].to_vec()).chain(conn)),
            Vec::new(),
        ))
    }

    /// Load a gathered multifd migration into `target` and verify it.
    fn receive_multifd<T: RamTarget + Send>(
        &self,
        g: multifd::Gathered,
        limits: Limits,
        target: T,
    ) -> Result<Received<T>, IncomingError> {
        let channels = g.hello.channels;
        // The hellos were read while gathering: count them with the rest.
        let hellos = (HELLO_LEN * (usize::from(channels) + 1)) as u64;
        self.bytes.store(hellos, Ordering::Relaxed);
        let start = Instant::now();
        let me = self.clone();
        let r = multifd::load(
            g,
            limits,
            target,
            &self.bytes,
            Box::new(move || me.set(MigrationStatus::Active)),
        )
        .and_then(|m| {
            let mut stats = m.loaded.stats;
            stats.add_pages(&m.page_stats);
            let mut rec = self.verify(
                m.target,
                stats,
                m.loaded.device_states,
                m.loaded.foreign_device_state,
                m.loaded.vm_description,
                start,
            )?;
            rec.multifd_channels = channels;
            rec.refused_connections = m.refused;
            Ok(rec)
        });
        match &r {
            Ok(_) => self.set(MigrationStatus::Completed),
            Err(e) => self.fail(e.to_string()),
        }
        r
    }

    fn fail(&self, e: String) {
        let mut s = self.lock();
        s.error = Some(e);
        set_status(&mut s, MigrationStatus::Failed);
    }

    /// Read a whole stream from `reader` into a new [`RamImage`], verify the digest (the
    /// simulated destination: the image is the guest's RAM).
    ///
    /// Errors: as [`receive_into`](Destination::receive_into).
    pub fn receive<R: Read>(&self, reader: R, limits: Limits) -> Result<Received, IncomingError> {
        self.receive_into(reader, limits, RamImage::default())
    }

    /// Read a whole stream from `reader`, loading every RAM record straight into `target`
    /// (which sets up its blocks when MEM_SIZE arrives, at most `limits.max_ram_bytes`),
    /// verify the digest over `target`, and hand it back in [`Received::image`].
    ///
    /// Errors: [`IncomingError::Stream`] (with the byte offset; the target's own MEM_SIZE
    /// errors as [`precopy_stream::Error::Target`]), [`IncomingError::MissingDigest`],
    /// [`IncomingError::DigestMismatch`]; the state is then failed.
    pub fn receive_into<R: Read, T: RamTarget>(
        &self,
        reader: R,
        limits: Limits,
        target: T,
    ) -> Result<Received<T>, IncomingError> {
        self.set(MigrationStatus::Setup);
        self.bytes.store(0, Ordering::Relaxed);
        let start = Instant::now();
        let me = self.clone();
        let counting = Counting {
            inner: reader,
            bytes: Arc::clone(&self.bytes),
            on_first: Some(Box::new(move || me.set(MigrationStatus::Active))),
        };
        let r = self.load_and_verify(counting, limits, target, start);
        match &r {
            Ok(_) => self.set(MigrationStatus::Completed),
            Err(e) => self.fail(e.to_string()),
        }
        r
    }

    fn load_and_verify<R: Read, T: RamTarget>(
        &self,
        reader: R,
        limits: Limits,
        target: T,
        start: Instant,
    ) -> Result<Received<T>, IncomingError> {
        let mut loader = Loader::with_target(limits, target);
        let loaded = loader
            .load_to_end(&mut StreamReader::new(reader, limits))
            .and_then(|()| loader.finish())
            .map_err(|e| IncomingError::Stream {
                offset: e.offset(),
                source: e,
            })?;
        self.verify(
            loaded.image,
            loaded.stats,
            loaded.device_states,
            loaded.foreign_device_state,
            loaded.vm_description,
            start,
        )
    }

    /// Check the RAM `image` against the digest in `vm_description` (unless verification
    /// is off) and build the result.
    fn verify<T: RamTarget>(
        &self,
        image: T,
        stats: LoadStats,
        device_states: Vec<OwnedDeviceState>,
        foreign_device_state: Option<ForeignDeviceState>,
        vm_description: Option<Vec<u8>>,
        start: Instant,
    ) -> Result<Received<T>, IncomingError> {
        let desc: Option<serde_json::Value> = vm_description
            .as_deref()
            .and_then(|d| serde_json::from_slice(d).ok());
        let actual = image_digest(&image);
        if self.verify {
            let expected = desc
                .as_ref()
                .and_then(digest_from_vm_description)
                .ok_or(IncomingError::MissingDigest)?
                .to_owned();
            if actual != expected {
                return Err(IncomingError::DigestMismatch { expected, actual });
            }
        }
        let desc = desc.unwrap_or(serde_json::Value::Null);
        Ok(Received {
            image,
            stats,
            device_states,
            foreign_device_state,
            vm_description: desc,
            digest: actual,
            verified: self.verify,
            bytes: self.bytes_received(),
            total_time_ms: start.elapsed().as_millis() as u64,
            multifd_channels: 0,
            refused_connections: Vec::new(),
        })
    }
}

/// The first connection of an incoming migration.
enum First {
    /// A plain stream, and the connections refused before it.
    Single(Box<dyn Read + Send>, Vec<ChannelRefused>),
    Multifd(multifd::Gathered),
}

/// Reads up to `buf.len()` bytes (fewer only at the end of the stream).
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, IncomingError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(IncomingError::Stream {
                    offset: got as u64,
                    source: precopy_stream::Error::Io {
                        offset: got as u64,
                        source,
                    },
                });
            }
        }
    }
    Ok(got)
}

fn set_status(s: &mut State, to: MigrationStatus) {
    let from = s.status;
    if from != to {
        s.status = to;
        s.listeners
            .retain(|l| l.send(StateChange { from, to }).is_ok());
    }
}
