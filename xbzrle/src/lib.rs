//! QEMU-compatible XBZRLE page delta codec and zero-page detector.
//!
//! XBZRLE ("Xor Based Zero Run Length Encoding") is the delta format QEMU's
//! live migration sends for a page whose previous version the destination
//! already holds. This crate encodes byte-identically to QEMU
//! (`migration/xbzrle.c`), decodes exactly what QEMU accepts, all-or-nothing,
//! and detects zero pages.
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
//! ```
#![no_std]
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "std")]
extern crate std;

mod decode;
mod error;
pub mod format;
pub mod reference;

pub use error::{DecodeError, DecodeErrorKind, EncodeError};

/// Size in bytes of one guest page: QEMU's target page size on x86 and arm.
pub const PAGE_SIZE: usize = 4096;

/// One guest page.
pub type Page = [u8; PAGE_SIZE];

/// Encodes the change from `old` to `new` into `out` (best backend).
///
/// `old`, `new`: one page each. Returns `Ok(0)` for an unchanged page and
/// `Ok(n)` with the canonical delta in `out[..n]`.
///
/// # Errors
/// `Err(EncodeError::Overflow)` if and only if the canonical delta is longer
/// than `out.len()`; nothing past `out.len()` is written. Pass a
/// `PAGE_SIZE` buffer for QEMU's policy (send the page whole on overflow).
///
/// Format: QEMU `migration/xbzrle.c`, see [`format`].
pub fn encode(old: &Page, new: &Page, out: &mut [u8]) -> Result<usize, EncodeError> {
    reference::encode(old, new, out)
}

/// Applies `delta` onto `page`, the destination's current copy of the page.
///
/// Bytes in zero runs keep their value. All-or-nothing: on `Err` the page is
/// untouched. Never panics, never reads or writes out of bounds.
///
/// # Errors
/// A [`DecodeError`] with the kind and the byte offset in `delta`, for every
/// delta QEMU's decoder refuses (see [`format`]).
pub fn decode(delta: &[u8], page: &mut Page) -> Result<(), DecodeError> {
    decode::decode(delta, page)
}

/// True when every byte of `buf` is 0. Any length and alignment.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}
