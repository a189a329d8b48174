//! The source side: the control API ([`Migrator`], like QMP's `migrate`, `query-migrate`,
//! `migrate_cancel`, `migrate-set-parameters`, `migrate-set-capabilities`) and the pre-copy
//! loop it runs on a migration thread.
//!
//! # The loop (QEMU migration/migration.c `migration_thread`, migration/ram.c)
//!
//! 1. **setup**: open the transport, write the file header and the `ram` START section with
//!    MEM_SIZE, start the dirty log, mark every page dirty (the first pass sends every page,
//!    whatever the dirty log says), one dirty-bitmap sync (`dirty-sync-count` = 1).
//! 2. **active**: send dirty pages in `ram` PART sections under the rate limit (a byte budget
//!    per 100 ms slice from `max-bandwidth`). When the dirty bitmap is exhausted (pass end),
//!    sync the dirty log; one sync is one XBZRLE cache generation. Every 100 ms: bandwidth =
//!    bytes sent / time, threshold = bandwidth × `downtime-limit` (or
//!    `avail-switchover-bandwidth` × `downtime-limit` when set), `expected-downtime` =
//!    remaining / bandwidth. At a sync at least 1 s after the last one, auto-converge looks
//!    at the period ([`crate::policy::AutoConverge`]).
//! 3. **switchover**: when the remaining dirty bytes fall below the threshold (after a fresh
//!    sync), or nothing is dirty: stop the vCPUs, sync once more, send the rest in the `ram`
//!    END section without rate limit, EOF, then the VM description with the RAM digest
//!    → **completed**. The source guest stays stopped (the destination owns it now).
//!
//! Downtime is measured from the vCPU stop to the flush of EOF (all RAM on the wire). The RAM
//! digest (BLAKE3 of the stopped guest's RAM) is computed and sent after that, in the VM
//! description; it is a verification aid and not counted as downtime.
//!
//! # Per page
//!
//! The page is copied out of guest RAM once ([`GuestRam::read_page`](crate::GuestRam::read_page)); that copy is what is
//! tested, encoded, cached and sent.
//! * all zero → ZERO record; with XBZRLE, the zero page is inserted into the cache (as QEMU's
//!   `xbzrle_cache_zero_page`: no lookup, so not counted as a hit or a miss; not in the final
//!   pass);
//! * XBZRLE on (after the first pass) and cache hit → encode against the cached copy and
//!   update it in one pass: empty delta → unchanged, nothing sent; a delta shorter than a page
//!   → XBZRLE record; overflow (delta ≥ page) → PAGE record, the cache holds the bytes sent;
//! * XBZRLE on and cache miss → PAGE record, and the page is inserted (not in the final pass);
//! * otherwise → PAGE record.
//!
//! # Failure and cancel
//!
//! A transport error, a guest error or a cancel ends the migration as failed or cancelled:
//! the throttle is set back to 0, the vCPUs are resumed if the loop stopped them, the dirty
//! log is stopped. Guest memory is only ever read. A new migration can start at once.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use precopy_pagecache::{PageCache, Policy};
use precopy_stream::{StreamWriter, WriteError};
use rayon::prelude::*;
use xbzrle::{Codec, PAGE_SIZE, Page};

use crate::info::{MigrationInfo, MigrationStatus, RamStats, XbzrleCacheStats};
use crate::params::{Capabilities, MigrationParameters, ParameterError, ParameterUpdate};
use crate::policy::{self, AutoConverge};
use crate::traits::{Guest, GuestError, RamBlockInfo, SharedGuest};
use crate::transport::{AbortHandle, Outgoing, TransportError};

const PAGE: u64 = PAGE_SIZE as u64;
/// QEMU `BUFFER_DELAY`: the estimation period.
const ESTIMATE_PERIOD: Duration = Duration::from_millis(100);
/// Auto-converge and rate periods: a sync at least this long after the last check.
const SYNC_PERIOD: Duration = Duration::from_secs(1);
/// Longest time one PART section keeps sending before the loop looks around again.
const MAX_ITERATION_TIME: Duration = Duration::from_millis(50);
/// Pages per batch with parallel encoding.
const PARALLEL_BATCH: usize = 256;
/// Machine type written in the configuration section.
pub const MACHINE_TYPE: &str = "precopy-sim";

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A migration is already in progress (setup, active or cancelling).
    #[error("there's a migration process in progress")]
    InProgress,
    /// Migration blockers are registered.
    #[error("migration is blocked: {}", reasons.join("; "))]
    Blocked {
        /// The blockers' reasons.
        reasons: Vec<String>,
    },
    /// A capability change while a migration is in progress.
    #[error("capabilities cannot be changed while a migration is in progress")]
    CapabilityWhileActive,
    /// A parameter is out of range.
    #[error(transparent)]
    Parameter(#[from] ParameterError),
    /// The URI is malformed, or connecting failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The guest refused (no RAM blocks, a block name the stream cannot carry...).
    #[error("guest: {0}")]
    Guest(String),
    /// [`Migrator::wait`] found no migration to wait for.
    #[error("no migration was started")]
    NotStarted,
}

/// A registered migration blocker (QEMU `migrate_add_blocker`); remove it with
/// [`Migrator::remove_blocker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockerId(u64);

/// A state change, as sent to [`Migrator::subscribe`]rs (QEMU's `MIGRATION` event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    /// Previous state.
    pub from: MigrationStatus,
    /// New state.
    pub to: MigrationStatus,
}

