//! [`StreamWriter`]: the [`Encoder`] over any `io::Write`, buffered,
//! counted and rate-limited.

use std::io::Write;

use crate::encoder::Encoder;
use crate::error::WriteError;
use crate::format::RamBlockInfo;
use crate::ratelimit::RateLimiter;
use xbzrle::Page;

/// Default buffer size: records are gathered and handed to the underlying
/// writer in chunks of about this many bytes (one system call per chunk,
/// not per page).
pub const DEFAULT_BUFFER_SIZE: usize = 256 * 1024;

/// A migration stream writer (source side) over any `W: io::Write`.
///
/// Every method appends to an internal buffer; the buffer goes to `W` when
/// it passes [`DEFAULT_BUFFER_SIZE`], on [`flush`](Self::flush), before a
/// rate-limit sleep, and on [`finish`](Self::finish).
/// [`bytes_written`](Self::bytes_written) counts every byte of the stream
/// produced so far (QEMU's `ram.transferred` counts the same bytes), and
/// each byte is charged to the [`RateLimiter`] when it is produced.
///
/// Method order and errors are [`Encoder`]'s; on `Err` nothing was written.
/// Dropping the writer without [`flush`](Self::flush) or
/// [`finish`](Self::finish) discards what is still buffered (so a cancelled
/// migration does not push a half-written tail); call `finish` to complete a
/// stream.
///
/// ```
/// use precopy_stream::{RamBlockInfo, StreamWriter, load, Limits};
/// let mut w = StreamWriter::new(Vec::new());
/// w.write_header("pc-i440fx-7.2")?;
/// w.ram_setup(&[RamBlockInfo::new("pc.ram", 2 * 4096)])?;
/// w.begin_ram_iteration()?;
/// w.write_page(0, 0, &[7u8; 4096])?;
/// w.write_zero_page(0, 4096)?;
/// w.end_ram_section()?;
/// w.begin_ram_complete()?;
/// w.end_ram_section()?;
/// w.write_device_state("precopy/vcpu", 0, 1, b"regs")?;
/// w.write_eof()?;
/// w.write_vm_description(br#"{"page_size": 4096}"#)?;
/// let bytes = w.finish()?;
/// let loaded = load(&bytes[..], Limits::default())?;
/// assert_eq!(loaded.image.block("pc.ram").unwrap().data()[..4096], [7u8; 4096]);
/// assert_eq!(loaded.device_states[0].payload, b"regs");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    inner: W,
    enc: Encoder,
    buf: Vec<u8>,
    buffer_size: usize,
    flushed: u64,
    limiter: RateLimiter,
}

impl<W: Write> StreamWriter<W> {
    /// A writer with a default [`Encoder`] (ram section id 0) and no rate limit.
    pub fn new(inner: W) -> Self {
        StreamWriter::with_encoder(inner, Encoder::new())
    }

    /// A writer using `enc` (e.g. [`Encoder::with_ram_section_id`]).
    pub fn with_encoder(inner: W, enc: Encoder) -> Self {
        StreamWriter {
            inner,
            enc,
            buf: Vec::with_capacity(DEFAULT_BUFFER_SIZE + 8192),
            buffer_size: DEFAULT_BUFFER_SIZE,
            flushed: 0,
            limiter: RateLimiter::new(0),
        }
    }

    /// Sets the buffer threshold in bytes (at least 1).
    pub fn set_buffer_size(&mut self, bytes: usize) {
        self.buffer_size = bytes.max(1);
    }

