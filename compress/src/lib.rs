//! Per-page compression methods behind one interface, named as QEMU names
//! them, and an adaptive per-page method selector.
//!
//! | [`Method`] | QEMU name | what is sent | level parameter |
//! |---|---|---|---|
//! | `none` | `multifd-compression=none` | the raw 4096-byte page | — |
//! | `xbzrle` | capability `xbzrle` | an XBZRLE delta against the page last sent (cache hit) | — |
//! | `zstd` | `multifd-compression=zstd` | one zstd frame of the page | `multifd-zstd-level` (default 1) |
//! | `zlib` | `multifd-compression=zlib` | one zlib stream of the page | `multifd-zlib-level` (default 1) |
//!
//! Every page is compressed on its own (no state across pages), so any page
//! decodes alone. QEMU's multifd zlib/zstd compress a whole packet of pages
//! as one stream; this crate's frames are per page, which is what a
//! per-page choice of method needs.
//!
//! [`PageCompressor::compress`] writes into a caller buffer and fails with
//! [`CompressError::DoesNotFit`] when the result is longer than that buffer
//! (pass `PAGE_SIZE - 1` bytes to accept only a gain).
//! [`PageDecompressor::decompress`] is all-or-nothing: it decodes into a
//! scratch page with a hard 4096-byte bound (never `decode_all`, never an
//! allocation sized from the frame) and copies only a complete, exact page;
//! on any error the caller's page is untouched.
//!
//! [`select::Selector`] picks the method per page from measured link
//! bandwidth and measured CPU cost per method (the `auto` choice, an
//! extension of ours).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

pub mod select;

pub use xbzrle::{PAGE_SIZE, Page};

/// A page compression method (see the [crate docs](crate) for the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// The raw page.
    None,
    /// An XBZRLE delta against the previously sent copy of the page.
    Xbzrle,
    /// A zstd frame (`multifd-compression=zstd`).
    Zstd,
    /// A zlib stream (`multifd-compression=zlib`).
    Zlib,
}

impl Method {
    /// Every method, in index order ([`Method::index`]).
    pub const ALL: [Method; 4] = [Method::None, Method::Xbzrle, Method::Zstd, Method::Zlib];

    /// QEMU's name: `none`, `xbzrle`, `zstd`, `zlib`.
    pub fn name(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Xbzrle => "xbzrle",
            Method::Zstd => "zstd",
            Method::Zlib => "zlib",
        }
    }

    /// Position in [`Method::ALL`] (0..4), for per-method tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The method byte of our compressed-page stream record (see
    /// `precopy_stream::format`): zstd = 0x01, zlib = 0x02. `None` for
    /// methods that have a QEMU record of their own (PAGE, XBZRLE).
    pub fn wire_id(self) -> Option<u8> {
        match self {
            Method::Zstd => Some(WIRE_ZSTD),
            Method::Zlib => Some(WIRE_ZLIB),
            Method::None | Method::Xbzrle => None,
        }
    }

    /// The method of a compressed-page record's method byte.
    ///
    /// # Errors
    /// [`DecompressError::UnknownMethod`] for any byte but 0x01 and 0x02.
    pub fn from_wire_id(byte: u8) -> Result<Method, DecompressError> {
        match byte {
            WIRE_ZSTD => Ok(Method::Zstd),
            WIRE_ZLIB => Ok(Method::Zlib),
            _ => Err(DecompressError::UnknownMethod { byte }),
        }
    }
}

/// Method byte of a zstd page in our compressed-page record.
pub const WIRE_ZSTD: u8 = 0x01;
/// Method byte of a zlib page in our compressed-page record.
pub const WIRE_ZLIB: u8 = 0x02;

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a method.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown page compression method {0:?} (expected none, xbzrle, zstd or zlib)")]
pub struct UnknownMethodName(pub String);

impl FromStr for Method {
    type Err = UnknownMethodName;
    fn from_str(s: &str) -> Result<Method, UnknownMethodName> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMethodName(s.to_owned()))
    }
}

