//! The production decoder: validate the whole delta, then apply it.
//!
//! Safe code only; a total function over arbitrary bytes. Rules in
//! [`crate::format`].
#![forbid(unsafe_code)]

use crate::format::uleb128_decode_small;
use crate::{DecodeError, DecodeErrorKind, PAGE_SIZE, Page};

/// Walks `delta`, calling `run(page_offset, literal_offset, length)` for
/// each literal run once its bounds are known good (the literal is
/// `delta[literal_offset..][..length]`, it goes to `page[page_offset..]`).
/// Returns the first refusal.
#[inline(always)]
fn walk(delta: &[u8], mut run: impl FnMut(usize, usize, usize)) -> Result<(), DecodeError> {
    let slen = delta.len();
    let mut i = 0;
    let mut d = 0;
    while i < slen {
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
        let lit_start = i + used;
        if slen - lit_start < count {
            return Err(DecodeError::new(DecodeErrorKind::LiteralPastEndOfInput, i));
        }
        run(d, lit_start, count);
        d += count;
        i = lit_start + count;
    }
    Ok(())
}

/// Copies `src` into `dst` (same length). Literals are mostly short, where a
/// `memcpy` call costs more than the copy: 8 to 32 bytes take four
/// overlapping 8-byte moves at offsets `min(8k, n - 8)` (no branch on the
/// exact length), shorter ones two overlapping 4-byte moves or bytes.
#[inline(always)]
fn copy_literal(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    if n != dst.len() {
        return;
    }
    if (8..=32).contains(&n) {
        for k in 0..4 {
            let o = (8 * k).min(n - 8);
            if let (Some(d), Some(s)) = (
                dst.get_mut(o..).and_then(|d| d.first_chunk_mut::<8>()),
                src.get(o..).and_then(|s| s.first_chunk::<8>()),
            ) {
                *d = *s;
            }
        }
    } else if (4..8).contains(&n) {
        dst[..4].copy_from_slice(&src[..4]);
        dst[n - 4..].copy_from_slice(&src[n - 4..]);
    } else if n < 4 {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
    } else {
        dst.copy_from_slice(src);
    }
}

/// Runs remembered by the validating pass, so that the applying pass needs
/// no parsing (typical deltas have far fewer; longer ones are parsed again).
const TABLE: usize = 256;

/// Copies the literal `delta[at..at + len]` to `page[d..d + len]` (bounds
/// already validated; out-of-range arguments copy nothing).
#[inline(always)]
fn apply(page: &mut Page, delta: &[u8], d: usize, at: usize, len: usize) {
    if let (Some(dst), Some(src)) = (page.get_mut(d..d + len), delta.get(at..at + len)) {
        copy_literal(dst, src);
    }
}

/// See [`crate::decode`]. Validates the whole delta first, recording the
/// runs; then applies them. On `Err` nothing was written.
pub(crate) fn decode(delta: &[u8], page: &mut Page) -> Result<(), DecodeError> {
    if delta.is_empty() {
        return Ok(()); // unchanged page
    }
    // (page offset | length << 16, literal offset in the delta)
    let mut table = [(0u32, 0u32); TABLE];
    let mut runs = 0usize;
    walk(delta, |d, at, len| {
        if let Some(slot) = table.get_mut(runs) {
            *slot = ((d | (len << 16)) as u32, at as u32);
        }
        runs += 1;
    })?;
    if let Some(recorded) = table.get(..runs) {
        for &(dl, at) in recorded {
            let (d, len) = ((dl & 0xffff) as usize, (dl >> 16) as usize);
            apply(page, delta, d, at as usize, len);
        }
        Ok(())
    } else {
        walk(delta, |d, at, len| apply(page, delta, d, at, len))
    }
}
