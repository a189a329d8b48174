//! Backend selection: the only file that asks the CPU what it can do.
//!
//! Detection runs once per process and is cached in an [`AtomicU8`]. With the
//! `std` feature it uses run-time detection (`is_x86_feature_detected!`);
//! without it, the backends enabled at compile time (`-C target-feature`).
//! NEON is baseline on aarch64 and chosen at compile time.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::{EncodeError, Page, scalar};

/// Miri cannot execute SIMD intrinsics, so under `cfg(miri)` only
/// [`Backend::Scalar`] is available. This constant is the one place that
/// says so.
const SIMD_ALLOWED: bool = !cfg!(miri);

/// One implementation of the codec's inner loops.
///
/// Every backend produces exactly the same bytes and the same overflow
/// decisions; they differ only in speed. A backend exists on every target as
/// a value, but [`Backend::is_available`] is true only where the CPU runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// Portable code on 64-bit words (SWAR); available everywhere.
    Scalar,
    /// x86_64 SSE2 (16-byte vectors); baseline on x86_64.
    Sse2,
    /// x86_64 AVX2 (32-byte vectors), with BMI1, BMI2 and POPCNT (which
    /// every AVX2 CPU has; a CPU reporting AVX2 without them gets
    /// [`Backend::Sse2`]).
    Avx2,
    /// x86_64 AVX-512 with the BW extension (64-byte vectors, mask registers).
    Avx512Bw,
    /// aarch64 Advanced SIMD (NEON); baseline on aarch64.
    Neon,
}

/// All backends, in declaration order.
const ALL: [Backend; 5] = [
    Backend::Scalar,
    Backend::Sse2,
    Backend::Avx2,
    Backend::Avx512Bw,
    Backend::Neon,
];

/// Preference order for [`Backend::best`], fastest first, as measured with
/// `cargo run --release -p precopy-benches --bin limits` on a Sapphire Rapids
/// host: AVX-512BW beat AVX2 on every encode workload (e.g. `words25` hot
/// about 730 vs 785 ns per page, `unchanged` hot 1.11x vs 1.24x the read
/// limit), with no frequency penalty visible at page granularity.
const PREFERENCE: [Backend; 5] = [
    Backend::Avx512Bw,
    Backend::Avx2,
    Backend::Neon,
    Backend::Sse2,
    Backend::Scalar,
];

/// Cached detection result: bit `1 << backend as u8` per available backend,
/// plus [`DETECTED`] once detection ran (so 0 means "not yet").
static AVAILABLE: AtomicU8 = AtomicU8::new(0);
const DETECTED: u8 = 0x80;

/// `true` when the CPU has all the named x86 features: at run time with
/// `std`, from the compile-time target features without.
#[cfg(all(target_arch = "x86_64", feature = "std"))]
macro_rules! x86_has {
    ($($f:tt),+) => {
        $(std::is_x86_feature_detected!($f))&&+
    };
}
#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
macro_rules! x86_has {
    ($($f:tt),+) => {
        cfg!(all($(target_feature = $f),+))
    };
}

fn bit(b: Backend) -> u8 {
    1 << (b as u8)
}

