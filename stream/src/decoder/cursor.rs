//! The bounds-checked cursor the parsers read through, and their outcome
//! type: "need more bytes" or "refused".

use crate::error::FormatError;

/// Internal parse outcome: need more bytes (inside `what`), or refused.
pub(super) enum P {
    Incomplete(&'static str),
    Bad(FormatError),
}

pub(super) type Pr<T> = Result<T, P>;

pub(super) fn bad<T>(kind: FormatError) -> Pr<T> {
    Err(P::Bad(kind))
}

/// A bounds-checked cursor over the unconsumed input.
pub(super) struct Cur<'a> {
    buf: &'a [u8],
    /// Bytes consumed so far.
    pub(super) pos: usize,
    /// What a cut here would be: the item being parsed.
    pub(super) what: &'static str,
}

impl<'a> Cur<'a> {
    pub(super) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cur { buf, pos: 0, what }
    }
    pub(super) fn bytes(&mut self, n: usize) -> Pr<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(P::Incomplete(self.what))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(P::Incomplete(self.what))?;
        self.pos = end;
        Ok(s)
    }
    pub(super) fn array<const N: usize>(&mut self) -> Pr<[u8; N]> {
        let s = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    pub(super) fn u8(&mut self) -> Pr<u8> {
        Ok(self.array::<1>()?[0])
    }
    pub(super) fn be16(&mut self) -> Pr<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub(super) fn be32(&mut self) -> Pr<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(super) fn be64(&mut self) -> Pr<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    pub(super) fn peek(&self) -> Pr<u8> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(P::Incomplete(self.what))
    }
    /// u8 length + name bytes, as UTF-8.
    pub(super) fn name(&mut self, what: &'static str) -> Pr<&'a str> {
        let len = self.u8()? as usize;
        let raw = self.bytes(len)?;
        if raw.is_empty() {
            return bad(FormatError::BadName { what });
        }
        std::str::from_utf8(raw).or(bad(FormatError::BadName { what }))
    }
}
