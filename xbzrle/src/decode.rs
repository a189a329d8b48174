//! The production decoder: validate the whole delta, then apply it.
//!
//! Safe code only; a total function over arbitrary bytes. Rules in
//! [`crate::format`].
//!
//! Deltas of dirtied pages are mostly short pairs (one-byte lengths, a few
//! words of literal), so the cost is per pair. The validating pass takes a
//! pair with one-byte lengths in one step: both lengths from the two bytes
//! at `i`, all of QEMU's conditions folded into one test that is true only
//! when the exact rules accept the pair; anything else (two-byte lengths, a
//! first zero run of 0, any refusal, the last bytes of the delta) goes
//! through the exact rules one length at a time, which give the refusal
//! and its offset. The applying pass reads the pairs back from a small
//! table, so it does no parsing, and copies short literals with fixed-size
//! overlapping moves.
#![forbid(unsafe_code)]

use crate::format::uleb128_decode_small;
use crate::{DecodeError, DecodeErrorKind, PAGE_SIZE, Page};

/// One pair accepted by the walk: the literal goes to
/// `page[page_offset..][..len]`, it sits in the delta after `header` bytes
/// of lengths (2 to 4) that follow the previous literal.
#[derive(Clone, Copy)]
struct Run {
    page_offset: usize,
    header: usize,
    len: usize,
}

/// Where a walk stands: at delta offset `i`, page offset `d`.
#[derive(Clone, Copy)]
struct At {
    i: usize,
    d: usize,
}

/// One pair at `at` under QEMU's exact rules (the reference decoder's
/// order of checks). Returns the run and the position after its literal.
#[inline(always)]
fn pair_exact(delta: &[u8], at: At) -> Result<(Run, At), DecodeError> {
    let slen = delta.len();
    let (start, mut i, mut d) = (at.i, at.i, at.d);
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
    let run = Run {
        page_offset: d,
        header: lit_start - start,
        len: count,
    };
    Ok((
        run,
        At {
            i: lit_start + count,
            d: d + count,
        },
    ))
}

/// One pair at `at` with one-byte lengths that QEMU's rules accept, or
/// `None` (then [`pair_exact`] decides). When this returns a pair,
/// [`pair_exact`] returns the same one: a zero run of 1..=127 is neither
/// empty nor too long, a literal of 1..=127 neither; `d + z + n` within
/// the page covers both page checks; `i + 2 + n` within the delta covers
/// both "2 bytes left" checks (n ≥ 1) and the literal's end.
#[inline(always)]
fn pair_short(delta: &[u8], at: At) -> Option<(Run, At)> {
    let [zb, nb, ..] = *delta.get(at.i..)? else {
        return None;
    };
    let (z, n) = (usize::from(zb), usize::from(nb));
    // `&` rather than `&&`: one branch for the whole test.
    let ok = ((zb | nb) & 0x80 == 0)
        & (z != 0)
        & (n != 0)
        & (at.d + z + n <= PAGE_SIZE)
        & (at.i + 2 + n <= delta.len());
    ok.then_some((
        Run {
            page_offset: at.d + z,
            header: 2,
            len: n,
        },
        At {
            i: at.i + 2 + n,
            d: at.d + z + n,
        },
    ))
}

/// Walks `delta` from `at`, calling `run(r, literal_offset)` for each pair
/// once its bounds are known good (the literal is
/// `delta[literal_offset..][..r.len]`), until `run` returns `false` (then
/// returns `Ok(Some(position of the next pair))`) or the delta ends
/// (`Ok(None)`). Returns the first refusal.
#[inline(always)]
fn walk(
    delta: &[u8],
    mut at: At,
    mut run: impl FnMut(Run, usize) -> bool,
) -> Result<Option<At>, DecodeError> {
    while at.i < delta.len() {
        let (r, next) = match pair_short(delta, at) {
            Some(p) => p,
            None => pair_exact(delta, at)?,
        };
        let lit = at.i + r.header;
        at = next;
        if !run(r, lit) && at.i < delta.len() {
            return Ok(Some(at));
        }
    }
    Ok(None)
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

/// Pairs remembered by the validating pass, so that the applying pass needs
/// no parsing (a dirtied page has about a hundred; the pairs past the
/// table are parsed again).
const TABLE: usize = 256;

/// A [`Run`] packed in a `u32`: page offset (12 bits, < `PAGE_SIZE`),
/// header bytes (3 bits, 2..=4), literal length (13 bits, 1..=`PAGE_SIZE`).
#[inline(always)]
fn pack(r: Run) -> u32 {
    (r.page_offset | r.header << 12 | r.len << 15) as u32
}

#[inline(always)]
fn unpack(e: u32) -> Run {
    let e = e as usize;
    Run {
        page_offset: e & 0xfff,
        header: (e >> 12) & 7,
        len: e >> 15,
    }
}

/// Copies the literal `delta[at..at + len]` to `page[d..d + len]` (bounds
/// already validated; out-of-range arguments copy nothing).
#[inline(always)]
fn apply(page: &mut Page, delta: &[u8], d: usize, at: usize, len: usize) {
    if let (Some(dst), Some(src)) = (page.get_mut(d..d + len), delta.get(at..at + len)) {
        copy_literal(dst, src);
    }
}

/// See [`crate::decode`]. Validates the whole delta first, recording the
/// pairs; then applies them. On `Err` nothing was written.
pub(crate) fn decode(delta: &[u8], page: &mut Page) -> Result<(), DecodeError> {
    if delta.is_empty() {
        return Ok(()); // unchanged page
    }
    let mut table = [0u32; TABLE];
    let mut runs = 0usize;
    // Validate: the first TABLE pairs are recorded, the rest only checked.
    let rest = walk(delta, At { i: 0, d: 0 }, |r, _| {
        if let Some(slot) = table.get_mut(runs) {
            *slot = pack(r);
            runs += 1;
        }
        runs < TABLE
    })?;
    if let Some(rest) = rest {
        walk(delta, rest, |_, _| true)?;
    }
    // Apply: the recorded pairs, then (rarely) the rest parsed again.
    let mut at = 0;
    for &e in table.get(..runs).unwrap_or_default() {
        let r = unpack(e);
        at += r.header;
        apply(page, delta, r.page_offset, at, r.len);
        at += r.len;
    }
    if let Some(rest) = rest {
        walk(delta, rest, |r, lit| {
            apply(page, delta, r.page_offset, lit, r.len);
            true
        })?;
    }
    Ok(())
}
