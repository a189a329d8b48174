//! AVX-512BW kernels: one 64-byte compare into a mask register per block.

use core::arch::x86_64::{
    __m512i, _mm512_cmpeq_epi8_mask, _mm512_loadu_si512, _mm512_or_si512, _mm512_test_epi64_mask,
};

use crate::encode::{Block, ReadOnly, Update, encode_with};
use crate::zero::is_zero_with;
use crate::{EncodeError, Page};

#[inline]
#[target_feature(enable = "avx512f")]
fn load(v: &Block) -> __m512i {
    // SAFETY: `v` is 64 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
}

/// Bit `i` set iff `a[i] == b[i]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn eq_mask(a: &Block, b: &Block) -> u64 {
    _mm512_cmpeq_epi8_mask(load(a), load(b))
}

/// True when all the blocks are zero; exits at the first non-zero group of
/// four blocks (256 bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn all_zero(blocks: &[Block]) -> bool {
    let (groups, rest) = blocks.as_chunks::<4>();
    for g in groups {
        let acc = _mm512_or_si512(
            _mm512_or_si512(load(&g[0]), load(&g[1])),
            _mm512_or_si512(load(&g[2]), load(&g[3])),
        );
        if _mm512_test_epi64_mask(acc, acc) != 0 {
            return false;
        }
    }
    rest.iter().all(|b| {
        let v = load(b);
        _mm512_test_epi64_mask(v, v) == 0
    })
}

/// [`crate::encode`] on AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn encode(old: &Page, new: &Page, out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_with(
        &mut ReadOnly::new(old, new),
        out,
        |a, b| eq_mask(a, b),
        false,
    )
}

/// [`crate::encode_and_update`] on AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
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

/// [`crate::is_zero`] on AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    is_zero_with(buf, |b| all_zero(b))
}
