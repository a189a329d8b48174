//! NEON kernels: four 16-byte compares per 64-byte block, narrowed to a
//! 64-bit mask with weighted pairwise adds.
//!
//! NEON is baseline on aarch64; this module is compiled only when the target
//! enables it.

use core::arch::aarch64::{
    uint8x16_t, vandq_u8, vceqq_u8, vgetq_lane_u64, vld1q_u8, vmaxvq_u8, vorrq_u8, vpaddq_u8,
    vreinterpretq_u64_u8,
};

use crate::encode::{Block, ReadOnly, Update, encode_with};
use crate::zero::is_zero_with;
use crate::{EncodeError, Page};

/// Bit weights of the bytes of one 8-byte group.
const WEIGHTS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];

#[inline]
#[target_feature(enable = "neon")]
fn load(v: &[u8; 16]) -> uint8x16_t {
    // SAFETY: `v` is 16 readable bytes; `vld1q_u8` has no alignment
    // requirement beyond that of `u8`.
    unsafe { vld1q_u8(v.as_ptr()) }
}

/// Bit `i` set iff `a[i] == b[i]`.
#[inline]
#[target_feature(enable = "neon")]
fn eq_mask(a: &Block, b: &Block) -> u64 {
    let (a, _) = a.as_chunks::<16>();
    let (b, _) = b.as_chunks::<16>();
    let w = load(&WEIGHTS);
    // Each equal byte becomes its weight; three rounds of pairwise adds sum
    // each 8-byte group into one byte (distinct bits, so no carries), in
    // input order.
    let t0 = vandq_u8(vceqq_u8(load(&a[0]), load(&b[0])), w);
    let t1 = vandq_u8(vceqq_u8(load(&a[1]), load(&b[1])), w);
    let t2 = vandq_u8(vceqq_u8(load(&a[2]), load(&b[2])), w);
    let t3 = vandq_u8(vceqq_u8(load(&a[3]), load(&b[3])), w);
    let s = vpaddq_u8(vpaddq_u8(t0, t1), vpaddq_u8(t2, t3));
    let s = vpaddq_u8(s, s);
    vgetq_lane_u64::<0>(vreinterpretq_u64_u8(s))
}

/// True when all the blocks are zero; exits at the first non-zero block.
#[inline]
#[target_feature(enable = "neon")]
fn all_zero(blocks: &[Block]) -> bool {
    blocks.iter().all(|b| {
        let (v, _) = b.as_chunks::<16>();
        let acc = vorrq_u8(
            vorrq_u8(load(&v[0]), load(&v[1])),
            vorrq_u8(load(&v[2]), load(&v[3])),
        );
        vmaxvq_u8(acc) == 0
    })
}

/// [`crate::encode`] on NEON.
#[target_feature(enable = "neon")]
pub(crate) fn encode(old: &Page, new: &Page, out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_with(
        &mut ReadOnly::new(old, new),
        out,
        |a, b| eq_mask(a, b),
        false,
    )
}

/// [`crate::encode_and_update`] on NEON.
#[target_feature(enable = "neon")]
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

/// [`crate::is_zero`] on NEON.
#[target_feature(enable = "neon")]
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    is_zero_with(buf, |b| all_zero(b))
}