/// A byte sink a migration can be sent to: any `Write + Send`; [`close`](MigrationSink::close)
/// is called once after the last byte (flush by default; [`Outgoing`] also waits for an
/// `exec:` command and fails if it failed).
pub trait MigrationSink: Write + Send {
    /// Called after the stream is complete.
    fn close(&mut self) -> io::Result<()> {
        self.flush()
    }
}

impl MigrationSink for Vec<u8> {}
impl MigrationSink for io::Sink {}
impl MigrationSink for std::net::TcpStream {}
impl MigrationSink for std::os::unix::net::UnixStream {}
impl MigrationSink for std::fs::File {}

/// [`Outgoing`] with its `finish` done through `&mut`.
struct OutgoingSink(Option<Outgoing>);

impl Write for OutgoingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(o) => o.write(buf),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}

impl MigrationSink for OutgoingSink {
    fn close(&mut self) -> io::Result<()> {
        match self.0.take() {
            Some(o) => o.finish(),
            None => Ok(()),
        }
    }
}

struct Ctl {
    status: MigrationStatus,
    params: MigrationParameters,
    caps: Capabilities,
    blockers: Vec<(BlockerId, String)>,
    next_blocker: u64,
    info: MigrationInfo,
    listeners: Vec<mpsc::Sender<StateChange>>,
    thread: Option<JoinHandle<()>>,
    abort: Option<AbortHandle>,
    params_changed: bool,
    pass_limit: Option<u64>,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    cancel: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_status(&self, ctl: &mut Ctl, to: MigrationStatus) {
        let from = ctl.status;
        if from == to {
            return;
        }
        ctl.status = to;
        ctl.info.status = to;
        ctl.listeners
            .retain(|l| l.send(StateChange { from, to }).is_ok());
        self.cv.notify_all();
    }
}

/// The migration control API for one guest (QEMU's `MigrationState`).
///
/// Cheap to share: clones refer to the same state. One migration at a time; after it
/// finishes (completed, failed, cancelled) a new one can start.
#[derive(Clone)]
pub struct Migrator {
    guest: SharedGuest,
    shared: Arc<Shared>,
}

