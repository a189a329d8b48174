//! The state shared by the control API ([`Migrator`](crate::Migrator)) and the migration
//! thread: parameters, capabilities, blockers, the `query-migrate` info (whose `status` is
//! the one state), subscribers, and the cancel flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;

use crate::info::{MigrationInfo, MigrationStatus, StateChange};
use crate::migrator::BlockerId;
use crate::params::{Capabilities, MigrationParameters};
use crate::transport::AbortHandle;

/// Everything behind the lock.
#[derive(Default)]
pub(crate) struct Ctl {
    pub(crate) params: MigrationParameters,
    pub(crate) caps: Capabilities,
    pub(crate) blockers: Vec<(BlockerId, String)>,
    pub(crate) next_blocker: u64,
    /// The last `query-migrate`; `info.status` is the migration state.
    pub(crate) info: MigrationInfo,
    pub(crate) listeners: Vec<mpsc::Sender<StateChange>>,
    pub(crate) thread: Option<JoinHandle<()>>,
    pub(crate) abort: Option<AbortHandle>,
    /// `migrate-set-parameters` ran since the thread last looked.
    pub(crate) params_changed: bool,
    /// Fail after this many dirty-bitmap syncs (our own knob).
    pub(crate) pass_limit: Option<u64>,
}

impl Ctl {
    /// The migration state.
    pub(crate) fn status(&self) -> MigrationStatus {
        self.info.status
    }

    /// Replace the published statistics, keeping the state (changed only through
    /// [`Shared::set_status`], which tells the subscribers).
    pub(crate) fn publish(&mut self, info: MigrationInfo) {
        self.info = MigrationInfo {
            status: self.info.status,
            ..info
        };
    }
}

/// The control state and the means to wait for it and to cancel.
#[derive(Default)]
pub(crate) struct Shared {
    ctl: Mutex<Ctl>,
    pub(crate) cv: Condvar,
    cancel: AtomicBool,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Move to state `to`; subscribers get a [`StateChange`] and waiters wake up.
    pub(crate) fn set_status(&self, ctl: &mut Ctl, to: MigrationStatus) {
        let from = ctl.status();
        if from == to {
            return;
        }
        ctl.info.status = to;
        ctl.listeners
            .retain(|l| l.send(StateChange { from, to }).is_ok());
        self.cv.notify_all();
    }

    /// Whether `migrate_cancel` was asked for.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Set or clear the cancel flag.
    pub(crate) fn set_cancel(&self, on: bool) {
        self.cancel.store(on, Ordering::SeqCst);
    }
}
