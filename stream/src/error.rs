//! Errors of the reader ([`Error`], [`FormatError`]) and of the writer ([`WriteError`]).

use std::io;

/// Why a stream was refused: what was wrong, without the position.
///
/// Carried by [`Error::Format`] together with the byte offset of the item
/// (record, section header, ...) that was refused. `Clone + PartialEq`, so
/// tests and callers can match on it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The input ended inside `what` (a record, a section header, ...).
    #[error("stream truncated inside {what}")]
    Truncated {
        /// The item that was cut short, e.g. `"PAGE record"`.
        what: &'static str,
    },
    /// The file does not start with `QEVM`.
    #[error("bad file magic {found:#010x} (expected 0x5145564d \"QEVM\")")]
    BadMagic {
        /// The first four bytes, big-endian.
        found: u32,
    },
    /// The file version is not 3.
    #[error("unsupported file version {found} (expected 3)")]
    UnsupportedFileVersion {
        /// The version read.
        found: u32,
    },
    /// A byte that does not start any known section type.
    #[error("unknown section type {byte:#04x}")]
    UnknownSectionType {
        /// The byte read.
        byte: u8,
    },
    /// A section type that is valid but not at this point of the stream
    /// (e.g. a configuration section after the first section, or data after EOF).
    #[error("{what} not allowed here")]
    Unexpected {
        /// What was found.
        what: &'static str,
    },
    /// A configuration subsection we do not know.
    #[error("unknown configuration subsection {name:?}")]
    UnknownSubsection {
        /// Its id string (lossy UTF-8).
        name: String,
    },
    /// A length field is larger than its limit (protocol or configured).
    #[error("{what} length {len} exceeds the limit {limit}")]
    TooLong {
        /// What the length is of.
        what: &'static str,
        /// The length read.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A name (block, section, machine type) is empty or not UTF-8.
    #[error("invalid {what} name")]
    BadName {
        /// What the name is of.
        what: &'static str,
    },
    /// A PART/END/FOOTER refers to a section id that was not started, or that ended.
    #[error("unknown or closed section id {id}")]
    UnknownSectionId {
        /// The section id read.
        id: u32,
    },
    /// A footer names another section than the one it closes.
    #[error("section footer for id {found}, expected {expected}")]
    FooterMismatch {
        /// Id of the section just read.
        expected: u32,
        /// Id in the footer.
        found: u32,
    },
    /// A second `ram` section START.
    #[error("second ram section START")]
    DuplicateRamSection,
    /// The `ram` section has a version or instance we do not read.
    #[error("ram section instance {instance} version {version} (expected instance 0, version 4)")]
    UnsupportedRamSection {
        /// Instance id read.
        instance: u32,
        /// Version id read.
        version: u32,
    },
    /// A `ram` record header whose flags QEMU 7.2 never sends (without postcopy/multifd).
    #[error("invalid ram record flags {flags:#x}")]
    BadFlags {
        /// The flag bits of the header (low 12 bits).
        flags: u64,
    },
    /// A page record came before the MEM_SIZE record.
    #[error("page record before MEM_SIZE")]
    RecordBeforeMemSize,
    /// A second MEM_SIZE record.
    #[error("second MEM_SIZE record")]
    DuplicateMemSize,
    /// The MEM_SIZE block list is inconsistent.
    #[error("bad MEM_SIZE block list: {why}")]
    BadMemSize {
        /// What is wrong (zero or unaligned length, lengths that do not add up, duplicate name).
        why: &'static str,
    },
    /// MEM_SIZE announces more RAM than the configured limit.
    #[error("MEM_SIZE total {total} bytes exceeds the limit {limit}")]
    RamTooLarge {
        /// Total RAM bytes announced.
        total: u64,
        /// Configured limit ([`Limits::max_ram_bytes`](crate::Limits::max_ram_bytes)).
        limit: u64,
    },
    /// A CONTINUE record with no previous page record.
    #[error("CONTINUE flag with no previous block")]
    ContinueWithoutBlock,
    /// A page record names a block that MEM_SIZE did not list.
    #[error("unknown RAM block {name:?}")]
    UnknownBlock {
        /// The name read (lossy UTF-8).
        name: String,
    },
    /// A page offset at or past the end of its block.
    #[error("page offset {offset:#x} outside block {block:?} of {length:#x} bytes")]
    PageOutsideBlock {
        /// Block name.
        block: String,
        /// Page offset read.
        offset: u64,
        /// The block's used length.
        length: u64,
    },
    /// An XBZRLE record whose encoding byte is not 0x01.
    #[error("XBZRLE encoding byte {byte:#04x} (expected 0x01)")]
    BadXbzrleEncoding {
        /// The byte read.
        byte: u8,
    },
    /// A ZERO record whose fill byte is not 0 (QEMU only sends 0).
    #[error("ZERO record with fill byte {fill:#04x}")]
    NonZeroFill {
        /// The byte read.
        fill: u8,
    },
    /// The XBZRLE delta does not apply to the page (the page is untouched).
    #[error("XBZRLE delta refused: {0}")]
    Xbzrle(xbzrle::DecodeError),
    /// Our compressed-page record with a method byte we do not know.
    #[error("compressed page with unknown method byte {byte:#04x}")]
    UnknownPageCompression {
        /// The byte read.
        byte: u8,
    },
    /// Our compressed-page record's frame does not decode to one page (the page is untouched).
    #[error("compressed page refused: {0}")]
    PageCompression(precopy_compress::DecompressError),
    /// Valid QEMU data for a feature this crate does not load (compress, RDMA, commands).
    #[error("unsupported: {what}")]
    Unsupported {
        /// The feature.
        what: &'static str,
    },
    /// A file whose configuration does not list the `mapped-ram` capability
    /// was given to the mapped-ram reader.
    #[error("not a mapped-ram file (no mapped-ram capability in the configuration)")]
    NotMappedRam,
    /// A mapped-ram header, bitmap or page region is invalid.
    #[error("bad mapped-ram layout: {why}")]
    MappedRam {
        /// What is wrong.
        why: &'static str,
    },
    /// A multifd channel or sync point that breaks the multifd rules
    /// ([`multifd`](crate::multifd)).
    #[error("bad multifd channel: {why}")]
    Multifd {
        /// What is wrong.
        why: &'static str,
    },
    /// Bytes after the VM description.
    #[error("trailing bytes after the end of the stream")]
    TrailingData,
    /// The decoder was called again after it stopped at a foreign section or failed.
    #[error("decoder already stopped")]
    Stopped,
}