/// Compression levels, QEMU's parameters and defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Levels {
    /// `multifd-zstd-level`: 0..=20 (QEMU's range), default 1.
    pub zstd: i32,
    /// `multifd-zlib-level`: 0..=9, default 1.
    pub zlib: u32,
}

impl Default for Levels {
    fn default() -> Self {
        Levels { zstd: 1, zlib: 1 }
    }
}

/// Highest `multifd-zstd-level` QEMU accepts.
pub const MAX_ZSTD_LEVEL: i32 = 20;
/// Highest `multifd-zlib-level` QEMU accepts.
pub const MAX_ZLIB_LEVEL: u32 = 9;

/// Why a page could not be compressed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// The result is longer than the output buffer (`capacity` bytes): send
    /// the page another way.
    #[error("{method} output does not fit in {capacity} bytes")]
    DoesNotFit {
        /// The method.
        method: Method,
        /// Bytes available.
        capacity: usize,
    },
    /// XBZRLE needs the previously sent copy of the page.
    #[error("xbzrle needs a reference page")]
    NoReference,
    /// A level out of QEMU's range for the method.
    #[error("{method} level {level} outside 0..={max}")]
    BadLevel {
        /// The method.
        method: Method,
        /// The level given.
        level: i64,
        /// The highest level.
        max: i64,
    },
    /// The compression library failed for another reason.
    #[error("{method} compressor failed: {why}")]
    Backend {
        /// The method.
        method: Method,
        /// The library's message.
        why: String,
    },
}

/// Why a frame was refused. The page given to
/// [`PageDecompressor::decompress`] is untouched in every case.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecompressError {
    /// A method byte that is not 0x01 (zstd) or 0x02 (zlib).
    #[error("unknown page compression method byte {byte:#04x}")]
    UnknownMethod {
        /// The byte read.
        byte: u8,
    },
    /// The frame would inflate past 4096 bytes.
    #[error("{method} frame inflates past {PAGE_SIZE} bytes")]
    TooLarge {
        /// The method.
        method: Method,
    },
    /// The frame ends after `len` < 4096 bytes of page.
    #[error("{method} frame inflates to {len} bytes, not {PAGE_SIZE}")]
    TooShort {
        /// The method.
        method: Method,
        /// Bytes it produced.
        len: usize,
    },
    /// Bytes after the end of the compressed stream.
    #[error("{method} frame has {extra} bytes after its end")]
    TrailingBytes {
        /// The method.
        method: Method,
        /// Bytes left over.
        extra: usize,
    },
    /// The frame is corrupt (bad magic, checksum, block, truncated...).
    #[error("corrupt {method} frame: {why}")]
    Corrupt {
        /// The method.
        method: Method,
        /// The library's message.
        why: String,
    },
    /// An XBZRLE delta that does not apply.
    #[error("xbzrle delta refused: {0}")]
    Xbzrle(xbzrle::DecodeError),
    /// The frame is not a full page (method `none`).
    #[error("raw page of {len} bytes (expected {PAGE_SIZE})")]
    BadRawLength {
        /// The length given.
        len: usize,
    },
}

/// The compressing side: one zstd context and one zlib stream, reused for
/// every page (no allocation per page).
pub struct PageCompressor {
    levels: Levels,
    zstd: zstd::bulk::Compressor<'static>,
    zlib: flate2::Compress,
}

impl fmt::Debug for PageCompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageCompressor")
            .field("levels", &self.levels)
            .finish_non_exhaustive()
    }
}

fn backend(method: Method, e: impl fmt::Display) -> CompressError {
    CompressError::Backend {
        method,
        why: e.to_string(),
    }
}

