//! vCPU threads and their controller: run, stop (kick out of `KVM_RUN`
//! with a signal plus `immediate_exit`, then park), resume, CPU throttle
//! (sleep the throttle's share of every 10 ms slice, as QEMU's
//! `cpu-throttle.c` does) and dirty-rate pacing.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_segment;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use super::KvmError;
use super::program::{CODE_BASE, GDT_BASE, PACING_PORT, mailbox_addr};

/// Length of one throttle slice (QEMU's `CPU_THROTTLE_TIMESLICE_NS`).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How long [`VcpuSet::stop`] waits for every vCPU to park.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), KvmError> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let errno = *RESULT.get_or_init(|| {
        register_signal_handler(kick_signal(), on_kick)
            .err()
            .map_or(0, |e| e.errno())
    });
    if errno != 0 {
        return Err(KvmError::Vcpu {
            index: 0,
            what: format!("installing the kick signal handler: errno {errno}"),
        });
    }
    Ok(())
}

/// Flat 32-bit protected mode: CS = 0x08 (code), data segments = 0x10,
/// GDT at [`GDT_BASE`], CR0 = PE | ET, no paging.
pub fn setup_protected_mode(vcpu: &VcpuFd, mailbox: u64) -> Result<(), KvmError> {
    let mut sregs = vcpu.get_sregs().map_err(|source| KvmError::Ioctl {
        op: "KVM_GET_SREGS",
        source,
    })?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_BASE;
    sregs.gdt.limit = 23;
    sregs.cr0 = 0x11;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(|source| KvmError::Ioctl {
        op: "KVM_SET_SREGS",
        source,
    })?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_BASE,
        rflags: 2,
        rbx: mailbox,
        rsp: 0x8000,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|source| KvmError::Ioctl {
        op: "KVM_SET_REGS",
        source,
    })
}

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
    error: Option<String>,
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
    /// Errors: [`KvmError::Vcpu`] when the kick handler or a thread cannot
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
                .map_err(|e| KvmError::Vcpu {
                    index,
                    what: format!("spawning thread: {e}"),
                })?;
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
            .map_err(|e| KvmError::Vcpu {
                index: 0,
                what: format!("spawning throttle ticker: {e}"),
            })?;
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
                        what: e.clone(),
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
                        what: e.clone(),
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
                    what: e.clone(),
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
        let (s, _) = self.vcpus.get(index).ok_or_else(|| KvmError::Vcpu {
            index,
            what: "no such vCPU".into(),
        })?;
        if !lock(&s.park).parked {
            return Err(KvmError::Vcpu {
                index,
                what: "vCPU is running; stop it first".into(),
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

trait AsPthread {
    fn as_pthread(&self) -> libc::pthread_t;
}

impl AsPthread for JoinHandle<()> {
    fn as_pthread(&self) -> libc::pthread_t {
        std::os::unix::thread::JoinHandleExt::as_pthread_t(self)
    }
}

/// Sets `immediate_exit` and signals the thread so that `KVM_RUN` returns
/// `EINTR` whether the thread is inside it or about to enter it.
fn kick(s: &Shared, thread: libc::pthread_t) {
    let ptr = s.immediate_exit.load(Ordering::SeqCst);
    // SAFETY: `ptr` points at the `immediate_exit` byte of the vCPU's
    // mmap'ed `kvm_run`, alive as long as the VcpuFd in `s.fd`, which `s`
    // owns; the byte is only accessed atomically by us (and read by KVM).
    unsafe { AtomicU8::from_ptr(ptr) }.store(1, Ordering::SeqCst);
    // SAFETY: `thread` is a live thread of this process: its JoinHandle is
    // joined only after the last kick (the ticker is joined first in Drop).
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

fn clear_immediate_exit(s: &Shared) {
    let ptr = s.immediate_exit.load(Ordering::SeqCst);
    // SAFETY: as in `kick`.
    unsafe { AtomicU8::from_ptr(ptr) }.store(0, Ordering::SeqCst);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps up to `d`, waking early when the vCPU is asked to stop or quit.
fn interruptible_sleep(s: &Shared, d: Duration) {
    let deadline = Instant::now() + d;
    let mut g = lock(&s.park);
    loop {
        if s.stop.load(Ordering::SeqCst) || s.quit.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        g = s
            .cond
            .wait_timeout(g, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

fn park(s: &Shared) {
    let mut g = lock(&s.park);
    g.parked = true;
    g.parks += 1;
    s.cond.notify_all();
    while s.stop.load(Ordering::SeqCst) && !s.quit.load(Ordering::SeqCst) {
        g = s.cond.wait(g).unwrap_or_else(|p| p.into_inner());
    }
    g.parked = false;
}

fn fail(s: &Shared, what: String) {
    let mut g = lock(&s.park);
    if g.error.is_none() {
        g.error = Some(what);
    }
    g.parked = true;
    s.cond.notify_all();
}

fn vcpu_thread(s: &Shared, knobs: &Knobs) {
    // Pacing: pages the guest reported since `epoch`.
    let mut epoch = Instant::now();
    let mut pages = 0u64;
    loop {
        if s.quit.load(Ordering::SeqCst) {
            return;
        }
        if s.stop.load(Ordering::SeqCst) {
            park(s);
            epoch = Instant::now();
            pages = 0;
            continue;
        }
        if s.throttle_due.swap(false, Ordering::SeqCst) {
            let pct = knobs.throttle.load(Ordering::SeqCst);
            if pct > 0 {
                interruptible_sleep(s, THROTTLE_SLICE * pct / 100);
            }
            continue;
        }
        let mut fd = lock(&s.fd);
        let exit = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == PACING_PORT => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                Some(u64::from(u32::from_le_bytes(b)))
            }
            Ok(VcpuExit::Intr) => None,
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                drop(fd);
                fail(s, what);
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => {
                drop(fd);
                fail(s, format!("KVM_RUN: {e}"));
                return;
            }
        };
        drop(fd);
        clear_immediate_exit(s);
        if let Some(n) = exit {
            s.exits.fetch_add(1, Ordering::Relaxed);
            if s.stop_at_round_end.swap(false, Ordering::SeqCst) {
                s.stop.store(true, Ordering::SeqCst);
                continue;
            }
            let rate = knobs.rate_per_vcpu.load(Ordering::SeqCst);
            if rate > 0 {
                pages += n;
                let due = Duration::from_secs_f64(pages as f64 / rate as f64);
                let elapsed = epoch.elapsed();
                if due > elapsed {
                    interruptible_sleep(s, due - elapsed);
                } else if elapsed - due > 2 * THROTTLE_SLICE {
                    // Behind schedule (throttled or slow): no catching up,
                    // so a throttle shows in the guest's measured rate.
                    epoch = Instant::now();
                    pages = 0;
                }
            }
        }
    }
}

/// Every [`THROTTLE_SLICE`] while the throttle is non-zero, marks each vCPU
/// as due for its throttle sleep and kicks it (QEMU's `cpu_throttle_timer_tick`).
fn throttle_ticker(knobs: &Knobs, vcpus: &[(Arc<Shared>, libc::pthread_t)]) {
    let mut next = Instant::now();
    while !knobs.quit.load(Ordering::SeqCst) {
        next += THROTTLE_SLICE;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
        if knobs.throttle.load(Ordering::SeqCst) == 0 {
            continue;
        }
        for (s, t) in vcpus {
            if !s.stop.load(Ordering::SeqCst) && !s.quit.load(Ordering::SeqCst) {
                s.throttle_due.store(true, Ordering::SeqCst);
                kick(s, *t);
            }
        }
    }
}

/// Mailbox address that vCPU `index` starts with in `EBX`.
pub fn start_mailbox(index: usize) -> u64 {
    mailbox_addr(index)
}
