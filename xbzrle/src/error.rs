//! Error types of the codec. Small, `Copy`, and free to construct: an
//! overflow is a normal outcome for a heavily dirtied page.

use core::fmt;

/// Why [`encode`](crate::encode) produced no delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EncodeError {
    /// The canonical delta is longer than the output buffer (QEMU's
    /// "overflow": the caller sends the page whole instead). Nothing past
    /// `out.len()` was written.
    Overflow,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::Overflow => f.write_str("XBZRLE delta does not fit the output buffer"),
        }
    }
}

impl core::error::Error for EncodeError {}

/// What was wrong with a delta given to [`decode`](crate::decode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// Fewer than 2 bytes were left where a run length was expected
    /// (QEMU decodes a length only when 2 input bytes remain).
    Truncated,
    /// A run length used more than two ULEB128 bytes (the second byte had
    /// its continuation bit set).
    LengthTooLong,
    /// A zero run of length 0 anywhere but at the start of the delta.
    EmptyZeroRun,
    /// A literal (changed-bytes) run of length 0.
    EmptyLiteralRun,
    /// A run would pass the end of the page.
    PastEndOfPage,
    /// A literal run's bytes would pass the end of the delta.
    LiteralPastEndOfInput,
}

/// A refused delta: what was wrong and at which byte offset of the delta.
///
/// The page given to [`decode`](crate::decode) is untouched when this is
/// returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeError {
    kind: DecodeErrorKind,
    offset: usize,
}

impl DecodeError {
    pub(crate) const fn new(kind: DecodeErrorKind, offset: usize) -> Self {
        DecodeError { kind, offset }
    }

    /// What was wrong.
    pub const fn kind(&self) -> DecodeErrorKind {
        self.kind
    }

    /// Byte offset in the delta of the length or literal that was refused.
    pub const fn offset(&self) -> usize {
        self.offset
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            DecodeErrorKind::Truncated => "fewer than 2 bytes left for a run length",
            DecodeErrorKind::LengthTooLong => "run length longer than two ULEB128 bytes",
            DecodeErrorKind::EmptyZeroRun => "zero run of length 0 after the first run",
            DecodeErrorKind::EmptyLiteralRun => "literal run of length 0",
            DecodeErrorKind::PastEndOfPage => "run passes the end of the page",
            DecodeErrorKind::LiteralPastEndOfInput => "literal bytes pass the end of the delta",
        };
        write!(f, "invalid XBZRLE delta at byte {}: {}", self.offset, what)
    }
}

impl core::error::Error for DecodeError {}