    /// Bytes of stream produced so far (buffered or handed to `W`).
    pub fn bytes_written(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    /// The encoder (block list, state).
    pub fn encoder(&self) -> &Encoder {
        &self.enc
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The rate limiter.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The rate limiter, mutably.
    pub fn rate_limiter_mut(&mut self) -> &mut RateLimiter {
        &mut self.limiter
    }

    /// Sets `max-bandwidth` in bytes/s (0 = unlimited); effective at once.
    pub fn set_max_bandwidth(&mut self, bytes_per_sec: u64) {
        self.limiter.set_max_bandwidth(bytes_per_sec);
    }

    /// True when the current 100 ms slice's byte budget is used up: stop
    /// sending and call [`wait_for_rate_limit`](Self::wait_for_rate_limit).
    pub fn rate_limit_exceeded(&mut self) -> bool {
        self.limiter.exceeded()
    }

    /// Flushes the buffer, then sleeps until the next slice when the budget
    /// is used up. Returns the time slept.
    ///
    /// # Errors
    /// [`WriteError::Io`] from the flush.
    pub fn wait_for_rate_limit(&mut self) -> Result<std::time::Duration, WriteError> {
        if self.limiter.exceeded() {
            self.flush()?;
        }
        Ok(self.limiter.wait())
    }

    fn io_err(&self, source: std::io::Error) -> WriteError {
        WriteError::Io {
            written: self.flushed,
            source,
        }
    }

    fn drain(&mut self) -> Result<(), WriteError> {
        if !self.buf.is_empty() {
            if let Err(e) = self.inner.write_all(&self.buf) {
                return Err(self.io_err(e));
            }
            self.flushed += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Appends one record with `encode` (an [`Encoder`] method writing into
    /// the buffer), charges its bytes to the rate limiter, and hands the
    /// buffer to `W` once it passes the threshold. On an encoder error
    /// nothing was appended.
    fn record<T>(
        &mut self,
        encode: impl FnOnce(&mut Encoder, &mut Vec<u8>) -> Result<T, WriteError>,
    ) -> Result<T, WriteError> {
        let before = self.buf.len();
        let value = encode(&mut self.enc, &mut self.buf)?;
        self.limiter.record((self.buf.len() - before) as u64);
        if self.buf.len() >= self.buffer_size {
            self.drain()?;
        }
        Ok(value)
    }

    /// Writes everything buffered to `W` and flushes `W`.
    ///
    /// # Errors
    /// [`WriteError::Io`].
    pub fn flush(&mut self) -> Result<(), WriteError> {
        self.drain()?;
        self.inner.flush().map_err(|e| self.io_err(e))
    }

    /// Flushes and returns the underlying writer.
    ///
    /// # Errors
    /// [`WriteError::Io`].
    pub fn finish(mut self) -> Result<W, WriteError> {
        self.flush()?;
        Ok(self.inner)
    }

    /// Appends `bytes` as they are, outside the stream's framing (a multifd hello,
    /// [`multifd`](crate::multifd), before the file header or a page channel's first
    /// record); counted in [`bytes_written`](Self::bytes_written) and by the rate limiter.
    ///
    /// # Errors
    /// [`WriteError::Io`] when the buffer is handed on and that fails.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.record(|_, b| {
            b.extend_from_slice(bytes);
            Ok(())
        })
    }

    /// A `MULTIFD_FLUSH` sync point. See [`Encoder::multifd_flush`].
    ///
    /// # Errors
    /// As [`Encoder::multifd_flush`], plus [`WriteError::Io`].
    pub fn write_multifd_flush(&mut self, seq: u64) -> Result<(), WriteError> {
        self.record(|e, b| e.multifd_flush(b, seq))
    }

    /// The EOS that ends a multifd page channel. See [`Encoder::multifd_channel_end`].
    ///
    /// # Errors
    /// As [`Encoder::multifd_channel_end`], plus [`WriteError::Io`].
    pub fn write_multifd_channel_end(&mut self) -> Result<(), WriteError> {
        self.record(|e, b| e.multifd_channel_end(b))
    }

    /// File magic, version and configuration section. See [`Encoder::file_header`].
    ///
    /// # Errors
    /// As [`Encoder::file_header`], plus [`WriteError::Io`].
    pub fn write_header(&mut self, machine_type: &str) -> Result<(), WriteError> {
        self.record(|enc, out| enc.file_header(out, machine_type))
    }

    /// ram START with MEM_SIZE. See [`Encoder::ram_setup`].
    ///
    /// # Errors
    /// As [`Encoder::ram_setup`], plus [`WriteError::Io`].
    pub fn ram_setup(&mut self, blocks: &[RamBlockInfo]) -> Result<(), WriteError> {
        self.record(|enc, out| enc.ram_setup(out, blocks))
    }

    /// ram PART header. See [`Encoder::begin_ram_iteration`].
    ///
    /// # Errors
    /// As [`Encoder::begin_ram_iteration`], plus [`WriteError::Io`].
    pub fn begin_ram_iteration(&mut self) -> Result<(), WriteError> {
        self.record(|enc, out| enc.begin_ram_iteration(out))
    }

    /// ram END header. See [`Encoder::begin_ram_complete`].
    ///
    /// # Errors
    /// As [`Encoder::begin_ram_complete`], plus [`WriteError::Io`].
    pub fn begin_ram_complete(&mut self) -> Result<(), WriteError> {
        self.record(|enc, out| enc.begin_ram_complete(out))
    }

    /// EOS + footer. See [`Encoder::end_ram_section`].
    ///
    /// # Errors
    /// As [`Encoder::end_ram_section`], plus [`WriteError::Io`].
    pub fn end_ram_section(&mut self) -> Result<(), WriteError> {
        self.record(|enc, out| enc.end_ram_section(out))
    }

    /// ZERO record. See [`Encoder::zero_page`].
    ///
    /// # Errors
    /// As [`Encoder::zero_page`], plus [`WriteError::Io`].
    pub fn write_zero_page(&mut self, block: usize, offset: u64) -> Result<(), WriteError> {
        self.record(|enc, out| enc.zero_page(out, block, offset))
    }

    /// PAGE record. See [`Encoder::page`].
    ///
    /// # Errors
    /// As [`Encoder::page`], plus [`WriteError::Io`].
    pub fn write_page(&mut self, block: usize, offset: u64, data: &Page) -> Result<(), WriteError> {
        self.record(|enc, out| enc.page(out, block, offset, data))
    }

    /// XBZRLE record. See [`Encoder::xbzrle_page`].
    ///
    /// # Errors
    /// As [`Encoder::xbzrle_page`], plus [`WriteError::Io`].
    pub fn write_xbzrle_page(
        &mut self,
        block: usize,
        offset: u64,
        delta: &[u8],
    ) -> Result<(), WriteError> {
        self.record(|enc, out| enc.xbzrle_page(out, block, offset, delta))
    }

    /// Our compressed-page record. See [`Encoder::compressed_page`].
    ///
    /// # Errors
    /// As [`Encoder::compressed_page`], plus [`WriteError::Io`].
    pub fn write_compressed_page(
        &mut self,
        block: usize,
        offset: u64,
        method: precopy_compress::Method,
        frame: &[u8],
    ) -> Result<(), WriteError> {
        self.record(|enc, out| enc.compressed_page(out, block, offset, method, frame))
    }

    /// One of our device sections; returns its section id. See [`Encoder::device_state`].
    ///
    /// # Errors
    /// As [`Encoder::device_state`], plus [`WriteError::Io`].
    pub fn write_device_state(
        &mut self,
        name: &str,
        instance_id: u32,
        version_id: u32,
        payload: &[u8],
    ) -> Result<u32, WriteError> {
        self.record(|enc, out| enc.device_state(out, name, instance_id, version_id, payload))
    }

    /// EOF. See [`Encoder::eof`].
    ///
    /// # Errors
    /// As [`Encoder::eof`], plus [`WriteError::Io`].
    pub fn write_eof(&mut self) -> Result<(), WriteError> {
        self.record(|enc, out| enc.eof(out))
    }

    /// VM description JSON after EOF. See [`Encoder::vm_description`].
    ///
    /// # Errors
    /// As [`Encoder::vm_description`], plus [`WriteError::Io`].
    pub fn write_vm_description(&mut self, json: &[u8]) -> Result<(), WriteError> {
        self.record(|enc, out| enc.vm_description(out, json))
    }
}
