//! The zero-page test shared by every backend.
//!
//! First the three sample bytes QEMU's `buffer_is_zero` looks at (first,
//! middle, last), each tested before the next is loaded so a typical
//! non-zero page costs one or two cache lines; then a backend's block
//! OR-reduction over 64-byte blocks with an early exit, and the sub-block
//! tail.
#![forbid(unsafe_code)]

use crate::encode::{BLOCK, Block};

/// True when every byte of `buf` is 0. `all_zero` tells whether a run of
/// whole blocks is all zero (it may exit early on a non-zero group).
#[inline(always)]
pub(crate) fn is_zero_with(buf: &[u8], all_zero: impl Fn(&[Block]) -> bool) -> bool {
    let Some(&first) = buf.first() else {
        return true; // empty
    };
    if first != 0 || buf.get(buf.len() / 2) != Some(&0) || buf.last() != Some(&0) {
        return false;
    }
    let (blocks, tail) = buf.as_chunks::<BLOCK>();
    tail_is_zero(tail) && all_zero(blocks)
}

/// The bytes after the last whole block (fewer than 64): OR-fold of 8-byte
/// words, then bytes.
#[inline(always)]
fn tail_is_zero(tail: &[u8]) -> bool {
    let (words, bytes) = tail.as_chunks::<8>();
    let w = words
        .iter()
        .fold(0u64, |acc, w| acc | u64::from_ne_bytes(*w));
    let b = bytes.iter().fold(0u8, |acc, b| acc | b);
    w == 0 && b == 0
}
