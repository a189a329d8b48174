//! [`StreamReader`]: the [`Decoder`] over any `io::Read`.

use std::io::{ErrorKind, Read};

use crate::decoder::{Decoder, Item, Limits};
use crate::error::Error;

const INITIAL_BUFFER: usize = 256 * 1024;

/// Reads items from any `R: io::Read`, through a growable buffer.
///
/// The buffer grows only as far as the largest single item, which the
/// decoder bounds by [`Limits`] before asking for its bytes.
#[derive(Debug)]
pub struct StreamReader<R> {
    inner: R,
    decoder: Decoder,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> StreamReader<R> {
    /// A reader with a fresh [`Decoder`] enforcing `limits`.
    pub fn new(inner: R, limits: Limits) -> Self {
        StreamReader::with_decoder(inner, Decoder::new(limits))
    }

    /// A reader around an existing decoder.
    pub fn with_decoder(inner: R, decoder: Decoder) -> Self {
        StreamReader {
            inner,
            decoder,
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// The decoder (position, block list, state).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Bytes read from `R` but not yet decoded.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Returns the reader and the bytes read from it but not decoded.
    pub fn into_parts(self) -> (R, Vec<u8>) {
        let rest = self.buf[self.start..self.end].to_vec();
        (self.inner, rest)
    }

    /// Reads everything left in the input (buffered bytes first), at most
    /// `max_bytes`; returns `(stream offset of the first byte, bytes)`.
    /// Use after a stop at a foreign section, with [`find_vm_description`].
    ///
    /// # Errors
    /// [`Error::Io`]; [`FormatError::TooLong`](crate::FormatError::TooLong)
    /// when more than `max_bytes` are left.
    pub fn read_rest(&mut self, max_bytes: usize) -> Result<(u64, Vec<u8>), Error> {
        let offset = self.decoder.position();
        let mut rest = self.buf[self.start..self.end].to_vec();
        self.start = self.end;
        let limit = max_bytes as u64;
        let mut take = (&mut self.inner).take(limit.saturating_sub(rest.len() as u64) + 1);
        take.read_to_end(&mut rest).map_err(|source| Error::Io {
            offset: offset + rest.len() as u64,
            source,
        })?;
        if rest.len() as u64 > limit {
            return Err(Error::Format {
                offset,
                kind: crate::FormatError::TooLong {
                    what: "stream after the last section read",
                    len: rest.len() as u64,
                    limit,
                },
            });
        }
        self.eof = true;
        Ok((offset, rest))
    }

    /// Reads more input; false at end of input.
    fn fill(&mut self) -> Result<bool, Error> {
        if self.eof {
            return Ok(false);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let new_len = self.buf.len() * 2;
            self.buf.resize(new_len, 0);
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        offset: self.decoder.position() + (self.end - self.start) as u64,
                        source,
                    });
                }
            }
        }
    }

    /// Decodes the next item and hands it to `f` as `(offset, &item,
    /// length in bytes)`; returns `f`'s result, or `Ok(None)` at the end of a
    /// complete stream.
    ///
    /// (A callback rather than a returned item, because the item borrows the
    /// reader's buffer.)
    ///
    /// # Errors
    /// [`Error::Format`] for a malformed or truncated stream (at the offset of
    /// the refused item), [`Error::Io`].
    pub fn next_with<T>(
        &mut self,
        f: impl FnOnce(u64, &Item<'_>, usize) -> T,
    ) -> Result<Option<T>, Error> {
        self.next_raw_with(|offset, item, raw| f(offset, item, raw.len()))
    }

    /// As [`next_with`](Self::next_with), handing `f` the item's bytes as the stream has
    /// them instead of their length (a relay forwards some items unchanged).
    ///
    /// # Errors
    /// As [`next_with`](Self::next_with).
    pub fn next_raw_with<T>(
        &mut self,
        f: impl FnOnce(u64, &Item<'_>, &[u8]) -> T,
    ) -> Result<Option<T>, Error> {
        loop {
            let offset = self.decoder.position();
            let input = &self.buf[self.start..self.end];
            match self.decoder.decode(input)? {
                Some((item, n)) => {
                    let r = f(offset, &item, &input[..n]);
                    self.start += n;
                    return Ok(Some(r));
                }
                None => {
                    if !self.fill()? {
                        self.decoder.finish(&self.buf[self.start..self.end])?;
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Finds QEMU's VM description at the end of `tail` (the bytes of a stream
/// from some offset to its end, e.g. from [`StreamReader::read_rest`]):
/// EOF (0x00), 0x06, be32 length, then exactly that many bytes of JSON
/// object up to the end. Returns `(offset in tail of the EOF byte, json)`.
///
/// This is how a reader gets past device state it cannot parse: the VM
/// description's length is the only thing that locates it. The JSON holds
/// no 0x00 byte, so the last match is the real one.
pub fn find_vm_description(tail: &[u8]) -> Option<(usize, &[u8])> {
    let n = tail.len();
    (0..n.saturating_sub(6)).rev().find_map(|p| {
        let head = tail.get(p..p + 6)?;
        if head[0] != crate::format::SECTION_EOF || head[1] != crate::format::VM_DESCRIPTION {
            return None;
        }
        let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
        let json = tail.get(p + 6..)?;
        (json.len() == len && json.first() == Some(&b'{') && json.last() == Some(&b'}'))
            .then_some((p, json))
    })
}
