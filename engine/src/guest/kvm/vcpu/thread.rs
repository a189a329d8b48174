//! The vCPU thread side: kicking a thread out of `KVM_RUN`, parking, throttle sleeps,
//! dirty-rate pacing, and the throttle ticker.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use super::super::program::PACING_PORT;
use super::super::{KvmError, VcpuError};
use super::{Knobs, Shared, THROTTLE_SLICE};

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub(super) fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub(super) fn install_kick_handler() -> Result<(), KvmError> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let errno = *RESULT.get_or_init(|| {
        register_signal_handler(kick_signal(), on_kick)
            .err()
            .map_or(0, |e| e.errno())
    });
    if errno != 0 {
        return Err(KvmError::KickHandler(std::io::Error::from_raw_os_error(
            errno,
        )));
    }
    Ok(())
}

pub(super) trait AsPthread {
    fn as_pthread(&self) -> libc::pthread_t;
}

impl AsPthread for JoinHandle<()> {
    fn as_pthread(&self) -> libc::pthread_t {
        std::os::unix::thread::JoinHandleExt::as_pthread_t(self)
    }
}

/// Sets `immediate_exit` and signals the thread so that `KVM_RUN` returns
/// `EINTR` whether the thread is inside it or about to enter it.
pub(super) fn kick(s: &Shared, thread: libc::pthread_t) {
    let ptr = s.immediate_exit.load(Ordering::SeqCst);
    // SAFETY: `ptr` points at the `immediate_exit` byte of the vCPU's
    // mmap'ed `kvm_run`, alive as long as the VcpuFd in `s.fd`, which `s`
    // owns; the byte is only accessed atomically by us (and read by KVM).
    unsafe { AtomicU8::from_ptr(ptr) }.store(1, Ordering::SeqCst);
    // SAFETY: `thread` is a live thread of this process: its JoinHandle is
    // joined only after the last kick (the ticker is joined first in Drop).
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

pub(super) fn clear_immediate_exit(s: &Shared) {
    let ptr = s.immediate_exit.load(Ordering::SeqCst);
    // SAFETY: as in `kick`.
    unsafe { AtomicU8::from_ptr(ptr) }.store(0, Ordering::SeqCst);
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps up to `d`, waking early when the vCPU is asked to stop or quit.
pub(super) fn interruptible_sleep(s: &Shared, d: Duration) {
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

pub(super) fn park(s: &Shared) {
    let mut g = lock(&s.park);
    g.parked = true;
    g.parks += 1;
    s.cond.notify_all();
    while s.stop.load(Ordering::SeqCst) && !s.quit.load(Ordering::SeqCst) {
        g = s.cond.wait(g).unwrap_or_else(|p| p.into_inner());
    }
    g.parked = false;
}

pub(super) fn fail(s: &Shared, error: VcpuError) {
    let mut g = lock(&s.park);
    if g.error.is_none() {
        g.error = Some(error);
    }
    g.parked = true;
    s.cond.notify_all();
}

pub(super) fn vcpu_thread(s: &Shared, knobs: &Knobs) {
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
                let exit = format!("{other:?}");
                drop(fd);
                fail(s, VcpuError::UnexpectedExit { exit });
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => {
                drop(fd);
                fail(s, VcpuError::Run(e));
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
pub(super) fn throttle_ticker(knobs: &Knobs, vcpus: &[(Arc<Shared>, libc::pthread_t)]) {
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