impl fmt::Debug for Migrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Migrator")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Migrator {
    /// A migrator for `guest` with QEMU's default parameters and every capability off.
    pub fn new(guest: SharedGuest) -> Migrator {
        Migrator {
            guest,
            shared: Arc::new(Shared {
                ctl: Mutex::new(Ctl {
                    status: MigrationStatus::None,
                    params: MigrationParameters::default(),
                    caps: Capabilities::default(),
                    blockers: Vec::new(),
                    next_blocker: 0,
                    info: MigrationInfo::default(),
                    listeners: Vec::new(),
                    thread: None,
                    abort: None,
                    params_changed: false,
                    pass_limit: None,
                }),
                cv: Condvar::new(),
                cancel: AtomicBool::new(false),
            }),
        }
    }

    /// The guest being migrated.
    pub fn guest(&self) -> &SharedGuest {
        &self.guest
    }

    /// The current state.
    pub fn status(&self) -> MigrationStatus {
        self.shared.lock().status
    }

    /// The parameters in force (`query-migrate-parameters`).
    pub fn parameters(&self) -> MigrationParameters {
        self.shared.lock().params.clone()
    }

    /// Change parameters (`migrate-set-parameters`), also while a migration runs:
    /// `max-bandwidth` and `downtime-limit` take effect at the next loop step,
    /// `xbzrle-cache-size` resizes the XBZRLE cache in place (keeping recent pages).
    ///
    /// Errors: [`MigrateError::Parameter`] (nothing changes).
    pub fn set_parameters(&self, update: &ParameterUpdate) -> Result<(), MigrateError> {
        let mut ctl = self.shared.lock();
        ctl.params.apply(update)?;
        ctl.params_changed = true;
        Ok(())
    }

    /// The capabilities in force.
    pub fn capabilities(&self) -> Capabilities {
        self.shared.lock().caps
    }

    /// Set capabilities (`migrate-set-capabilities`).
    ///
    /// Errors: [`MigrateError::CapabilityWhileActive`] while a migration is in progress.
    pub fn set_capabilities(&self, caps: Capabilities) -> Result<(), MigrateError> {
        let mut ctl = self.shared.lock();
        if ctl.status.is_active() {
            return Err(MigrateError::CapabilityWhileActive);
        }
        ctl.caps = caps;
        Ok(())
    }

    /// Our own knob: fail a migration that has not converged after `passes` dirty-bitmap
    /// syncs (None = never give up, as QEMU). Useful for tests and operators with a deadline.
    pub fn set_pass_limit(&self, passes: Option<u64>) {
        self.shared.lock().pass_limit = passes;
    }

    /// Register a migration blocker (`migrate_add_blocker`): [`start`](Migrator::start)
    /// fails while any is registered.
    pub fn add_blocker(&self, reason: impl Into<String>) -> BlockerId {
        let mut ctl = self.shared.lock();
        let id = BlockerId(ctl.next_blocker);
        ctl.next_blocker += 1;
        ctl.blockers.push((id, reason.into()));
        id
    }

    /// Remove a blocker; returns false if it was not registered.
    pub fn remove_blocker(&self, id: BlockerId) -> bool {
        let mut ctl = self.shared.lock();
        let n = ctl.blockers.len();
        ctl.blockers.retain(|(b, _)| *b != id);
        ctl.blockers.len() != n
    }

    /// Receive every state change from now on.
    pub fn subscribe(&self) -> mpsc::Receiver<StateChange> {
        let (tx, rx) = mpsc::channel();
        self.shared.lock().listeners.push(tx);
        rx
    }

    /// `query-migrate`.
    pub fn query(&self) -> MigrationInfo {
        self.shared.lock().info.clone()
    }

    /// Start a migration to `uri` (`migrate URI`): parses the URI, connects, and runs the
    /// loop on a new thread. Returns once connected.
    ///
    /// Errors: [`MigrateError::InProgress`], [`MigrateError::Blocked`],
    /// [`MigrateError::Transport`] (the state becomes failed for a connection error, as in
    /// QEMU; a malformed URI leaves it unchanged).
    pub fn start(&self, uri: &str) -> Result<(), MigrateError> {
        self.precheck()?;
        uri.parse::<crate::transport::MigrationUri>()?;
        match Outgoing::open(uri) {
            Ok(out) => {
                let abort = out.abort_handle();
                self.spawn(Box::new(OutgoingSink(Some(out))), Some(abort))
            }
            Err(e) => {
                let mut ctl = self.shared.lock();
                ctl.info = MigrationInfo {
                    status: MigrationStatus::Failed,
                    error_desc: Some(e.to_string()),
                    ..Default::default()
                };
                self.shared.set_status(&mut ctl, MigrationStatus::Setup);
                self.shared.set_status(&mut ctl, MigrationStatus::Failed);
                Err(e.into())
            }
        }
    }

    /// Start a migration into any sink (a `Vec<u8>`, `io::sink()`, a socket you connected).
    ///
    /// Errors: [`MigrateError::InProgress`], [`MigrateError::Blocked`].
    pub fn start_to<S: MigrationSink + 'static>(&self, sink: S) -> Result<(), MigrateError> {
        self.precheck()?;
        self.spawn(Box::new(sink), None)
    }

    fn precheck(&self) -> Result<(), MigrateError> {
        let ctl = self.shared.lock();
        if ctl.status.is_active() {
            return Err(MigrateError::InProgress);
        }
        if !ctl.blockers.is_empty() {
            return Err(MigrateError::Blocked {
                reasons: ctl.blockers.iter().map(|(_, r)| r.clone()).collect(),
            });
        }
        Ok(())
    }

    fn spawn(
        &self,
        sink: Box<dyn MigrationSink>,
        abort: Option<AbortHandle>,
    ) -> Result<(), MigrateError> {
        let mut ctl = self.shared.lock();
        if ctl.status.is_active() {
            return Err(MigrateError::InProgress);
        }
        if let Some(t) = ctl.thread.take() {
            let _ = t.join();
        }
        self.shared.cancel.store(false, Ordering::SeqCst);
        ctl.info = MigrationInfo {
            status: MigrationStatus::Setup,
            ..Default::default()
        };
        ctl.params_changed = false;
        ctl.abort = abort;
        self.shared.set_status(&mut ctl, MigrationStatus::Setup);
        let params = ctl.params.clone();
        let caps = ctl.caps;
        let pass_limit = ctl.pass_limit;
        let guest = Arc::clone(&self.guest);
        let shared = Arc::clone(&self.shared);
        let t = std::thread::Builder::new()
            .name("live_migration".into())
            .spawn(move || migration_thread(guest, shared, sink, params, caps, pass_limit))
            .map_err(|e| MigrateError::Guest(format!("cannot spawn the migration thread: {e}")))?;
        ctl.thread = Some(t);
        Ok(())
    }

    /// Cancel the migration in progress (`migrate_cancel`): the state goes to cancelling,
    /// then cancelled once the source is restored. No effect when none is in progress.
    pub fn cancel(&self) {
        let mut ctl = self.shared.lock();
        if !ctl.status.is_active() {
            return;
        }
        self.shared.cancel.store(true, Ordering::SeqCst);
        if let Some(a) = &ctl.abort {
            a.abort();
        }
        self.shared
            .set_status(&mut ctl, MigrationStatus::Cancelling);
    }

    /// Wait for the migration to finish and return the final `query-migrate`.
    ///
    /// Errors: [`MigrateError::NotStarted`] when no migration was ever started.
    pub fn wait(&self) -> Result<MigrationInfo, MigrateError> {
        let t = {
            let mut ctl = self.shared.lock();
            if ctl.status == MigrationStatus::None {
                return Err(MigrateError::NotStarted);
            }
            ctl.thread.take()
        };
        if let Some(t) = t {
            let _ = t.join();
        }
        let mut ctl = self.shared.lock();
        while ctl.status.is_active() {
            ctl = self.shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
        }
        Ok(ctl.info.clone())
    }

    /// Wait until the state is `status` or the migration finished, at most `timeout`;
    /// returns the state then.
    pub fn wait_for_status(&self, status: MigrationStatus, timeout: Duration) -> MigrationStatus {
        let deadline = Instant::now() + timeout;
        let mut ctl = self.shared.lock();
        loop {
            if ctl.status == status || ctl.status.is_finished() {
                return ctl.status;
            }
            let now = Instant::now();
            if now >= deadline {
                return ctl.status;
            }
            ctl = self
                .shared
                .cv
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Why the loop stopped early.
enum Stop {
    Cancelled,
    Failed(String),
}

impl From<WriteError> for Stop {
    fn from(e: WriteError) -> Self {
        Stop::Failed(format!("stream: {e}"))
    }
}

impl From<GuestError> for Stop {
    fn from(e: GuestError) -> Self {
        Stop::Failed(format!("guest: {e}"))
    }
}

/// Outcome of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Zero,
    Page,
    Xbzrle(usize),
    Unchanged,
}

/// The page copy and the delta buffer of one page in flight.
struct Slot {
    page: Page,
    delta: Page,
}

impl Slot {
    fn new() -> Box<Slot> {
        Box::new(Slot {
            page: [0; PAGE_SIZE],
            delta: [0; PAGE_SIZE],
        })
    }
}

/// One XBZRLE cache shard with its batch work area (one per encoding thread).
struct Shard {
    cache: Option<PageCache>,
    jobs: Vec<(usize, u64, u64)>,
    slots: Vec<Box<Slot>>,
    kinds: Vec<Kind>,
    cache_miss: u64,
    overflow: u64,
    error: Option<GuestError>,
}

static ZERO_PAGE: Page = [0; PAGE_SIZE];

#[allow(clippy::too_many_arguments)]
fn process_page(
    guest: &dyn Guest,
    codec: &Codec,
    cache: Option<&mut PageCache>,
    slot: &mut Slot,
    counters: (&mut u64, &mut u64),
    (block, page, addr): (usize, u64, u64),
    generation: u64,
    last_stage: bool,
) -> Result<Kind, GuestError> {
    let (cache_miss, overflow) = counters;
    guest.read_page(block, page, &mut slot.page)?;
    if codec.is_zero(&slot.page) {
        // As QEMU's xbzrle_cache_zero_page: an insert of the zero page, not a
        // lookup, so zero pages are neither cache hits nor cache misses. A
        // resident copy of this address is always replaced; a refused insert
        // (another fresh page holds the slot) leaves nothing cached for it.
        if let Some(cache) = cache
            && !last_stage
        {
            let _ = cache.insert(addr, &ZERO_PAGE, generation);
        }
        return Ok(Kind::Zero);
    }
    let Some(cache) = cache else {
        return Ok(Kind::Page);
    };
    match cache.lookup(addr, generation) {
        Some(cached) => {
            match codec.encode_and_update(cached, &slot.page, &mut slot.delta[..PAGE_SIZE - 1]) {
                Ok(0) => Ok(Kind::Unchanged),
                Ok(n) => Ok(Kind::Xbzrle(n)),
                Err(_) => {
                    *overflow += 1;
                    Ok(Kind::Page)
                }
            }
        }
        None => {
            *cache_miss += 1;
            if !last_stage {
                let _ = cache.insert(addr, &slot.page, generation);
            }
            Ok(Kind::Page)
        }
    }
}

/// Counters of the loop (cumulative).
#[derive(Default, Clone, Copy)]
struct Counters {
    duplicate: u64,
    normal: u64,
    xbzrle_pages: u64,
    xbzrle_bytes: u64,
    unchanged: u64,
    handled: u64,
    precopy_bytes: u64,
}

struct Source<'a> {
    guest: &'a dyn Guest,
    shared: &'a Shared,
    w: StreamWriter<Box<dyn MigrationSink>>,
    codec: Codec,
    params: MigrationParameters,
    caps: Capabilities,
    pass_limit: Option<u64>,
    blocks: Vec<RamBlockInfo>,
    base: Vec<u64>,
    bitmaps: Vec<Vec<u64>>,
    dirty_pages: u64,
    cur_block: usize,
    cur_word: usize,
    shards: Vec<Shard>,
    xbzrle_active: bool,
    synced_clean: bool,
    sync_count: u64,
    c: Counters,
    total: u64,
    // timing
    start: Instant,
    setup_ms: u64,
    // 100 ms estimation
    est_start: Instant,
    est_bytes: u64,
    est_handled: u64,
    threshold: u64,
    expected_downtime: Option<u64>,
    mbps: f64,
    pages_per_second: u64,
    // 1 s periods
    ac: AutoConverge,
    period_start: Instant,
    period_bytes: u64,
    period_dirty: u64,
    period_handled: u64,
    period_miss: u64,
    period_xbzrle_pages: u64,
    period_xbzrle_bytes: u64,
    dirty_pages_rate: u64,
    cache_miss_rate: f64,
    encoding_rate: f64,
    throttle: u8,
    stopped: bool,
    closed_bytes: u64,
}

