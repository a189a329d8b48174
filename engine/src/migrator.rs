//! The control API of the source, like QMP's: [`Migrator`] (`migrate`, `query-migrate`,
//! `migrate_cancel`, `migrate-set-parameters`, `migrate-set-capabilities`, blockers and
//! state-change events). The loop it starts is in [`crate::source`].

use std::fmt;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::guest::SharedGuest;
use crate::info::{MigrationInfo, MigrationStatus, StateChange};
use crate::params::{Capabilities, MigrationParameters, ParameterError, ParameterUpdate};
use crate::source::control::Shared;
use crate::source::{self, Settings};
use crate::transport::{AbortHandle, MigrationSink, MigrationUri, Outgoing, TransportError};
use precopy_stream::multifd::{Hello, MAX_CHANNELS};
use std::io::Write as _;

/// How long one write on a multifd connection may block before the migration fails
/// (a destination that accepted one connection and never reads the others, as `nc -l`).
pub const MULTIFD_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The migration thread could not be started.
    #[error("cannot spawn the migration thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// [`Migrator::wait`] found no migration to wait for.
    #[error("no migration was started")]
    NotStarted,
    /// The `multifd` capability with a transport that is not a socket (`file:`, `exec:`,
    /// `fd:`), or a multifd start with no page channel or more than 255.
    #[error(
        "multifd needs a socket transport (tcp:HOST:PORT or unix:PATH) and 1..=255 page channels: {why}"
    )]
    Multifd {
        /// What was given.
        why: String,
    },
}

