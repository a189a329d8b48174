//! The plain byte-at-a-time encoder and decoder: the executable
//! specification and the oracle every backend is tested against.
//!
//! Slow on purpose and obviously correct. Same signatures and results as
//! [`crate::encode`] and [`crate::decode`]; format as in [`crate::format`].

use crate::format::{uleb128_decode_small, uleb128_encode_small};
use crate::{DecodeError, DecodeErrorKind, EncodeError, PAGE_SIZE, Page};

/// Canonical delta from `old` to `new` into `out`, one byte at a time.
///
/// `old`, `new`: one page each. Returns `Ok(0)` for an unchanged page,
/// `Ok(n)` with the delta in `out[..n]`, `Err(Overflow)` if and only if the
/// canonical delta is longer than `out.len()`; never writes past `out.len()`
/// (bytes of `out` before that may be overwritten on overflow).
pub fn encode(old: &Page, new: &Page, out: &mut [u8]) -> Result<usize, EncodeError> {
    let mut i = 0;
    let mut d = 0;
    while i < PAGE_SIZE {
        let mut zrun = 0;
        while i < PAGE_SIZE && old[i] == new[i] {
            zrun += 1;
            i += 1;
        }
        if i == PAGE_SIZE {
            break;
        }
        let mut nzrun = 0;
        while i + nzrun < PAGE_SIZE && old[i + nzrun] != new[i + nzrun] {
            nzrun += 1;
        }
        d += uleb128_encode_small(zrun, out.get_mut(d..).unwrap_or(&mut []))
            .ok_or(EncodeError::Overflow)?;
        d += uleb128_encode_small(nzrun, out.get_mut(d..).unwrap_or(&mut []))
            .ok_or(EncodeError::Overflow)?;
        let lit = out.get_mut(d..d + nzrun).ok_or(EncodeError::Overflow)?;
        lit.copy_from_slice(&new[i..i + nzrun]);
        d += nzrun;
        i += nzrun;
    }
    Ok(d)
}

/// Applies `delta` onto `page` with QEMU's acceptance rules, all-or-nothing.
///
/// Works on a copy of the page and writes it back only on success, so on
/// `Err` the page is untouched. The error gives the kind and the byte offset
/// in `delta` of the length or literal that was refused.
pub fn decode(delta: &[u8], page: &mut Page) -> Result<(), DecodeError> {
    let mut work = *page;
    let slen = delta.len();
    let mut i = 0;
    let mut d = 0;
    while i < slen {
        // zero run
        if slen - i < 2 {
            return Err(DecodeError::new(DecodeErrorKind::Truncated, i));
        }
        let (count, used) = uleb128_decode_small(&delta[i..])
            .ok_or(DecodeError::new(DecodeErrorKind::LengthTooLong, i))?;
        if i != 0 && count == 0 {
            return Err(DecodeError::new(DecodeErrorKind::EmptyZeroRun, i));
        }
        if d + count > PAGE_SIZE {
            return Err(DecodeError::new(DecodeErrorKind::PastEndOfPage, i));
        }
        i += used;
        d += count;
        // literal run
        if slen - i < 2 {
            return Err(DecodeError::new(DecodeErrorKind::Truncated, i));
        }
        let (count, used) = uleb128_decode_small(&delta[i..])
            .ok_or(DecodeError::new(DecodeErrorKind::LengthTooLong, i))?;
        if count == 0 {
            return Err(DecodeError::new(DecodeErrorKind::EmptyLiteralRun, i));
        }
        if d + count > PAGE_SIZE {
            return Err(DecodeError::new(DecodeErrorKind::PastEndOfPage, i));
        }
        if i + used + count > slen {
            return Err(DecodeError::new(DecodeErrorKind::LiteralPastEndOfInput, i));
        }
        i += used;
        work[d..d + count].copy_from_slice(&delta[i..i + count]);
        d += count;
        i += count;
    }
    *page = work;
    Ok(())
}
