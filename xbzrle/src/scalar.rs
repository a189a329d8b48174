//! The portable backend: SWAR ("SIMD within a register") on 64-bit words.
//!
//! No intrinsics, no `unsafe`: the block kernel XORs eight 8-byte words,
//! returns "all equal" after one OR when the block is unchanged, and
//! otherwise turns each word's non-zero bytes into 8 mask bits with an add
//! and a multiply. Runs on every target and under Miri.
#![forbid(unsafe_code)]

use crate::encode::{Block, ReadOnly, Update, encode_with};
use crate::zero::is_zero_with;
use crate::{EncodeError, Page};

const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// Bit `i` set iff byte `i` (little-endian order) of `x` is non-zero.
#[inline(always)]
fn nonzero_bytes(x: u64) -> u64 {
    // Bit 7 of each byte: set iff the byte is non-zero (the add carries into
    // bit 7 iff the low 7 bits are non-zero, and never out of the byte).
    let high = (((x & LOW7) + LOW7) | x) & !LOW7;
    // Gather the eight bit-7s into the top byte: byte i's bit lands at 56 + i.
    (high >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56
}

#[inline(always)]
fn word(b: &Block, k: usize) -> u64 {
    let (words, _) = b.as_chunks::<8>();
    u64::from_le_bytes(words[k])
}

/// Bit `i` set iff `a[i] == b[i]`.
#[inline(always)]
pub(crate) fn eq_mask(a: &Block, b: &Block) -> u64 {
    let mut x = [0u64; 8];
    let mut any = 0;
    for (k, xk) in x.iter_mut().enumerate() {
        *xk = word(a, k) ^ word(b, k);
        any |= *xk;
    }
    if any == 0 {
        return u64::MAX;
    }
    let mut ne = 0;
    for (k, xk) in x.iter().enumerate() {
        ne |= nonzero_bytes(*xk) << (8 * k);
    }
    !ne
}

/// True when all the blocks are zero; exits at the first non-zero group of
/// four blocks.
#[inline(always)]
pub(crate) fn all_zero(blocks: &[Block]) -> bool {
    let (groups, rest) = blocks.as_chunks::<4>();
    for g in groups {
        let mut acc = 0u64;
        for b in g {
            for w in b.as_chunks::<8>().0 {
                acc |= u64::from_ne_bytes(*w);
            }
        }
        if acc != 0 {
            return false;
        }
    }
    rest.iter().all(|b| {
        b.as_chunks::<8>()
            .0
            .iter()
            .all(|w| u64::from_ne_bytes(*w) == 0)
    })
}

/// [`crate::encode`] on the scalar backend.
pub(crate) fn encode(old: &Page, new: &Page, out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_with(&mut ReadOnly::new(old, new), out, eq_mask, false)
}

/// [`crate::encode_and_update`] on the scalar backend.
pub(crate) fn encode_and_update(
    cached: &mut Page,
    new: &Page,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    encode_with(&mut Update::new(cached, new), out, eq_mask, false)
}

/// [`crate::is_zero`] on the scalar backend.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    is_zero_with(buf, all_zero)
}