/// A registered migration blocker (QEMU `migrate_add_blocker`); remove it with
/// [`Migrator::remove_blocker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockerId(u64);

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
            shared: Arc::new(Shared::default()),
        }
    }

    /// The guest being migrated.
    pub fn guest(&self) -> &SharedGuest {
        &self.guest
    }

    /// The current state.
    pub fn status(&self) -> MigrationStatus {
        self.shared.lock().status()
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
        if ctl.status().is_active() {
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
        let (multifd, channels) = {
            let ctl = self.shared.lock();
            (ctl.caps.multifd, ctl.params.multifd_channels)
        };
        if multifd {
            return self.start_multifd(uri, channels);
        }
        // The URI is parsed once, by `Outgoing::open`: a malformed URI changes nothing.
        match Outgoing::open(uri) {
            Ok(out) => {
                let abort = out.abort_handle();
                self.spawn(Box::new(out), Vec::new(), Some(abort))
            }
            Err(e) => self.connect_failed(e),
        }
    }

    /// A connection error fails the migration (as in QEMU); a malformed URI changes
    /// nothing.
    fn connect_failed(&self, e: TransportError) -> Result<(), MigrateError> {
        if matches!(
            e,
            TransportError::UnknownScheme(_) | TransportError::BadUri { .. }
        ) {
            return Err(e.into());
        }
        let mut ctl = self.shared.lock();
        ctl.publish(MigrationInfo {
            error_desc: Some(e.to_string()),
            ..Default::default()
        });
        self.shared.set_status(&mut ctl, MigrationStatus::Setup);
        self.shared.set_status(&mut ctl, MigrationStatus::Failed);
        Err(e.into())
    }

    /// `migrate URI` with the `multifd` capability: the main connection, then
    /// `channels` page connections, all to `uri` (`tcp:` or `unix:`).
    fn start_multifd(&self, uri: &str, channels: u16) -> Result<(), MigrateError> {
        let parsed: MigrationUri = uri.parse()?;
        if !matches!(parsed, MigrationUri::Tcp { .. } | MigrationUri::Unix(_)) {
            return Err(MigrateError::Multifd {
                why: format!("{uri} is not a socket"),
            });
        }
        // Each connection says its hello as soon as it is open: a destination reads the
        // first one before it accepts the others, and only the listen backlog (128 on
        // Linux) holds connections it has not accepted yet.
        let id = source::new_migration_id();
        let mut conns = Vec::with_capacity(usize::from(channels) + 1);
        for index in 0..=channels {
            let hello = Hello {
                migration_id: id,
                index,
                channels,
            };
            let opened = Outgoing::open(uri).and_then(|mut o| {
                o.set_write_timeout(Some(MULTIFD_WRITE_TIMEOUT));
                o.write_all(&hello.to_bytes())
                    .map_err(|e| TransportError::Io {
                        what: "send the multifd hello to",
                        uri: uri.to_owned(),
                        source: e,
                    })?;
                Ok(o)
            });
            match opened {
                Ok(o) => conns.push(o),
                Err(e) => return self.connect_failed(e),
            }
        }
        let abort = AbortHandle::join(conns.iter().map(Outgoing::abort_handle));
        let mut conns = conns.into_iter();
        let main = conns.next().expect("channels + 1 connections");
        let pages = conns
            .map(|c| Box::new(c) as Box<dyn MigrationSink>)
            .collect();
        self.spawn_with(Box::new(main), pages, Some(abort), Some(id))
    }

    /// Start a migration into any sink (a `Vec<u8>`, `io::sink()`, a socket you connected).
    ///
    /// Errors: [`MigrateError::InProgress`], [`MigrateError::Blocked`].
    pub fn start_to<S: MigrationSink + 'static>(&self, sink: S) -> Result<(), MigrateError> {
        self.precheck()?;
        self.spawn(Box::new(sink), Vec::new(), None)
    }

    /// Start a multifd migration into sinks you opened: `main` gets the main channel,
    /// `channels[i]` page channel `i + 1` (layout: [`precopy_stream::multifd`]). Every
    /// sink starts with its hello. The `multifd` capability and `multifd-channels` are not
    /// consulted: the number of sinks decides. Cancel cannot unblock a sink that blocks.
    ///
    /// Errors: [`MigrateError::Multifd`] for 0 or more than 255 channels,
    /// [`MigrateError::InProgress`], [`MigrateError::Blocked`].
    pub fn start_multifd_to<S: MigrationSink + 'static>(
        &self,
        main: S,
        channels: Vec<S>,
    ) -> Result<(), MigrateError> {
        if channels.is_empty() || channels.len() > usize::from(MAX_CHANNELS) {
            return Err(MigrateError::Multifd {
                why: format!("{} page channels", channels.len()),
            });
        }
        self.precheck()?;
        let pages = channels
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn MigrationSink>)
            .collect();
        self.spawn(Box::new(main), pages, None)
    }

    fn precheck(&self) -> Result<(), MigrateError> {
        let ctl = self.shared.lock();
        if ctl.status().is_active() {
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
        channels: Vec<Box<dyn MigrationSink>>,
        abort: Option<AbortHandle>,
    ) -> Result<(), MigrateError> {
        self.spawn_with(sink, channels, abort, None)
    }

    /// `hellos_sent`: the multifd hellos with this migration id were written already.
    fn spawn_with(
        &self,
        sink: Box<dyn MigrationSink>,
        channels: Vec<Box<dyn MigrationSink>>,
        abort: Option<AbortHandle>,
        hellos_sent: Option<[u8; 16]>,
    ) -> Result<(), MigrateError> {
        let mut ctl = self.shared.lock();
        if ctl.status().is_active() {
            return Err(MigrateError::InProgress);
        }
        if let Some(t) = ctl.thread.take() {
            let _ = t.join();
        }
        self.shared.set_cancel(false);
        ctl.publish(MigrationInfo::default());
        ctl.params_changed = false;
        ctl.abort = abort;
        self.shared.set_status(&mut ctl, MigrationStatus::Setup);
        let settings = Settings {
            params: ctl.params.clone(),
            caps: ctl.caps,
            pass_limit: ctl.pass_limit,
            channels,
            hellos_sent,
        };
        let guest = Arc::clone(&self.guest);
        let shared = Arc::clone(&self.shared);
        let t = std::thread::Builder::new()
            .name("live_migration".into())
            .spawn(move || source::run(guest, shared, sink, settings))
            .map_err(MigrateError::Spawn)?;
        ctl.thread = Some(t);
        Ok(())
    }

    /// Cancel the migration in progress (`migrate_cancel`): the state goes to cancelling,
    /// then cancelled once the source is restored. No effect when none is in progress.
    pub fn cancel(&self) {
        let mut ctl = self.shared.lock();
        if !ctl.status().is_active() {
            return;
        }
        self.shared.set_cancel(true);
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
            if ctl.status() == MigrationStatus::None {
                return Err(MigrateError::NotStarted);
            }
            ctl.thread.take()
        };
        if let Some(t) = t {
            let _ = t.join();
        }
        let mut ctl = self.shared.lock();
        while ctl.status().is_active() {
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
            if ctl.status() == status || ctl.status().is_finished() {
                return ctl.status();
            }
            let now = Instant::now();
            if now >= deadline {
                return ctl.status();
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
