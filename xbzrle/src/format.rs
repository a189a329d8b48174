//! The XBZRLE wire grammar and its ULEB128 run lengths.
//!
//! A delta turns an old page into a new one. It is a sequence of pairs:
//!
//! ```text
//! delta  = *( zrun nzrun literal )
//! zrun   = length            ; bytes where old == new (skipped)
//! nzrun  = length            ; bytes where old != new ...
//! literal = nzrun bytes      ; ... and their new values
//! length = ULEB128, one or two bytes, value 0..=0x3fff
//! ```
//!
//! The canonical form, written by QEMU's scalar encoder and by every backend
//! of this crate: runs are maximal (a literal run ends at the first unchanged
//! byte, a zero run at the first changed byte); only the first zrun may be 0;
//! every nzrun is at least 1; the zero run after the last literal is not
//! written; an unchanged page is the empty delta.
//!
//! ULEB128 "small": 7 bits per byte, low group first, bit 7 set on every byte
//! but the last. Values below 0x80 take one byte, values up to 0x3fff two.
//! The decoder refuses a second byte with bit 7 set (a third byte would
//! follow) and accepts non-minimal two-byte forms (`80 00` = 0).
//!
//! Decoder refusals (format of QEMU `migration/xbzrle.c`, decoder
//! `xbzrle_decode_buffer`), each a [`DecodeErrorKind`](crate::DecodeErrorKind):
//! fewer than 2 delta bytes left where a length is expected
//! (`Truncated`); a length of more than two bytes (`LengthTooLong`); a zrun of
//! 0 anywhere but first (`EmptyZeroRun`); an nzrun of 0 (`EmptyLiteralRun`);
//! a run passing the end of the page (`PastEndOfPage`); literal bytes passing
//! the end of the delta (`LiteralPastEndOfInput`).

/// Largest run length the two-byte ULEB128 form carries (16383).
pub const MAX_RUN: usize = 0x3fff;

/// Encoded size in bytes of `value` (`value` ≤ [`MAX_RUN`]): 1 or 2.
#[inline(always)]
pub const fn uleb128_len(value: usize) -> usize {
    if value < 0x80 { 1 } else { 2 }
}

/// Writes `value` (≤ [`MAX_RUN`], checked by debug assertion only) as
/// minimal ULEB128 at the start of `out`; returns the bytes written (1 or 2),
/// or `None` when `out` is too short (nothing written then).
#[inline(always)]
pub fn uleb128_encode_small(value: usize, out: &mut [u8]) -> Option<usize> {
    debug_assert!(value <= MAX_RUN);
    if value < 0x80 {
        *out.first_mut()? = value as u8;
        Some(1)
    } else {
        let [a, b, ..] = out else { return None };
        *a = (value as u8 & 0x7f) | 0x80;
        *b = (value >> 7) as u8;
        Some(2)
    }
}

/// Reads one ULEB128 "small" length from the start of `input`.
///
/// Returns `Some((value, bytes_used))`, or `None` when the form is longer
/// than two bytes or `input` ends inside it. The caller enforces QEMU's
/// "2 bytes left" rule before calling.
#[inline(always)]
pub fn uleb128_decode_small(input: &[u8]) -> Option<(usize, usize)> {
    let first = *input.first()?;
    if first & 0x80 == 0 {
        return Some((first as usize, 1));
    }
    let second = *input.get(1)?;
    if second & 0x80 != 0 {
        return None;
    }
    Some((((first & 0x7f) as usize) | ((second as usize) << 7), 2))
}