fn migration_thread(
    guest: SharedGuest,
    shared: Arc<Shared>,
    sink: Box<dyn MigrationSink>,
    params: MigrationParameters,
    caps: Capabilities,
    pass_limit: Option<u64>,
) {
    let now = Instant::now();
    let mut w = StreamWriter::new(sink);
    w.set_max_bandwidth(params.max_bandwidth);
    let mut src = Source {
        guest: &*guest,
        shared: &shared,
        w,
        codec: Codec::new(),
        params,
        caps,
        pass_limit,
        blocks: Vec::new(),
        base: Vec::new(),
        bitmaps: Vec::new(),
        dirty_pages: 0,
        cur_block: 0,
        cur_word: 0,
        shards: Vec::new(),
        xbzrle_active: false,
        synced_clean: false,
        sync_count: 0,
        c: Counters::default(),
        total: 0,
        start: now,
        setup_ms: 0,
        est_start: now,
        est_bytes: 0,
        est_handled: 0,
        threshold: 0,
        expected_downtime: None,
        mbps: 0.0,
        pages_per_second: 0,
        ac: AutoConverge::new(),
        period_start: now,
        period_bytes: 0,
        period_dirty: 0,
        period_handled: 0,
        period_miss: 0,
        period_xbzrle_pages: 0,
        period_xbzrle_bytes: 0,
        dirty_pages_rate: 0,
        cache_miss_rate: 0.0,
        encoding_rate: 0.0,
        throttle: 0,
        stopped: false,
        closed_bytes: 0,
    };
    let result = src.setup().and_then(|()| src.iterate());
    let mut final_status = MigrationStatus::Completed;
    let mut error = None;
    let mut downtime = None;
    match result {
        Ok(d) => downtime = Some(d),
        Err(stop) => {
            // Restore the source: no throttle, vCPUs running, dirty log off.
            let _ = src.guest.set_throttle(0);
            if src.stopped {
                let _ = src.guest.resume();
            }
            let _ = src.guest.log_stop();
            match stop {
                Stop::Cancelled => final_status = MigrationStatus::Cancelled,
                Stop::Failed(e) if shared.cancel.load(Ordering::SeqCst) => {
                    let _ = e;
                    final_status = MigrationStatus::Cancelled;
                }
                Stop::Failed(e) => {
                    final_status = MigrationStatus::Failed;
                    error = Some(e);
                }
            }
        }
    }
    if final_status == MigrationStatus::Completed {
        let _ = src.guest.set_throttle(0);
        let _ = src.guest.log_stop();
    }
    let mut info = src.info(final_status);
    info.downtime = downtime;
    info.error_desc = error;
    let mut ctl = shared.lock();
    ctl.info = info;
    ctl.abort = None;
    shared.set_status(&mut ctl, final_status);
}

