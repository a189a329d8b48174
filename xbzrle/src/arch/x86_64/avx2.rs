//! AVX2 kernels: two 32-byte compares per 64-byte block. The encoders also
//! enable BMI1, BMI2 and POPCNT (part of [`Backend::Avx2`](crate::Backend::Avx2)'s
//! detection): the run walker counts transitions with `popcnt` and clears
//! them with `blsr`.

use core::arch::x86_64::{
    __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8, _mm256_or_si256,
    _mm256_testz_si256,
};

use crate::encode::{Block, ReadOnly, Update, encode_with};
use crate::zero::is_zero_with;
use crate::{EncodeError, Page};

#[inline]
#[target_feature(enable = "avx2")]
fn load(v: &[u8; 32]) -> __m256i {
    // SAFETY: `v` is 32 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
}

/// Bit `i` set iff `a[i] == b[i]`.
#[inline]
#[target_feature(enable = "avx2")]
fn eq_mask(a: &Block, b: &Block) -> u64 {
    let (a, _) = a.as_chunks::<32>();
    let (b, _) = b.as_chunks::<32>();
    let lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(load(&a[0]), load(&b[0]))) as u32;
    let hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(load(&a[1]), load(&b[1]))) as u32;
    u64::from(lo) | (u64::from(hi) << 32)
}

/// OR of one block's two halves.
#[inline]
#[target_feature(enable = "avx2")]
fn or_block(b: &Block) -> __m256i {
    let (v, _) = b.as_chunks::<32>();
    _mm256_or_si256(load(&v[0]), load(&v[1]))
}

/// True when all the blocks are zero; exits at the first non-zero group of
/// four blocks (256 bytes).
#[inline]
#[target_feature(enable = "avx2")]
fn all_zero(blocks: &[Block]) -> bool {
    let (groups, rest) = blocks.as_chunks::<4>();
    for g in groups {
        let acc = _mm256_or_si256(
            _mm256_or_si256(or_block(&g[0]), or_block(&g[1])),
            _mm256_or_si256(or_block(&g[2]), or_block(&g[3])),
        );
        if _mm256_testz_si256(acc, acc) == 0 {
            return false;
        }
    }
    rest.iter().all(|b| {
        let acc = or_block(b);
        _mm256_testz_si256(acc, acc) != 0
    })
}

/// [`crate::encode`] on AVX2.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
pub(crate) fn encode(old: &Page, new: &Page, out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_with(
        &mut ReadOnly::new(old, new),
        out,
        |a, b| eq_mask(a, b),
        true,
    )
}

/// [`crate::encode_and_update`] on AVX2.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
pub(crate) fn encode_and_update(
    cached: &mut Page,
    new: &Page,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    encode_with(
        &mut Update::new(cached, new),
        out,
        |a, b| eq_mask(a, b),
        true,
    )
}

/// [`crate::is_zero`] on AVX2.
#[target_feature(enable = "avx2")]
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    is_zero_with(buf, |b| all_zero(b))
}