/// A reader error: malformed stream data, or the underlying reader failed.
/// Both carry the byte offset in the stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream is malformed at `offset` (start of the refused item).
    #[error("invalid stream at byte {offset}: {kind}")]
    Format {
        /// Byte offset (from the start of the stream) of the refused item.
        offset: u64,
        /// What was wrong.
        kind: FormatError,
    },
    /// Reading failed; `offset` is how far the stream had been read.
    #[error("I/O error at stream byte {offset}: {source}")]
    Io {
        /// Bytes read before the failure.
        offset: u64,
        /// The error of the reader.
        source: io::Error,
    },
    /// Allocating the RAM image failed.
    #[error("cannot allocate {bytes} bytes of RAM image (MEM_SIZE at byte {offset})")]
    Alloc {
        /// Offset of the MEM_SIZE record.
        offset: u64,
        /// Bytes asked for.
        bytes: u64,
    },
    /// The [`RamTarget`](crate::RamTarget) refused the MEM_SIZE block list for a
    /// reason of its own ([`TargetError::Other`](crate::TargetError::Other)).
    #[error("the destination RAM refused MEM_SIZE at byte {offset}: {source}")]
    Target {
        /// Offset of the MEM_SIZE record.
        offset: u64,
        /// The target's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Byte offset in the stream where the error was detected.
    pub fn offset(&self) -> u64 {
        match self {
            Error::Format { offset, .. }
            | Error::Io { offset, .. }
            | Error::Alloc { offset, .. }
            | Error::Target { offset, .. } => *offset,
        }
    }

    /// The format error, if this is one.
    pub fn format_error(&self) -> Option<&FormatError> {
        match self {
            Error::Format { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

/// A writer error: the caller asked for something the format cannot carry,
/// in the wrong order, or the underlying writer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// Writing to the underlying writer failed.
    #[error("I/O error after {written} stream bytes: {source}")]
    Io {
        /// Bytes of the stream produced before the failure.
        written: u64,
        /// The error of the writer.
        source: io::Error,
    },
    /// A name longer than 255 bytes, empty, or (for device sections) without
    /// the `precopy/` prefix.
    #[error("invalid {what} name {name:?}: {why}")]
    BadName {
        /// What the name is of.
        what: &'static str,
        /// The name given.
        name: String,
        /// Why it was refused.
        why: &'static str,
    },
    /// The block list is not valid for MEM_SIZE.
    #[error("bad RAM block list: {why}")]
    BadBlocks {
        /// Why it was refused.
        why: &'static str,
    },
    /// A block index not in the MEM_SIZE list.
    #[error("no RAM block with index {block}")]
    NoSuchBlock {
        /// The index given.
        block: usize,
    },
    /// A page offset that is unaligned or outside its block.
    #[error("page offset {offset:#x} invalid for block {block} of {length:#x} bytes")]
    BadOffset {
        /// Block index.
        block: usize,
        /// Offset given.
        offset: u64,
        /// The block's used length.
        length: u64,
    },
    /// A length over the format's limit (XBZRLE delta > 4096, payload > u32).
    #[error("{what} length {len} exceeds {limit}")]
    TooLong {
        /// What the length is of.
        what: &'static str,
        /// The length given.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A method that has no compressed-page record (`none`, `xbzrle` have
    /// records of their own).
    #[error("no compressed-page record for method {method}")]
    NotACompressedMethod {
        /// The method given.
        method: precopy_compress::Method,
    },
    /// A call out of order (e.g. a page outside a ram section).
    #[error("{op} not allowed {state}")]
    Order {
        /// The call.
        op: &'static str,
        /// Where the writer was.
        state: &'static str,
    },
}
