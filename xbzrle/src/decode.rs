//! The production decoder: validate the whole delta, then apply it.
//!
//! Safe code only; a total function over arbitrary bytes. Rules in
//! [`crate::format`].
#![forbid(unsafe_code)]

use crate::format::uleb128_decode_small;
use crate::{DecodeError, DecodeErrorKind, PAGE_SIZE, Page};

/// Walks `delta`, calling `apply(page_offset, literal)` for each literal
/// run once the run's bounds are known good. Returns the first refusal.
#[inline(always)]
fn walk(delta: &[u8], mut apply: impl FnMut(usize, &[u8])) -> Result<(), DecodeError> {
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
        let Some(lit) = delta.get(lit_start..lit_start + count) else {
            return Err(DecodeError::new(DecodeErrorKind::LiteralPastEndOfInput, i));
        };
        apply(d, lit);
        d += count;
        i = lit_start + count;
    }
    Ok(())
}

/// See [`crate::decode`].
pub(crate) fn decode(delta: &[u8], page: &mut Page) -> Result<(), DecodeError> {
    walk(delta, |_, _| {})?;
    walk(delta, |d, lit| page[d..d + lit.len()].copy_from_slice(lit))
}