impl PageCompressor {
    /// A compressor at `levels`.
    ///
    /// # Errors
    /// [`CompressError::BadLevel`] outside QEMU's ranges (zstd 0..=20, zlib
    /// 0..=9); [`CompressError::Backend`] if zstd cannot make a context.
    pub fn new(levels: Levels) -> Result<PageCompressor, CompressError> {
        if !(0..=MAX_ZSTD_LEVEL).contains(&levels.zstd) {
            return Err(CompressError::BadLevel {
                method: Method::Zstd,
                level: levels.zstd.into(),
                max: MAX_ZSTD_LEVEL.into(),
            });
        }
        if levels.zlib > MAX_ZLIB_LEVEL {
            return Err(CompressError::BadLevel {
                method: Method::Zlib,
                level: levels.zlib.into(),
                max: MAX_ZLIB_LEVEL.into(),
            });
        }
        let mut zstd =
            zstd::bulk::Compressor::new(levels.zstd).map_err(|e| backend(Method::Zstd, e))?;
        // The page size is implied: do not spend frame bytes on it.
        zstd.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
            .map_err(|e| backend(Method::Zstd, e))?;
        Ok(PageCompressor {
            levels,
            zstd,
            zlib: flate2::Compress::new(flate2::Compression::new(levels.zlib), true),
        })
    }

    /// The levels in use.
    pub fn levels(&self) -> Levels {
        self.levels
    }

    /// Compresses `page` with `method` into `out`; returns the bytes written.
    /// `reference` is the previously sent copy of the page (needed by
    /// XBZRLE only; ignored by the others). XBZRLE of an unchanged page
    /// returns 0.
    ///
    /// # Errors
    /// [`CompressError::DoesNotFit`] when the result is longer than
    /// `out.len()`; [`CompressError::NoReference`] for XBZRLE without
    /// `reference`; [`CompressError::Backend`] if a library fails otherwise.
    pub fn compress(
        &mut self,
        method: Method,
        page: &Page,
        reference: Option<&Page>,
        out: &mut [u8],
    ) -> Result<usize, CompressError> {
        let does_not_fit = CompressError::DoesNotFit {
            method,
            capacity: out.len(),
        };
        match method {
            Method::None => {
                let dst = out.get_mut(..PAGE_SIZE).ok_or(does_not_fit)?;
                dst.copy_from_slice(page);
                Ok(PAGE_SIZE)
            }
            Method::Xbzrle => {
                let old = reference.ok_or(CompressError::NoReference)?;
                xbzrle::encode(old, page, out).map_err(|_| does_not_fit)
            }
            Method::Zstd => match self.zstd.compress_to_buffer(&page[..], out) {
                Ok(n) => Ok(n),
                // zstd reports "Destination buffer is too small" (dstSize_tooSmall).
                Err(e) if e.to_string().contains("too small") => Err(does_not_fit),
                Err(e) => Err(backend(method, e)),
            },
            Method::Zlib => {
                self.zlib.reset();
                match self.zlib.compress(page, out, flate2::FlushCompress::Finish) {
                    Ok(flate2::Status::StreamEnd) => Ok(self.zlib.total_out() as usize),
                    Ok(_) => Err(does_not_fit),
                    Err(e) => Err(backend(method, e)),
                }
            }
        }
    }
}

/// The decompressing side: one zstd context, one zlib stream and a scratch
/// page, reused for every page.
pub struct PageDecompressor {
    zstd: zstd::bulk::Decompressor<'static>,
    zlib: flate2::Decompress,
    scratch: Box<Page>,
}

impl fmt::Debug for PageDecompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageDecompressor").finish_non_exhaustive()
    }
}

impl Default for PageDecompressor {
    fn default() -> Self {
        PageDecompressor::new()
    }
}

impl PageDecompressor {
    /// A decompressor.
    ///
    /// # Panics
    /// Only if zstd cannot allocate its (fixed-size) decompression context.
    pub fn new() -> PageDecompressor {
        PageDecompressor {
            zstd: zstd::bulk::Decompressor::new().expect("zstd decompression context"),
            zlib: flate2::Decompress::new(true),
            scratch: Box::new([0; PAGE_SIZE]),
        }
    }