impl Source<'_> {
    fn info(&self, status: MigrationStatus) -> MigrationInfo {
        let transferred = self.transferred();
        let ram = RamStats {
            transferred,
            remaining: self.dirty_pages * PAGE,
            total: self.total,
            duplicate: self.c.duplicate,
            normal: self.c.normal,
            normal_bytes: self.c.normal * PAGE,
            dirty_pages_rate: self.dirty_pages_rate,
            mbps: self.mbps,
            dirty_sync_count: self.sync_count,
            page_size: PAGE,
            pages_per_second: self.pages_per_second,
            // As QEMU's precopy-bytes: everything sent before the final stage; until the
            // guest stops (and on a migration that failed before it), that is all of it.
            precopy_bytes: if self.stopped {
                self.c.precopy_bytes.min(transferred)
            } else {
                transferred
            },
            downtime_bytes: if self.stopped {
                transferred - self.c.precopy_bytes.min(transferred)
            } else {
                0
            },
        };
        let xbzrle_cache = self.caps.xbzrle.then(|| XbzrleCacheStats {
            cache_size: self.params.xbzrle_cache_size,
            bytes: self.c.xbzrle_bytes,
            pages: self.c.xbzrle_pages,
            cache_miss: self.shards.iter().map(|s| s.cache_miss).sum(),
            cache_miss_rate: self.cache_miss_rate,
            encoding_rate: self.encoding_rate,
            overflow: self.shards.iter().map(|s| s.overflow).sum(),
        });
        MigrationInfo {
            status,
            total_time: Some(self.start.elapsed().as_millis() as u64),
            setup_time: Some(self.setup_ms),
            downtime: None,
            expected_downtime: (status == MigrationStatus::Active)
                .then_some(self.expected_downtime)
                .flatten(),
            ram: Some(ram),
            xbzrle_cache,
            cpu_throttle_percentage: (self.throttle > 0).then_some(self.throttle),
            error_desc: None,
        }
    }

    /// Bytes of stream produced (all of it on the wire once the sink is closed).
    fn transferred(&self) -> u64 {
        self.closed_bytes + self.w.bytes_written()
    }

    fn publish(&self) {
        let mut ctl = self.shared.lock();
        let status = ctl.status;
        ctl.info = self.info(status);
    }

    fn check_cancel(&self) -> Result<(), Stop> {
        if self.shared.cancel.load(Ordering::SeqCst) {
            Err(Stop::Cancelled)
        } else {
            Ok(())
        }
    }

    fn make_shards(&mut self) -> Result<(), Stop> {
        let n = if self.caps.x_parallel_encoding {
            let t = rayon::current_num_threads().max(1);
            1usize << (usize::BITS - 1 - t.leading_zeros())
        } else {
            1
        };
        self.shards.clear();
        for _ in 0..n {
            let cache = if self.caps.xbzrle {
                Some(
                    PageCache::new(self.params.xbzrle_cache_size / n as u64, Policy::default())
                        .map_err(|e| Stop::Failed(format!("XBZRLE cache: {e}")))?,
                )
            } else {
                None
            };
            self.shards.push(Shard {
                cache,
                jobs: Vec::new(),
                slots: vec![Slot::new()],
                kinds: Vec::new(),
                cache_miss: 0,
                overflow: 0,
                error: None,
            });
        }
        Ok(())
    }

    fn setup(&mut self) -> Result<(), Stop> {
        self.blocks = self.guest.blocks();
        if self.blocks.is_empty() {
            return Err(Stop::Failed("guest: no RAM blocks".into()));
        }
        let mut base = 0;
        for b in &self.blocks {
            self.base.push(base);
            base += b.used_length;
            let pages = b.pages();
            let mut bm = vec![u64::MAX; pages.div_ceil(64) as usize];
            if !pages.is_multiple_of(64)
                && let Some(l) = bm.last_mut()
            {
                *l = (1u64 << (pages % 64)) - 1;
            }
            self.bitmaps.push(bm);
            self.dirty_pages += pages;
        }
        self.total = base;
        self.make_shards()?;
        self.check_cancel()?;
        let infos: Vec<_> = self
            .blocks
            .iter()
            .map(|b| precopy_stream::RamBlockInfo::new(b.name.clone(), b.used_length))
            .collect();
        self.w.write_header(MACHINE_TYPE)?;
        self.w.ram_setup(&infos)?;
        self.w.flush()?;
        self.guest.log_start()?;
        // The setup sync (QEMU ram_init_bitmaps): the bitmap is all set already.
        self.sync()?;
        self.setup_ms = self.start.elapsed().as_millis() as u64;
        let now = Instant::now();
        self.est_start = now;
        self.period_start = now;
        let mut ctl = self.shared.lock();
        if ctl.status == MigrationStatus::Setup {
            self.shared.set_status(&mut ctl, MigrationStatus::Active);
        }
        drop(ctl);
        self.check_cancel()
    }

    fn apply_params(&mut self) -> Result<(), Stop> {
        let new = {
            let mut ctl = self.shared.lock();
            if !ctl.params_changed {
                return Ok(());
            }
            ctl.params_changed = false;
            ctl.params.clone()
        };
        if new.max_bandwidth != self.params.max_bandwidth {
            self.w.set_max_bandwidth(new.max_bandwidth);
        }
        if new.xbzrle_cache_size != self.params.xbzrle_cache_size {
            let n = self.shards.len() as u64;
            for s in &mut self.shards {
                if let Some(c) = &mut s.cache {
                    c.resize(new.xbzrle_cache_size / n)
                        .map_err(|e| Stop::Failed(format!("XBZRLE cache resize: {e}")))?;
                }
            }
        }
        self.params = new;
        Ok(())
    }

    /// Fetch-and-clear the dirty log of every block into the migration bitmap.
    fn sync(&mut self) -> Result<(), Stop> {
        let mut total = 0u64;
        let mut newly = 0u64;
        for (i, b) in self.blocks.iter().enumerate() {
            let bm = &mut self.bitmaps[i];
            let before: u64 = bm.iter().map(|w| u64::from(w.count_ones())).sum();
            self.guest.fetch_and_clear(i, bm)?;
            let pages = b.pages();
            if !pages.is_multiple_of(64)
                && let Some(l) = bm.last_mut()
            {
                *l &= (1u64 << (pages % 64)) - 1;
            }
            let after: u64 = bm.iter().map(|w| u64::from(w.count_ones())).sum();
            total += after;
            newly += after - before;
        }
        self.dirty_pages = total;
        self.sync_count += 1;
        if std::env::var_os("PRECOPY_TRACE").is_some() {
            eprintln!(
                "trace: sync {} at {:.3}s dirty {} new {} sent {} threshold {} throttle {}",
                self.sync_count,
                self.start.elapsed().as_secs_f64(),
                total,
                newly,
                self.w.bytes_written(),
                self.threshold,
                self.throttle
            );
        }
        self.period_dirty += newly;
        self.synced_clean = true;
        let now = Instant::now();
        let elapsed = now - self.period_start;
        if elapsed >= SYNC_PERIOD {
            let ms = elapsed.as_secs_f64() * 1000.0;
            let sent = self.w.bytes_written() - self.period_bytes;
            self.dirty_pages_rate = (self.period_dirty as f64 * 1000.0 / ms) as u64;
            let handled = self.c.handled - self.period_handled;
            let misses: u64 = self.shards.iter().map(|s| s.cache_miss).sum();
            if handled > 0 {
                self.cache_miss_rate = (misses - self.period_miss) as f64 / handled as f64;
            }
            let xp = self.c.xbzrle_pages - self.period_xbzrle_pages;
            let xb = self.c.xbzrle_bytes - self.period_xbzrle_bytes;
            // QEMU: 0 when no XBZRLE page went out in the period.
            self.encoding_rate = if xb > 0 && xp > 0 {
                (xp * PAGE) as f64 / xb as f64
            } else {
                0.0
            };
            if self.caps.auto_converge
                && let Some(t) =
                    self.ac
                        .on_period(&self.params, self.period_dirty * PAGE, sent, self.throttle)
            {
                self.guest.set_throttle(t)?;
                self.throttle = t;
            }
            self.period_start = now;
            self.period_bytes = self.w.bytes_written();
            self.period_dirty = 0;
            self.period_handled = self.c.handled;
            self.period_miss = misses;
            self.period_xbzrle_pages = self.c.xbzrle_pages;
            self.period_xbzrle_bytes = self.c.xbzrle_bytes;
        }
        Ok(())
    }

    /// Every 100 ms: bandwidth, threshold, expected downtime (QEMU migration_update_counters).
    fn update_counters(&mut self, now: Instant) {
        let ms = (now - self.est_start).as_secs_f64() * 1000.0;
        let bytes = self.w.bytes_written() - self.est_bytes;
        let e = policy::estimate(
            bytes,
            ms,
            self.dirty_pages * PAGE,
            self.params.downtime_limit,
            self.params.avail_switchover_bandwidth,
        );
        self.threshold = e.threshold_bytes;
        self.expected_downtime = e.expected_downtime_ms;
        self.mbps = e.mbps;
        self.pages_per_second = ((self.c.handled - self.est_handled) as f64 * 1000.0 / ms) as u64;
        self.est_start = now;
        self.est_bytes = self.w.bytes_written();
        self.est_handled = self.c.handled;
        self.publish();
    }

    /// Take the next dirty page from the migration bitmap (clearing its bit), or `None` at
    /// the end of the pass (the cursor then restarts at the first block).
    fn next_dirty(&mut self) -> Option<(usize, u64)> {
        while self.cur_block < self.bitmaps.len() {
            let bm = &mut self.bitmaps[self.cur_block];
            while self.cur_word < bm.len() {
                let w = bm[self.cur_word];
                if w != 0 {
                    let bit = w.trailing_zeros();
                    bm[self.cur_word] = w & (w - 1);
                    self.dirty_pages -= 1;
                    return Some((self.cur_block, self.cur_word as u64 * 64 + u64::from(bit)));
                }
                self.cur_word += 1;
            }
            self.cur_block += 1;
            self.cur_word = 0;
        }
        self.cur_block = 0;
        self.cur_word = 0;
        None
    }

    fn emit(
        w: &mut StreamWriter<Box<dyn MigrationSink>>,
        c: &mut Counters,
        kind: Kind,
        slot: &Slot,
        block: usize,
        page: u64,
    ) -> Result<(), WriteError> {
        let offset = page * PAGE;
        match kind {
            Kind::Zero => {
                w.write_zero_page(block, offset)?;
                c.duplicate += 1;
            }
            Kind::Page => {
                w.write_page(block, offset, &slot.page)?;
                c.normal += 1;
            }
            Kind::Xbzrle(n) => {
                let before = w.bytes_written();
                w.write_xbzrle_page(block, offset, &slot.delta[..n])?;
                c.xbzrle_pages += 1;
                c.xbzrle_bytes += w.bytes_written() - before;
            }
            Kind::Unchanged => c.unchanged += 1,
        }
        c.handled += 1;
        Ok(())
    }

    fn generation(&self) -> u64 {
        self.sync_count
    }

    /// Send one page now (sequential path).
    fn send_one(&mut self, block: usize, page: u64, last_stage: bool) -> Result<(), Stop> {
        let addr = self.base[block] + page * PAGE;
        let generation = self.generation();
        let use_cache = self.xbzrle_active;
        let sh = &mut self.shards[0];
        let slot = &mut sh.slots[0];
        let kind = process_page(
            self.guest,
            &self.codec,
            if use_cache { sh.cache.as_mut() } else { None },
            slot,
            (&mut sh.cache_miss, &mut sh.overflow),
            (block, page, addr),
            generation,
            last_stage,
        )?;
        Self::emit(&mut self.w, &mut self.c, kind, slot, block, page)?;
        Ok(())
    }

    /// Send a batch of pages with the shards working in parallel.
    fn send_batch(&mut self, pages: &[(usize, u64)], last_stage: bool) -> Result<(), Stop> {
        let n = self.shards.len() as u64;
        for s in &mut self.shards {
            s.jobs.clear();
        }
        for &(b, p) in pages {
            let addr = self.base[b] + p * PAGE;
            self.shards[((addr / PAGE) % n) as usize]
                .jobs
                .push((b, p, addr));
        }
        let generation = self.generation();
        let use_cache = self.xbzrle_active;
        let guest = self.guest;
        let codec = &self.codec;
        self.shards.par_iter_mut().for_each(|sh| {
            while sh.slots.len() < sh.jobs.len() {
                sh.slots.push(Slot::new());
            }
            sh.kinds.clear();
            for (j, &job) in sh.jobs.iter().enumerate() {
                let r = process_page(
                    guest,
                    codec,
                    if use_cache { sh.cache.as_mut() } else { None },
                    &mut sh.slots[j],
                    (&mut sh.cache_miss, &mut sh.overflow),
                    job,
                    generation,
                    last_stage,
                );
                match r {
                    Ok(k) => sh.kinds.push(k),
                    Err(e) => {
                        sh.error = Some(e);
                        return;
                    }
                }
            }
        });
        for sh in &mut self.shards {
            if let Some(e) = sh.error.take() {
                return Err(e.into());
            }
            for (j, &(b, p, _)) in sh.jobs.iter().enumerate() {
                Self::emit(&mut self.w, &mut self.c, sh.kinds[j], &sh.slots[j], b, p)?;
            }
        }
        Ok(())
    }

    /// Send dirty pages until the rate limit, the end of the pass, or
    /// [`MAX_ITERATION_TIME`]. Returns true at the end of the pass.
    fn send_some(&mut self, last_stage: bool) -> Result<bool, Stop> {
        let t = Instant::now();
        let parallel = self.shards.len() > 1;
        let mut batch = Vec::with_capacity(PARALLEL_BATCH);
        let mut n = 0u32;
        loop {
            if !last_stage {
                if self.w.rate_limit_exceeded() {
                    return Ok(false);
                }
                n += 1;
                if n.is_multiple_of(16) && t.elapsed() >= MAX_ITERATION_TIME {
                    return Ok(false);
                }
            }
            if parallel {
                batch.clear();
                while batch.len() < PARALLEL_BATCH {
                    match self.next_dirty() {
                        Some(p) => batch.push(p),
                        None => break,
                    }
                }
                let end = batch.len() < PARALLEL_BATCH;
                if !batch.is_empty() {
                    self.synced_clean = false;
                    self.send_batch(&batch, last_stage)?;
                }
                if end {
                    return Ok(true);
                }
            } else {
                match self.next_dirty() {
                    Some((b, p)) => {
                        self.synced_clean = false;
                        self.send_one(b, p, last_stage)?;
                    }
                    None => return Ok(true),
                }
            }
        }
    }

    /// The active phase, then the switchover. Returns the downtime in ms.
    fn iterate(&mut self) -> Result<u64, Stop> {
        loop {
            self.check_cancel()?;
            self.apply_params()?;
            let now = Instant::now();
            if now - self.est_start >= ESTIMATE_PERIOD {
                self.update_counters(now);
            }
            let pending = self.dirty_pages * PAGE;
            if policy::should_switchover(pending, self.threshold) {
                if !self.synced_clean {
                    self.sync()?;
                }
                if policy::should_switchover(self.dirty_pages * PAGE, self.threshold) {
                    return self.complete();
                }
            }
            if let Some(limit) = self.pass_limit
                && self.sync_count > limit
            {
                return Err(Stop::Failed(format!(
                    "did not converge within {limit} dirty-bitmap syncs"
                )));
            }
            self.w.begin_ram_iteration()?;
            let pass_end = self.send_some(false)?;
            self.w.end_ram_section()?;
            if pass_end {
                // The bulk stage is over: XBZRLE from now on (QEMU xbzrle_enabled).
                self.xbzrle_active = self.caps.xbzrle;
                self.sync()?;
            }
            if self.w.rate_limit_exceeded() {
                self.w.wait_for_rate_limit()?;
                // A new rate-limit slice starts now: estimate over the slice that ended, so
                // the period holds exactly one slice's budget (QEMU does both at
                // iteration_start_time).
                let now = Instant::now();
                if now - self.est_start >= ESTIMATE_PERIOD / 2 {
                    self.update_counters(now);
                }
            }
        }
    }

    fn complete(&mut self) -> Result<u64, Stop> {
        self.c.precopy_bytes = self.w.bytes_written();
        let stop_at = Instant::now();
        self.guest.stop()?;
        self.stopped = true;
        self.check_cancel()?;
        self.sync()?;
        self.w.begin_ram_complete()?;
        // The cursor may be mid-bitmap (a sync happened mid-pass), so one sweep to the end
        // can miss pages before it: go round until no dirty page is left (QEMU
        // ram_save_complete loops until ram_find_and_save_block finds nothing).
        while !self.send_some(true)? || self.dirty_pages > 0 {}
        self.w.end_ram_section()?;
        for (name, instance, version, payload) in self.guest.device_states()? {
            self.w
                .write_device_state(&name, instance, version, &payload)?;
        }
        self.w.write_eof()?;
        self.w.flush()?;
        let downtime = stop_at.elapsed().as_millis() as u64;
        self.check_cancel()?;
        let digest = ram_digest(self.guest, &self.blocks)?;
        let desc = vm_description(&self.blocks, &digest);
        self.w.write_vm_description(desc.as_bytes())?;
        self.w.flush()?;
        // Hand the sink back (finish flushes) and close it; keep the byte count.
        let w = std::mem::replace(&mut self.w, StreamWriter::new(Box::new(io::sink())));
        self.closed_bytes = w.bytes_written();
        w.finish()
            .map_err(Stop::from)?
            .close()
            .map_err(|e| Stop::Failed(format!("closing the transport: {e}")))?;
        self.publish();
        Ok(downtime)
    }
}

