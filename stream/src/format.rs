//! Wire constants of QEMU's migration stream, the layout they form, and
//! [`RamBlockInfo`], the RAM block description MEM_SIZE carries.
//!
//! Sources (facts only): QEMU 7.2 `migration/savevm.c` (container, section
//! types, configuration section, VM description), `migration/ram.c` (`ram`
//! section record flags, `MEM_SIZE`, `load_xbzrle`), `migration/qemu-file.c`
//! (big-endian integers), all checked against the real QEMU 7.2 streams in
//! `shared/qemu-vectors`.
//!
//! # Container
//!
//! ```text
//! be32 0x5145564d "QEVM"        file magic              (QEMU_VM_FILE_MAGIC)
//! be32 3                        version                 (QEMU_VM_FILE_VERSION)
//! 0x07 be32 len, len bytes      configuration section: the machine type, e.g. "pc-i440fx-7.2"
//!      [0x05 subsection]*       optional: "configuration/capabilities", "configuration/uuid"
//! section*                      START / PART / END / FULL / COMMAND, each with an optional FOOTER
//! 0x00                          EOF
//! 0x06 be32 len, len bytes      VM description (JSON); written after EOF
//! ```
//!
//! | byte | section | followed by |
//! |---|---|---|
//! | 0x01 | START | be32 section id, u8 len + id string, be32 instance id, be32 version id, content |
//! | 0x02 | PART | be32 section id, content |
//! | 0x03 | END | be32 section id, content |
//! | 0x04 | FULL | like START |
//! | 0x08 | COMMAND | be16 command, be16 length, data |
//! | 0x7e | FOOTER | be32 section id (closes the section just read) |
//!
//! The `ram` section (id string `"ram"`, instance 0, version 4) is the only
//! iterable section we read: START carries `MEM_SIZE` + `EOS`, every PART and
//! the END carry page records up to `EOS`. Device state is FULL sections
//! whose content only the device's `VMStateDescription` can parse, so a
//! reader stops at the first one it does not know (see
//! [`Item::ForeignSection`](crate::Item::ForeignSection)).
//!
//! # Our device sections (an extension)
//!
//! A FULL section whose id string starts with [`OUR_SECTION_PREFIX`]
//! (`"precopy/"`, e.g. `"precopy/vcpu"`) carries `be32 length` + that many
//! payload bytes, then the footer. A reader of this crate returns the
//! payload; QEMU would refuse the section as an unknown device.
//!
//! # `ram` records
//!
//! Each record starts with a be64 header: bits 0..12 are flags, the rest the
//! page-aligned byte offset of the page inside its RAM block.
//!
//! | flag | name | followed by |
//! |---|---|---|
//! | 0x02 | ZERO | [block name], one fill byte (QEMU always sends 0; we refuse others) |
//! | 0x04 | MEM_SIZE | header offset bits = total RAM bytes; per block: u8 len + name, be64 used length (+ be64 page size with postcopy-ram when it differs, + be64 address with x-ignore-shared) until the lengths add up to the total |
//! | 0x08 | PAGE | [block name], 4096 bytes |
//! | 0x10 | EOS | nothing: end of the section's content |
//! | 0x20 | CONTINUE | combined with ZERO, PAGE, XBZRLE or COMPRESS_PAGE: same block as the previous page record, so no name |
//! | 0x40 | XBZRLE | [block name], u8 encoding 0x01, be16 length ≤ 4096, the delta |
//! | 0x80 | HOOK | nothing here (RDMA transfers the data out of band) |
//! | 0x100 | COMPRESS_PAGE | [block name], be32 length ≤ 4110, zlib data (`compress` capability) |
//!
//! | 0x200 | MULTIFD_FLUSH | nothing; QEMU ≥ 8 writes it with multifd (offset bits 0). In our multifd streams the offset bits carry the sync number (see [`multifd`](crate::multifd)) |
//! | 0x800 | COMPRESSED (ours) | [block name], u8 method, be16 length 1..=4096, the frame (see below) |
//!
//! `[block name]` is u8 length + name bytes, present exactly when CONTINUE
//! is not set. The previous block carries across section boundaries.
//!
//! # Our compressed-page record (an extension)
//!
//! QEMU's single-channel stream has no zstd page (zstd and zlib exist only
//! as `multifd-compression`, on multifd channels). We send a page compressed
//! per page as a `ram` record of our own, flag [`FLAG_COMPRESSED`] (0x800,
//! a bit QEMU 7.2..10 never sets; QEMU refuses the record as an unknown
//! flag combination):
//!
//! ```text
//! be64 offset | 0x800 [| 0x20 CONTINUE]
//! [u8 len + block name]          when CONTINUE is not set
//! u8   method                    0x01 zstd (one zstd frame), 0x02 zlib (one zlib stream)
//! be16 length                    1..=4096 (a page that does not shrink is sent as PAGE)
//! length bytes                   the frame; it must inflate to exactly 4096 bytes
//! ```
//!
//! Each page is compressed on its own (no state across records), at the
//! levels `multifd-zstd-level` / `multifd-zlib-level`. A reader of this crate
//! refuses an unknown method byte ([`FormatError::UnknownPageCompression`](crate::FormatError::UnknownPageCompression)) and a
//! frame that is corrupt, short, or inflates past 4096 bytes
//! ([`FormatError::PageCompression`](crate::FormatError::PageCompression)), at the record's offset, leaving
//! the page untouched. The frames are made and read by `precopy-compress`.

