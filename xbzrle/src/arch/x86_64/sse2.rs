//! SSE2 kernels: four 16-byte compares per 64-byte block.
//!
//! SSE2 is part of the x86_64 baseline; the entry points still carry
//! `#[target_feature]` (Rust asks callers for `unsafe` either way).

use core::arch::x86_64::{
    __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
};

use crate::encode::{Block, ReadOnly, Update, encode_with};
use crate::zero::is_zero_with;
use crate::{EncodeError, Page};

#[inline]
#[target_feature(enable = "sse2")]
fn load(v: &[u8; 16]) -> __m128i {
    // SAFETY: `v` is 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(v.as_ptr().cast()) }
}

/// Bit `i` set iff `a[i] == b[i]`.
#[inline]
#[target_feature(enable = "sse2")]
fn eq_mask(a: &Block, b: &Block) -> u64 {
    let (a, _) = a.as_chunks::<16>();
    let (b, _) = b.as_chunks::<16>();
    let mut m = 0u64;
    for k in 0..4 {
        let e = _mm_cmpeq_epi8(load(&a[k]), load(&b[k]));
        m |= u64::from(_mm_movemask_epi8(e) as u16) << (16 * k);
    }
    m
}

/// True when all the blocks are zero; exits at the first non-zero block.
#[inline]
#[target_feature(enable = "sse2")]
fn all_zero(blocks: &[Block]) -> bool {
    let zero = _mm_setzero_si128();
    for b in blocks {
        let (v, _) = b.as_chunks::<16>();
        let acc = _mm_or_si128(
            _mm_or_si128(load(&v[0]), load(&v[1])),
            _mm_or_si128(load(&v[2]), load(&v[3])),
        );
        if _mm_movemask_epi8(_mm_cmpeq_epi8(acc, zero)) != 0xffff {
            return false;
        }
    }
    true
}

/// [`crate::encode`] on SSE2.
#[target_feature(enable = "sse2")]
pub(crate) fn encode(old: &Page, new: &Page, out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_with(
        &mut ReadOnly::new(old, new),
        out,
        |a, b| eq_mask(a, b),
        false,
    )
}

/// [`crate::encode_and_update`] on SSE2.
#[target_feature(enable = "sse2")]
pub(crate) fn encode_and_update(
    cached: &mut Page,
    new: &Page,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    encode_with(
        &mut Update::new(cached, new),
        out,
        |a, b| eq_mask(a, b),
        false,
    )
}

/// [`crate::is_zero`] on SSE2.
#[target_feature(enable = "sse2")]
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    is_zero_with(buf, |b| all_zero(b))
}
