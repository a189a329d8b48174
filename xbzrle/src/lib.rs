//! QEMU-compatible XBZRLE page delta codec and zero-page detector.
//!
//! XBZRLE ("Xor Based Zero Run Length Encoding") is the delta format QEMU's
//! live migration sends for a page whose previous version the destination
//! already holds (its XBZRLE cache). This crate encodes byte-identically to
//! QEMU (`migration/xbzrle.c`), decodes exactly what QEMU accepts,
//! all-or-nothing, and detects zero pages; the inner loops run on SIMD
//! (AVX-512BW, AVX2, SSE2, NEON) or portable 64-bit word code.
//!
//! ```
//! use xbzrle::{PAGE_SIZE, Page};
//! let old: Page = [0; PAGE_SIZE];
//! let mut new = old;
//! new[4095] = 0x5a;
//! let mut out = [0u8; PAGE_SIZE];
//! let n = xbzrle::encode(&old, &new, &mut out).unwrap();
//! assert_eq!(&out[..n], &[0xff, 0x1f, 0x01, 0x5a]);
//! let mut page = old;
//! xbzrle::decode(&out[..n], &mut page).unwrap();
//! assert_eq!(page, new);
//! assert!(!xbzrle::is_zero(&page));
//! ```
//!
//! # Choosing a backend
//!
//! The free functions ([`encode`], [`encode_and_update`], [`is_zero`]) use
//! the fastest backend this CPU runs, detected once per process. A [`Codec`]
//! pins one: [`Codec::new`] (the best), or [`Codec::with_backend`] to force
//! one, for example [`Backend::Scalar`] when debugging. All backends produce
//! the same bytes and the same overflow decisions; [`Backend::available`]
//! lists what this CPU can run and [`Backend::name`] names it for a log line.
//!
//! # Crate features
//!
//! * `std` (default): run-time CPU feature detection. Without it the crate is
//!   `no_std` and picks backends from compile-time target features
//!   (`-C target-feature=+avx2,+bmi1,+bmi2,+popcnt` for the AVX2 backend, or
//!   NEON on aarch64).
//!
//! # Hardening and compatibility
//!
//! * Output is canonical ([`format`]): whenever QEMU produces a delta, this
//!   crate produces the same bytes. Overflow is exact: `Err` if and only if
//!   the canonical delta is longer than the output buffer, never a write at
//!   or past its end.
//! * [`decode`] accepts exactly the deltas QEMU's decoder accepts, refuses the
//!   rest with the reason and byte offset, and is all-or-nothing: a refused
//!   delta leaves the page untouched. It is safe code (`forbid(unsafe_code)`)
//!   and never panics.
//! * [`reference`](mod@reference) is the byte-at-a-time specification every backend is
//!   tested against.
//!
//! # Guest memory
//!
//! The functions take ordinary references. Do not hand them a slice over
//! guest RAM that vCPUs may still be writing (a data race): copy the dirty
//! page out first, as QEMU does (`XBZRLE.current_buf` in `migration/ram.c`),
//! then run [`is_zero`] and [`encode_and_update`] on the copy.
#![no_std]
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "std")]
extern crate std;

mod arch;
mod decode;
mod dispatch;
mod encode;
mod error;
pub mod format;
pub mod reference;
mod scalar;
mod zero;

pub use dispatch::{Backend, Codec};
pub use error::{DecodeError, DecodeErrorKind, EncodeError};

/// Size in bytes of one guest page: QEMU's target page size on x86 and arm.
pub const PAGE_SIZE: usize = 4096;

/// One guest page.
pub type Page = [u8; PAGE_SIZE];

/// Encodes the change from `old` to `new` into `out` (best backend).
///
/// `old`, `new`: one page each. Returns `Ok(0)` for an unchanged page and
/// `Ok(n)` with the canonical delta in `out[..n]`. Bytes of `out` after the
/// delta (`out[n..]`) may be overwritten with scratch.
///
/// # Errors
/// `Err(EncodeError::Overflow)` if and only if the canonical delta is longer
/// than `out.len()`; nothing at or past `out.len()` is written. Pass a
/// `PAGE_SIZE` buffer for QEMU's policy (send the page whole on overflow).
///
/// Format: QEMU `migration/xbzrle.c`, see [`format`].
#[inline]
pub fn encode(old: &Page, new: &Page, out: &mut [u8]) -> Result<usize, EncodeError> {
    Codec::new().encode(old, new, out)
}

/// Encodes like [`encode`]`(cached, new, out)` and, in the same pass, makes
/// the XBZRLE cache copy hold the new content (`*cached == *new` afterwards).
///
/// Each page is read once: unchanged 64-byte blocks are not rewritten.
/// The cache holds `new` **in every case, including on `Err`**: on overflow
/// the caller sends the page whole (a PAGE record), so the cache must hold
/// exactly the bytes sent, as QEMU's `save_xbzrle_page` does.
///
/// # Errors
/// `Err(EncodeError::Overflow)` exactly as [`encode`].
#[inline]
pub fn encode_and_update(
    cached: &mut Page,
    new: &Page,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    Codec::new().encode_and_update(cached, new, out)
}

/// Applies `delta` onto `page`, the destination's current copy of the page.
///
/// Bytes in zero runs keep their value. All-or-nothing: on `Err` the page is
/// untouched. Never panics, never reads or writes out of bounds.
///
/// # Errors
/// A [`DecodeError`] with the kind and the byte offset in `delta`, for every
/// delta QEMU's decoder refuses (see [`format`]).
#[inline]
pub fn decode(delta: &[u8], page: &mut Page) -> Result<(), DecodeError> {
    decode::decode(delta, page)
}

/// True when every byte of `buf` is 0 (a zero page is sent as a ZERO record).
///
/// Any length and alignment; the empty slice is zero. Tests the first,
/// middle and last byte first (as QEMU's `buffer_is_zero`), so a typical
/// non-zero page is refused after one or two cache lines, then OR-reduces
/// 64-byte blocks on the best backend.
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    Codec::new().is_zero(buf)
}