/// Asks the CPU (uncached).
fn detect() -> u8 {
    #[allow(unused_mut)]
    let mut set = bit(Backend::Scalar);
    if !SIMD_ALLOWED {
        return set;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if x86_has!("sse2") {
            set |= bit(Backend::Sse2);
        }
        if x86_has!("avx2", "bmi1", "bmi2", "popcnt") {
            set |= bit(Backend::Avx2);
        }
        if x86_has!("avx512f", "avx512bw") {
            set |= bit(Backend::Avx512Bw);
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        set |= bit(Backend::Neon);
    }
    set
}

/// The available set, detecting on first use.
#[inline]
fn available_set() -> u8 {
    let v = AVAILABLE.load(Ordering::Relaxed);
    if v != 0 {
        return v;
    }
    let v = detect() | DETECTED;
    AVAILABLE.store(v, Ordering::Relaxed);
    v
}

impl Backend {
    /// True when this CPU (and this build) can run the backend.
    pub fn is_available(self) -> bool {
        available_set() & bit(self) != 0
    }

    /// The backends this CPU can run, in declaration order (scalar first).
    /// Tests and benches iterate over this.
    pub fn available() -> impl Iterator<Item = Backend> + Clone {
        ALL.into_iter().filter(|b| b.is_available())
    }

    /// The fastest available backend on this machine (what [`Codec::new`]
    /// and the free functions use).
    pub fn best() -> Backend {
        let set = available_set();
        PREFERENCE
            .into_iter()
            .find(|b| set & bit(*b) != 0)
            .unwrap_or(Backend::Scalar)
    }

    /// Short lowercase name for logs and bench ids: `scalar`, `sse2`,
    /// `avx2`, `avx512bw`, `neon`.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Sse2 => "sse2",
            Backend::Avx2 => "avx2",
            Backend::Avx512Bw => "avx512bw",
            Backend::Neon => "neon",
        }
    }
}

impl core::fmt::Display for Backend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A resolved backend: cheap to copy; use it to pin, log or force one.
///
/// A `Codec` only ever holds an available backend, which is what makes its
/// calls into `#[target_feature]` kernels sound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Codec {
    backend: Backend,
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new()
    }
}

/// Calls `$f` from the module of the codec's backend with `$args`.
macro_rules! dispatch {
    ($self:ident, $f:ident ( $($arg:expr),* )) => {
        match $self.backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: SSE2 is part of the x86_64 baseline, and a Codec holding
            // Sse2 is only built after `is_available()` confirmed it.
            Backend::Sse2 => unsafe { crate::arch::x86_64::sse2::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a Codec holding Avx2 is only built by `with_backend`
            // or `new` after `is_available()` saw the CPU report AVX2, BMI1,
            // BMI2 and POPCNT.
            Backend::Avx2 => unsafe { crate::arch::x86_64::avx2::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a Codec holding Avx512Bw is only built after
            // `is_available()` saw the CPU report AVX-512F and AVX-512BW.
            Backend::Avx512Bw => unsafe { crate::arch::x86_64::avx512::$f($($arg),*) },
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            // SAFETY: this arm is compiled only when the target enables NEON.
            Backend::Neon => unsafe { crate::arch::aarch64::neon::$f($($arg),*) },
            // Scalar, and backends this target lacks (never held by a
            // Codec: `with_backend` refuses them).
            _ => scalar::$f($($arg),*),
        }
    };
}

impl Codec {
    /// The fastest available backend ([`Backend::best`]).
    pub fn new() -> Codec {
        Codec {
            backend: Backend::best(),
        }
    }

    /// A codec pinned to `backend`, or `None` when this CPU lacks it.
    pub fn with_backend(backend: Backend) -> Option<Codec> {
        backend.is_available().then_some(Codec { backend })
    }

    /// The backend this codec runs.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// [`crate::encode`] on this codec's backend.
    ///
    /// # Errors
    /// [`EncodeError::Overflow`] if and only if the canonical delta is longer
    /// than `out.len()`.
    #[inline]
    pub fn encode(&self, old: &Page, new: &Page, out: &mut [u8]) -> Result<usize, EncodeError> {
        dispatch!(self, encode(old, new, out))
    }

    /// [`crate::encode_and_update`] on this codec's backend.
    ///
    /// # Errors
    /// [`EncodeError::Overflow`] exactly as [`Codec::encode`]; `*cached`
    /// holds `new` in every case.
    #[inline]
    pub fn encode_and_update(
        &self,
        cached: &mut Page,
        new: &Page,
        out: &mut [u8],
    ) -> Result<usize, EncodeError> {
        dispatch!(self, encode_and_update(cached, new, out))
    }

    /// [`crate::is_zero`] on this codec's backend.
    #[inline]
    pub fn is_zero(&self, buf: &[u8]) -> bool {
        dispatch!(self, is_zero(buf))
    }
}