/// The digest of a guest's RAM as the VM description carries it: BLAKE3 over, for each
/// block in order, the u8 name length, the name, the be64 used length, then the block's
/// bytes. Returned as lowercase hex.
pub fn ram_digest(guest: &dyn Guest, blocks: &[RamBlockInfo]) -> Result<String, GuestError> {
    const CHUNK_PAGES: usize = 512;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
    for (i, b) in blocks.iter().enumerate() {
        digest_block_header(&mut h, &b.name, b.used_length);
        let mut p = 0;
        while p < b.pages() {
            let n = (b.pages() - p).min(CHUNK_PAGES as u64) as usize;
            for (k, chunk) in buf[..n * PAGE_SIZE].chunks_exact_mut(PAGE_SIZE).enumerate() {
                let page: &mut Page = chunk.try_into().expect("page-sized chunk");
                guest.read_page(i, p + k as u64, page)?;
            }
            h.update_rayon(&buf[..n * PAGE_SIZE]);
            p += n as u64;
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Feed one block header into a RAM digest (see [`ram_digest`]).
pub(crate) fn digest_block_header(h: &mut blake3::Hasher, name: &str, used_length: u64) {
    h.update(&[name.len() as u8]);
    h.update(name.as_bytes());
    h.update(&used_length.to_be_bytes());
}

/// Key of our data in the VM description JSON.
pub const VMDESC_KEY: &str = "precopy";

fn vm_description(blocks: &[RamBlockInfo], digest: &str) -> String {
    let blocks: Vec<_> = blocks
        .iter()
        .map(|b| serde_json::json!({"name": b.name, "used-length": b.used_length}))
        .collect();
    serde_json::json!({
        "page_size": PAGE_SIZE,
        "devices": [],
        VMDESC_KEY: {
            "ram-digest": {"algorithm": "blake3", "value": digest},
            "blocks": blocks,
        }
    })
    .to_string()
}