/// Page size of the stream (QEMU's `TARGET_PAGE_SIZE` on x86 and arm).
pub const PAGE_SIZE: usize = xbzrle::PAGE_SIZE;
/// Mask of the flag bits in a `ram` record header (`~TARGET_PAGE_MASK`).
pub const FLAGS_MASK: u64 = PAGE_SIZE as u64 - 1;

/// `QEMU_VM_FILE_MAGIC`: `"QEVM"` big-endian.
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION`.
pub const FILE_VERSION: u32 = 3;

/// `QEMU_VM_EOF`.
pub const SECTION_EOF: u8 = 0x00;
/// `QEMU_VM_SECTION_START`.
pub const SECTION_START: u8 = 0x01;
/// `QEMU_VM_SECTION_PART`.
pub const SECTION_PART: u8 = 0x02;
/// `QEMU_VM_SECTION_END`.
pub const SECTION_END: u8 = 0x03;
/// `QEMU_VM_SECTION_FULL`.
pub const SECTION_FULL: u8 = 0x04;
/// `QEMU_VM_SUBSECTION`.
pub const SUBSECTION: u8 = 0x05;
/// `QEMU_VM_VMDESCRIPTION`.
pub const VM_DESCRIPTION: u8 = 0x06;
/// `QEMU_VM_CONFIGURATION`.
pub const CONFIGURATION: u8 = 0x07;
/// `QEMU_VM_COMMAND`.
pub const COMMAND: u8 = 0x08;
/// `MIG_CMD_SWITCHOVER_START`: a COMMAND with no data that QEMU 10.0 sends right before
/// the final phase (the ram END section), so that devices on the destination learn that
/// the switchover begins (machine property `send-switchover-start`, on for 10.0 machine
/// types). It means nothing for RAM: loaders count it and go on.
pub const MIG_CMD_SWITCHOVER_START: u16 = 11;
/// `QEMU_VM_SECTION_FOOTER`.
pub const SECTION_FOOTER: u8 = 0x7e;

/// `RAM_SAVE_FLAG_FULL`: obsolete, never sent by QEMU 7.2 (refused).
pub const FLAG_FULL: u64 = 0x01;
/// `RAM_SAVE_FLAG_ZERO`: a page whose bytes all equal the fill byte.
pub const FLAG_ZERO: u64 = 0x02;
/// `RAM_SAVE_FLAG_MEM_SIZE`: the RAM block list.
pub const FLAG_MEM_SIZE: u64 = 0x04;
/// `RAM_SAVE_FLAG_PAGE`: a raw page.
pub const FLAG_PAGE: u64 = 0x08;
/// `RAM_SAVE_FLAG_EOS`: end of the section's content.
pub const FLAG_EOS: u64 = 0x10;
/// `RAM_SAVE_FLAG_CONTINUE`: same block as the previous page record.
pub const FLAG_CONTINUE: u64 = 0x20;
/// `RAM_SAVE_FLAG_XBZRLE`: an XBZRLE delta against the destination's page.
pub const FLAG_XBZRLE: u64 = 0x40;
/// `RAM_SAVE_FLAG_HOOK`: RDMA hook point.
pub const FLAG_HOOK: u64 = 0x80;
/// `RAM_SAVE_FLAG_COMPRESS_PAGE`: a zlib-compressed page (`compress` capability).
pub const FLAG_COMPRESS_PAGE: u64 = 0x100;

/// `RAM_SAVE_FLAG_MULTIFD_FLUSH`: a multifd sync point (QEMU ≥ 8 writes it on the
/// main channel with multifd, offset bits 0; ours carry the sync number there, see
/// [`multifd`](crate::multifd)). No payload.
pub const FLAG_MULTIFD_FLUSH: u64 = 0x200;

/// Our compressed-page record (not QEMU's): see the module docs.
pub const FLAG_COMPRESSED: u64 = 0x800;
/// Largest frame of our compressed-page record: one page.
pub const MAX_COMPRESSED_FRAME: usize = PAGE_SIZE;

/// `ENCODING_FLAG_XBZRLE`: the encoding byte of an XBZRLE record.
pub const ENCODING_XBZRLE: u8 = 0x01;
/// Largest zlib stream QEMU accepts for one page: `compressBound(4096)`.
pub const MAX_COMPRESSED_PAGE: usize = PAGE_SIZE + (PAGE_SIZE >> 12) + (PAGE_SIZE >> 14) + 13;

/// Id string of the RAM section.
pub const RAM_SECTION_NAME: &str = "ram";
/// Version id of the RAM section (QEMU `ram_mig_init`: 4).
pub const RAM_SECTION_VERSION: u32 = 4;
/// Id-string prefix of our own device sections (see the module docs).
pub const OUR_SECTION_PREFIX: &str = "precopy/";
/// Longest name a u8 length prefix carries (block names, section id strings).
pub const MAX_NAME_LEN: usize = 255;

/// One RAM block as listed by MEM_SIZE: QEMU's `RAMBlock` `idstr` and `used_length`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RamBlockInfo {
    /// Block id string, e.g. `pc.ram`; 1..=255 bytes.
    pub name: String,
    /// Bytes migrated; a non-zero multiple of [`PAGE_SIZE`].
    pub used_length: u64,
}

impl RamBlockInfo {
    /// A block description.
    pub fn new(name: impl Into<String>, used_length: u64) -> Self {
        RamBlockInfo {
            name: name.into(),
            used_length,
        }
    }
}
