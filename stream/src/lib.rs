//! QEMU-compatible live-migration stream: the `ram` section, its container,
//! a rate-limited writer and a hardened reader.
//!
//! The format is QEMU 7.2's (`migration/savevm.c`, `migration/ram.c`); it is
//! drawn in [`format`](mod@format). Our reader reads the real QEMU 7.2 streams in
//! `shared/qemu-vectors` to the same RAM as QEMU's own loader, and our writer
//! writes the same `ram` records byte for byte (same flags, same CONTINUE
//! decisions, same XBZRLE bytes) for the same pages.
//!
//! # Layers
//!
//! | layer | source side | destination side |
//! |---|---|---|
//! | sans-IO | [`Encoder`]: appends items to a `Vec<u8>` | [`Decoder`]: slices in, [`Item`]s out, `Ok(None)` = need more bytes |
//! | I/O | [`StreamWriter`] over `io::Write`: buffered, counted ([`StreamWriter::bytes_written`]), rate-limited ([`RateLimiter`], QEMU's byte budget per 100 ms slice) | [`StreamReader`] over `io::Read` |
//! | RAM | (the engine reads guest pages) | [`Loader`] / [`load`]: applies records onto a [`RamImage`], counts per kind ([`LoadStats`]) |
//!
//! # What the reader does with each part of a stream
//!
//! * file header, configuration section (machine type; `target-page-bits`,
//!   `capabilities`, `uuid` subsections): checked and returned.
//! * `ram` START/PART/END and their records: MEM_SIZE allocates the RAM image
//!   (bounded by [`Limits::max_ram_bytes`]); ZERO fills, PAGE copies, XBZRLE
//!   decodes onto the current page, EOS ends the part; footers are checked.
//! * FULL sections named `precopy/...` (our extension): payload returned
//!   ([`Loaded::device_states`]).
//! * any other section (QEMU device state, other iterable sections): the
//!   decoder stops cleanly before it ([`StopReason::ForeignSection`] with offset
//!   and name), since its length is known only to the device's
//!   `VMStateDescription`. [`Loader::load_to_end`] then reads the stream to its
//!   end and keeps QEMU's device state as bytes, split into sections along the
//!   VM description ([`ForeignDeviceState`], [`split_device_state`]); a
//!   destination must read that far, or a QEMU source sees its last writes
//!   fail and reports the migration failed.
//! * EOF, then the VM description JSON: returned ([`Loaded::vm_description`]).
//! * our COMPRESSED record (flag 0x800, an extension: a zstd or zlib frame of
//!   one page, see [`format`](mod@format)): the loader inflates it into the
//!   page, bounded to 4096 bytes and all-or-nothing; an unknown method byte
//!   or a bad frame is refused at the record's offset, page untouched.
//! * COMMAND sections, QEMU's COMPRESS_PAGE (`compress` capability), RDMA
//!   hooks: framing is decoded; the loader refuses them as
//!   [`FormatError::Unsupported`].
//!
//! # multifd
//!
//! [`multifd`] describes our multi-connection layout (a main channel and N page channels,
//! each opened by a hello, sync points as `MULTIFD_FLUSH` records);
//! [`Decoder::multifd_channel`] reads a page channel, [`PageApplier`] applies its records.
//!
//! # mapped-ram files
//!
//! [`mapped_ram`] reads and writes QEMU's `mapped-ram` file layout (QEMU ≥ 9.0,
//! `migrate file:PATH` with the `mapped-ram` capability): every page at a fixed
//! file offset, a bitmap per block, zero pages as holes. It works on
//! random-access files ([`mapped_ram::ReadAt`], positional writes), not on
//! the sequential stream above.
//!
//! # Hardening
//!
//! Every error is typed ([`FormatError`]) and carries the stream offset of
//! the refused item ([`Error::offset`]). A cut-off record is
//! [`FormatError::Truncated`] naming it. Lengths are checked before use
//! (XBZRLE ≤ 4096, names ≤ 255, MEM_SIZE ≤ the limit, device state and VM
//! description ≤ their limits); page offsets and block names are checked
//! against MEM_SIZE; a ZERO fill byte other than 0, an XBZRLE encoding byte
//! other than 0x01 and a delta that does not apply are refused, leaving the
//! page untouched. No input makes the reader panic.
//!
//! # Example
//!
//! ```
//! use precopy_stream::{Decoder, Encoder, Item, Limits, RamBlockInfo, RamRecord};
//! let mut enc = Encoder::new();
//! let mut out = Vec::new();
//! enc.file_header(&mut out, "pc-i440fx-7.2")?;
//! enc.ram_setup(&mut out, &[RamBlockInfo::new("pc.ram", 0x10000)])?;
//! enc.begin_ram_iteration(&mut out)?;
//! enc.xbzrle_page(&mut out, 0, 0x2000, &[0xff, 0x1f, 0x01, 0x5a])?;
//!
//! let mut dec = Decoder::new(Limits::default());
//! let mut input = &out[..];
//! let mut last = None;
//! while let Some((item, n)) = dec.decode(input)? {
//!     input = &input[n..];
//!     last = Some(item);
//! }
//! assert!(matches!(last, Some(Item::Ram(RamRecord::Xbzrle { offset: 0x2000, .. }))));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

pub mod decoder;
pub mod encoder;
mod error;
mod foreign;
pub mod format;
mod image;
mod io;
mod loader;
pub mod mapped_ram;
pub mod multifd;
mod ratelimit;
mod writer;

pub use decoder::{
    Configuration, Decoder, DeviceState, Item, Limits, RamRecord, SectionHeader, SectionKind,
};
pub use encoder::Encoder;
pub use error::{Error, FormatError, WriteError};
pub use foreign::{ForeignDeviceState, ForeignSectionInfo, split_device_state};
pub use format::RamBlockInfo;
pub use image::{RamBlock, RamImage, RamTarget, TargetError};
pub use io::{StreamReader, find_vm_description};
pub use loader::{
    Control, KindStats, LoadStats, Loaded, Loader, OwnedDeviceState, PageApplier, StopReason, load,
};
pub use ratelimit::{RATE_LIMIT_SLICE, RateLimiter};
pub use writer::{DEFAULT_BUFFER_SIZE, StreamWriter};
pub use xbzrle::{PAGE_SIZE, Page};
