//! vCPU threads and their controller: run, stop (kick out of `KVM_RUN`
//! with a signal plus `immediate_exit`, then park), resume, CPU throttle
//! (sleep the throttle's share of every 10 ms slice, as QEMU's
//! `cpu-throttle.c` does) and dirty-rate pacing.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use super::{KvmError, VcpuError};

/// Length of one throttle slice (QEMU's `CPU_THROTTLE_TIMESLICE_NS`).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How long [`VcpuSet::stop`] waits for every vCPU to park.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

mod setup;
mod thread;

pub use setup::{setup_protected_mode, start_mailbox};
use thread::{AsPthread, install_kick_handler, kick, lock, throttle_ticker, vcpu_thread};

/// State shared by the controller and one vCPU thread.
#[derive(Debug)]
struct Shared {
    index: usize,
    /// The VcpuFd; the thread holds the lock while in `KVM_RUN`.
    fd: Mutex<VcpuFd>,
    /// Pointer to the vCPU's `kvm_run.immediate_exit` byte.
    immediate_exit: AtomicPtr<u8>,
    stop: AtomicBool,
    /// Park at the next pacing exit, i.e. at the end of a guest round.
    stop_at_round_end: AtomicBool,
    quit: AtomicBool,
    throttle_due: AtomicBool,
    /// Park state, protected by the mutex for the condition variable.
    park: Mutex<ParkState>,
    cond: Condvar,
    /// Rounds the guest reported through the pacing port.
    exits: AtomicU64,
}

#[derive(Debug, Default)]
struct ParkState {
    parked: bool,
    /// Times the thread has parked (to wait for a new park).
    parks: u64,
    /// First fatal error of the vCPU thread (it then stays parked).
    error: Option<VcpuError>,
}

/// VM-wide knobs the controller changes while vCPUs run.
#[derive(Debug, Default)]
struct Knobs {
    /// Throttle percentage, 0..=99.
    throttle: AtomicU32,
    /// Target dirty rate per vCPU in pages/s (0 = unpaced).
    rate_per_vcpu: AtomicU64,
    /// Ticker shutdown.
    quit: AtomicBool,
}

/// The vCPUs of one VM, each on its own thread, and their controller.
///
/// Threads start parked; [`VcpuSet::resume`] runs them. Dropping the set
/// stops and joins every thread.
#[derive(Debug)]
pub struct VcpuSet {
    vcpus: Vec<(Arc<Shared>, JoinHandle<()>)>,
    knobs: Arc<Knobs>,
    ticker: Option<JoinHandle<()>>,
}

impl VcpuSet {
    /// Spawns one parked thread per vCPU fd (index = position).
    ///
    /// Errors: [`KvmError::KickHandler`], [`KvmError::VcpuThread`] or
    /// [`KvmError::ThrottleTicker`] when the kick handler or a thread cannot
    /// be set up.
    pub fn spawn(fds: Vec<VcpuFd>) -> Result<Self, KvmError> {
        install_kick_handler()?;
        let knobs = Arc::new(Knobs::default());
        let mut vcpus = Vec::with_capacity(fds.len());
        for (index, mut fd) in fds.into_iter().enumerate() {
            let ptr: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
            let shared = Arc::new(Shared {
                index,
                fd: Mutex::new(fd),
                immediate_exit: AtomicPtr::new(ptr),
                stop: AtomicBool::new(true),
                stop_at_round_end: AtomicBool::new(false),
                quit: AtomicBool::new(false),
                throttle_due: AtomicBool::new(false),
                park: Mutex::new(ParkState::default()),
                cond: Condvar::new(),
                exits: AtomicU64::new(0),
            });
            let (s, k) = (shared.clone(), knobs.clone());
            let handle = std::thread::Builder::new()
                .name(format!("kvm-vcpu{index}"))
                .spawn(move || vcpu_thread(&s, &k))
                .map_err(|source| KvmError::VcpuThread { index, source })?;
            vcpus.push((shared, handle));
        }
        let k = knobs.clone();
        let kicks: Vec<(Arc<Shared>, libc::pthread_t)> = vcpus
            .iter()
            .map(|(s, h)| {
                (
                    s.clone(),
                    std::os::unix::thread::JoinHandleExt::as_pthread_t(h),
                )
            })
            .collect();
        let ticker = std::thread::Builder::new()
            .name("kvm-throttle".into())
            .spawn(move || throttle_ticker(&k, &kicks))
            .map_err(KvmError::ThrottleTicker)?;
        let set = Self {
            vcpus,
            knobs,
            ticker: Some(ticker),
        };
        set.wait_parked()?;
        Ok(set)
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.vcpus.len()
    }

    /// Whether there are no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }

    /// Stops every vCPU: asks it to park, kicks it out of `KVM_RUN`, and
    /// waits until all are parked. Idempotent.
    ///
    /// Errors: [`KvmError::Timeout`] if a vCPU does not park within 5 s,
    /// [`KvmError::Vcpu`] if a vCPU thread failed.
    pub fn stop(&self) -> Result<(), KvmError> {
        for (s, h) in &self.vcpus {
            s.stop.store(true, Ordering::SeqCst);
            kick(s, h.as_pthread());
            let _g = lock(&s.park);
            s.cond.notify_all();
        }
        self.wait_parked()
    }

