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
        loop {
            let offset = self.decoder.position();
            match self.decoder.decode(&self.buf[self.start..self.end])? {
                Some((item, n)) => {
                    let r = f(offset, &item, n);
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