    /// Decodes `frame` (made by [`PageCompressor::compress`] with `method`)
    /// onto `page`. For XBZRLE, `page` must hold the destination's current
    /// copy (the delta applies onto it).
    ///
    /// At most 4096 bytes are ever produced: a frame that would inflate
    /// further is refused as soon as the bound is hit.
    ///
    /// # Errors
    /// [`DecompressError::TooLarge`], [`TooShort`](DecompressError::TooShort),
    /// [`TrailingBytes`](DecompressError::TrailingBytes),
    /// [`Corrupt`](DecompressError::Corrupt), [`Xbzrle`](DecompressError::Xbzrle),
    /// [`BadRawLength`](DecompressError::BadRawLength). `page` is untouched on error.
    pub fn decompress(
        &mut self,
        method: Method,
        frame: &[u8],
        page: &mut Page,
    ) -> Result<(), DecompressError> {
        match method {
            Method::None => {
                let src: &Page = frame
                    .try_into()
                    .map_err(|_| DecompressError::BadRawLength { len: frame.len() })?;
                page.copy_from_slice(src);
                Ok(())
            }
            // All-or-nothing already (xbzrle::decode leaves the page untouched on error).
            Method::Xbzrle => xbzrle::decode(frame, page).map_err(DecompressError::Xbzrle),
            Method::Zstd => {
                self.zstd_into_scratch(frame)?;
                page.copy_from_slice(&self.scratch[..]);
                Ok(())
            }
            Method::Zlib => {
                self.zlib_into_scratch(frame)?;
                page.copy_from_slice(&self.scratch[..]);
                Ok(())
            }
        }
    }

    fn zstd_into_scratch(&mut self, frame: &[u8]) -> Result<(), DecompressError> {
        let method = Method::Zstd;
        // A declared size is checked before any decoding.
        if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(frame)
            && n > PAGE_SIZE as u64
        {
            return Err(DecompressError::TooLarge { method });
        }
        // Single-shot decoding writes straight into the 4096-byte scratch
        // page (no window buffer sized from the frame header).
        match self.zstd.decompress_to_buffer(frame, &mut self.scratch[..]) {
            Ok(PAGE_SIZE) => Ok(()),
            Ok(len) => Err(DecompressError::TooShort { method, len }),
            Err(e) => {
                let why = e.to_string();
                if why.contains("too small") {
                    Err(DecompressError::TooLarge { method })
                } else {
                    Err(DecompressError::Corrupt { method, why })
                }
            }
        }
    }

    fn zlib_into_scratch(&mut self, frame: &[u8]) -> Result<(), DecompressError> {
        let method = Method::Zlib;
        self.zlib.reset(true);
        let mut r =
            self.zlib
                .decompress(frame, &mut self.scratch[..], flate2::FlushDecompress::None);
        if matches!(r, Ok(s) if s != flate2::Status::StreamEnd)
            && self.zlib.total_out() as usize == PAGE_SIZE
        {
            // The page is full but the stream did not end: one more byte of
            // room tells "inflates further" from "only the trailer is left"
            // or "cut short".
            let rest = &frame[self.zlib.total_in() as usize..];
            let mut one = [0u8; 1];
            r = self
                .zlib
                .decompress(rest, &mut one, flate2::FlushDecompress::None);
            if self.zlib.total_out() as usize > PAGE_SIZE {
                return Err(DecompressError::TooLarge { method });
            }
        }
        let out = self.zlib.total_out() as usize;
        let consumed = self.zlib.total_in() as usize;
        match r {
            Ok(flate2::Status::StreamEnd) if out < PAGE_SIZE => {
                Err(DecompressError::TooShort { method, len: out })
            }
            Ok(flate2::Status::StreamEnd) if consumed < frame.len() => {
                Err(DecompressError::TrailingBytes {
                    method,
                    extra: frame.len() - consumed,
                })
            }
            Ok(flate2::Status::StreamEnd) => Ok(()),
            Ok(_) => Err(DecompressError::Corrupt {
                method,
                why: format!("stream ends after {consumed} bytes, {out} bytes of page"),
            }),
            Err(e) => Err(DecompressError::Corrupt {
                method,
                why: e.to_string(),
            }),
        }
    }
}