    fn wait_parked(&self) -> Result<(), KvmError> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        for (s, h) in &self.vcpus {
            let mut st = lock(&s.park);
            loop {
                if let Some(e) = &st.error {
                    return Err(KvmError::Vcpu {
                        index: s.index,
                        error: e.clone(),
                    });
                }
                if st.parked {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(KvmError::Timeout("stop"));
                }
                // Re-kick in case the first signal landed before KVM_RUN.
                kick(s, h.as_pthread());
                st = s
                    .cond
                    .wait_timeout(st, Duration::from_millis(5).min(deadline - now))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        Ok(())
    }

    /// Runs every vCPU to the end of its current guest round (its next
    /// pacing exit) and parks it there, where the guest program's
    /// invariants hold (a plain [`VcpuSet::stop`] may stop a vCPU between
    /// two stores of one update). Leaves the vCPUs stopped.
    ///
    /// Errors: [`KvmError::Timeout`] after 30 s, [`KvmError::Vcpu`].
    pub fn stop_at_round_end(&self) -> Result<(), KvmError> {
        let mut before = Vec::with_capacity(self.vcpus.len());
        for (s, _) in &self.vcpus {
            let g = lock(&s.park);
            before.push(g.parks);
            s.stop_at_round_end.store(true, Ordering::SeqCst);
            s.stop.store(false, Ordering::SeqCst);
            s.cond.notify_all();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for ((s, _), parks) in self.vcpus.iter().zip(before) {
            let mut g = lock(&s.park);
            loop {
                if let Some(e) = &g.error {
                    return Err(KvmError::Vcpu {
                        index: s.index,
                        error: e.clone(),
                    });
                }
                if g.parked && g.parks > parks {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    s.stop.store(true, Ordering::SeqCst);
                    drop(g);
                    let _ = self.stop();
                    return Err(KvmError::Timeout("finish their round"));
                }
                g = s
                    .cond
                    .wait_timeout(g, (deadline - now).min(Duration::from_millis(50)))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        Ok(())
    }

    /// Resumes every parked vCPU.
    ///
    /// Errors: [`KvmError::Vcpu`] if a vCPU thread has failed.
    pub fn resume(&self) -> Result<(), KvmError> {
        for (s, _) in &self.vcpus {
            if let Some(e) = &lock(&s.park).error {
                return Err(KvmError::Vcpu {
                    index: s.index,
                    error: e.clone(),
                });
            }
        }
        for (s, _) in &self.vcpus {
            let _g = lock(&s.park);
            s.stop.store(false, Ordering::SeqCst);
            s.cond.notify_all();
        }
        Ok(())
    }

    /// Whether every vCPU is parked.
    pub fn is_stopped(&self) -> bool {
        self.vcpus.iter().all(|(s, _)| lock(&s.park).parked)
    }

    /// Sets the CPU throttle, in percent; clamped to 0..=99. Every vCPU then
    /// sleeps `percent`% of each [`THROTTLE_SLICE`].
    pub fn set_throttle(&self, percent: u32) {
        self.knobs.throttle.store(percent.min(99), Ordering::SeqCst);
    }

    /// Current CPU throttle in percent.
    pub fn throttle(&self) -> u32 {
        self.knobs.throttle.load(Ordering::SeqCst)
    }

    /// Sets the target dirty rate of the whole guest in pages per second
    /// (0 = as fast as the vCPUs run); split evenly between the vCPUs.
    pub fn set_dirty_rate(&self, pages_per_sec: u64) {
        let n = self.vcpus.len().max(1) as u64;
        let per = if pages_per_sec == 0 {
            0
        } else {
            pages_per_sec.div_ceil(n)
        };
        self.knobs.rate_per_vcpu.store(per, Ordering::SeqCst);
    }

    /// Runs `f` on vCPU `index`'s fd. The vCPUs must be stopped.
    ///
    /// Errors: [`KvmError::Vcpu`] when `index` is out of range or the vCPUs
    /// are running.
    pub fn with_fd<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Result<R, KvmError> {
        let (s, _) = self.vcpus.get(index).ok_or(KvmError::Vcpu {
            index,
            error: VcpuError::NoSuchVcpu,
        })?;
        if !lock(&s.park).parked {
            return Err(KvmError::Vcpu {
                index,
                error: VcpuError::Running,
            });
        }
        let fd = lock(&s.fd);
        Ok(f(&fd))
    }

    /// Rounds reported by vCPU `index` through the pacing port since spawn.
    pub fn pacing_exits(&self, index: usize) -> u64 {
        self.vcpus
            .get(index)
            .map_or(0, |(s, _)| s.exits.load(Ordering::Relaxed))
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.knobs.quit.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        for (s, h) in &self.vcpus {
            s.quit.store(true, Ordering::SeqCst);
            s.stop.store(true, Ordering::SeqCst);
            let _g = lock(&s.park);
            s.cond.notify_all();
            drop(_g);
            kick(s, h.as_pthread());
        }
        for (s, h) in self.vcpus.drain(..) {
            // A thread stuck before KVM_RUN is released by immediate_exit;
            // keep kicking until it has gone.
            while !h.is_finished() {
                kick(&s, h.as_pthread());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = h.join();
        }
    }
}
