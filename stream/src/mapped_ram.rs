//! QEMU's mapped-ram file layout (QEMU ≥ 9.0, capability `mapped-ram`,
//! `migrate file:PATH`): reader, writer and the layout they share.
//!
//! Sources (facts only): QEMU's `docs/devel/migration/mapped-ram.rst` and the
//! mapped-ram parts of `migration/ram.c`, checked against a real file written
//! by QEMU 10.0.2 (`scripts/qemu-vectors/mapped_ram.py`; the committed
//! fixture `stream/tests/data/qemu10-mapped-ram.bin.zst`).
//!
//! # Layout
//!
//! The file is an ordinary migration stream whose `ram` section START gives
//! every page of every RAM block a fixed place in the file:
//!
//! ```text
//! QEVM, version 3, configuration section
//!     subsection "configuration/capabilities": be32 version 1, be32 count, names (holds "mapped-ram")
//! 0x01 START be32 id, "ram", be32 instance 0, be32 version 4
//!   be64 total | MEM_SIZE
//!   per block:
//!     u8 len + name, be64 used_length  [+ be64 address with x-ignore-shared]
//!     mapped-ram header (28 bytes, packed):
//!        be32 version (1), be64 page size (4096), be64 bitmap_offset, be64 pages_offset
//!     bitmap at bitmap_offset (= just after the header):
//!        ceil(pages / 64) host-endian u64 words, bit i of word w = page 64·w + i is in the file
//!     padding up to pages_offset = round_up(bitmap_offset + bitmap bytes, 1 MiB)
//!     pages: page p at pages_offset + p · 4096; pages whose bit is clear are
//!        never written (holes in a sparse file) and load as zero
//!   (the stream goes on at pages_offset + used_length)
//!   be64 EOS, FOOTER
//! 0x02 PART / 0x03 END of the ram section: be64 EOS (+ be64 MULTIFD_FLUSH 0x200 with multifd), FOOTER
//! 0x08 COMMAND sections (QEMU 10 writes SWITCHOVER_START), device FULL sections, EOF, VM description
//! ```
//!
//! The bitmap is written last by QEMU (after all pages), in the host's
//! `unsigned long` layout: this module reads and writes 64-bit words in this
//! machine's byte order, as QEMU on a 64-bit host of the same endianness does.
//!
//! # Reading untrusted files
//!
//! [`MappedRamFile::parse`] checks every field against the file size and the
//! [`Limits`] before using it: versions, page size, names, MEM_SIZE sums,
//! bitmap and page regions inside the file, 1 MiB alignment, regions in file
//! order without overlap, no bitmap bit past the block's last page. Errors are
//! [`Error::Format`] with the byte offset of the refused field; nothing is
//! allocated from an unchecked length.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::decoder::{Decoder, Item, Limits, SectionKind};
use crate::error::{Error, FormatError, WriteError};
use crate::format::*;
use xbzrle::Page;

/// `MAPPED_RAM_HDR_VERSION`: the only header version written and read.
pub const HEADER_VERSION: u32 = 1;
/// Bytes of the packed per-block mapped-ram header.
pub const HEADER_LEN: u64 = 28;
/// Alignment of every block's page region in the file (1 MiB).
pub const PAGES_ALIGNMENT: u64 = 1 << 20;
/// The migration capability that selects this layout.
pub const CAPABILITY: &str = "mapped-ram";
pub use crate::format::FLAG_MULTIFD_FLUSH;
/// Bytes of the prefix handed to the sans-IO [`Decoder`] to read the file
/// header, configuration and `ram` START header (all far smaller).
const PREFIX_PROBE: u64 = 64 * 1024;

/// Random-access input: a file, or bytes in memory.
pub trait ReadAt {
    /// Total length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails with `UnexpectedEof` past the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= self.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
}

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

/// The per-block mapped-ram header (QEMU's `MappedRamHeader`), big-endian on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRamHeader {
    /// Header version ([`HEADER_VERSION`]).
    pub version: u32,
    /// Target page size in bytes (4096).
    pub page_size: u64,
    /// File offset of the block's bitmap.
    pub bitmap_offset: u64,
    /// File offset of the block's first page (1 MiB-aligned).
    pub pages_offset: u64,
}

impl MappedRamHeader {
    /// The 28 bytes on disk.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..4].copy_from_slice(&self.version.to_be_bytes());
        b[4..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..20].copy_from_slice(&self.bitmap_offset.to_be_bytes());
        b[20..28].copy_from_slice(&self.pages_offset.to_be_bytes());
        b
    }

    /// Parses the 28 bytes on disk (no checks; see [`MappedRamFile::parse`]).
    pub fn from_bytes(b: &[u8; HEADER_LEN as usize]) -> Self {
        let be64 = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[r]);
            u64::from_be_bytes(a)
        };
        MappedRamHeader {
            version: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            page_size: be64(4..12),
            bitmap_offset: be64(12..20),
            pages_offset: be64(20..28),
        }
    }
}

/// Bytes of the bitmap of a block of `used_length` bytes: one bit per page,
/// rounded up to whole 64-bit words (QEMU's `BITS_TO_LONGS(pages) * sizeof(long)`
/// on a 64-bit host).
pub fn bitmap_bytes(used_length: u64) -> u64 {
    (used_length / PAGE_SIZE as u64).div_ceil(64) * 8
}

/// Rounds `x` up to a multiple of [`PAGES_ALIGNMENT`] (`None` on overflow).
fn align_up(x: u64) -> Option<u64> {
    x.checked_add(PAGES_ALIGNMENT - 1)
        .map(|v| v & !(PAGES_ALIGNMENT - 1))
}

/// One RAM block of a mapped-ram file: name, length, header and bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedRamBlock {
    /// Name and used length from MEM_SIZE.
    pub info: RamBlockInfo,
    /// File offset of the block's mapped-ram header.
    pub header_offset: u64,
    /// The header (checked).
    pub header: MappedRamHeader,
    /// The bitmap words (host order), `ceil(pages / 64)` of them.
    pub bitmap: Vec<u64>,
}

impl MappedRamBlock {
    /// Pages in the block (`used_length / 4096`).
    pub fn pages(&self) -> u64 {
        self.info.used_length / PAGE_SIZE as u64
    }

    /// Whether page `page` (index in the block) has data in the file; a page
    /// out of range or not in the file (a hole) is zero.
    pub fn is_present(&self, page: u64) -> bool {
        page < self.pages()
            && self
                .bitmap
                .get((page / 64) as usize)
                .is_some_and(|w| w >> (page % 64) & 1 == 1)
    }

    /// Number of pages with data in the file.
    pub fn present_pages(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// File offset of page `page`'s data (whether or not it is present).
    pub fn page_file_offset(&self, page: u64) -> u64 {
        self.header.pages_offset + page * PAGE_SIZE as u64
    }
}

/// A FULL section after the RAM: one of ours (`precopy/...`, payload read)
/// or a device section we cannot parse (reading stops there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailSection {
    /// File offset of the section type byte.
    pub offset: u64,
    /// Id string.
    pub name: String,
    /// Instance id.
    pub instance_id: u32,
    /// Version id.
    pub version_id: u32,
    /// Payload of one of our sections; `None` for a foreign (QEMU device) section.
    pub payload: Option<Vec<u8>>,
}

/// A parsed, checked mapped-ram file (everything but the page data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedRamFile {
    /// File length in bytes.
    pub file_len: u64,
    /// Machine type of the configuration section.
    pub machine_type: String,
    /// Capabilities of the configuration section (holds `mapped-ram`).
    pub capabilities: Vec<String>,
    /// Section id of the `ram` section.
    pub ram_section_id: u32,
    /// The RAM blocks in MEM_SIZE order.
    pub blocks: Vec<MappedRamBlock>,
    /// File offset just past the last block's page region (the stream goes on there).
    pub ram_end: u64,
    /// Our device sections read after the RAM, then at most one foreign one
    /// (where reading stopped: its length is known only to QEMU's device code).
    pub sections: Vec<TailSection>,
    /// Whether EOF (0x00) was read (also after QEMU's device state, which is checked to
    /// run to EOF and a VM description: a file cut inside it is refused).
    pub saw_eof: bool,
    /// The VM description JSON after EOF, if any (QEMU's, or ours with the RAM digest).
    pub vm_description: Option<Vec<u8>>,
}

/// Reads and checks helper: a cursor over a [`ReadAt`] with the file size.
struct Rd<'s, R: ReadAt + ?Sized> {
    src: &'s R,
    len: u64,
    pos: u64,
}

impl<R: ReadAt + ?Sized> Rd<'_, R> {
    fn fmt(offset: u64, kind: FormatError) -> Error {
        Error::Format { offset, kind }
    }
    fn bytes(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
        let end = self.pos.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(Self::fmt(self.pos, FormatError::Truncated { what }));
        }
        self.src
            .read_exact_at(buf, self.pos)
            .map_err(|source| Error::Io {
                offset: self.pos,
                source,
            })?;
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        let mut b = [0u8; 1];
        self.bytes(&mut b, what)?;
        Ok(b[0])
    }
    fn be32(&mut self, what: &'static str) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        self.bytes(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }
    fn be64(&mut self, what: &'static str) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.bytes(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }
    fn name(&mut self, what: &'static str) -> Result<String, Error> {
        let at = self.pos;
        let n = self.u8(what)? as usize;
        let mut b = vec![0u8; n];
        self.bytes(&mut b, what)?;
        if b.is_empty() {
            return Err(Self::fmt(at, FormatError::BadName { what }));
        }
        String::from_utf8(b).map_err(|_| Self::fmt(at, FormatError::BadName { what }))
    }
}

impl MappedRamFile {
    /// Whether `src` looks like a mapped-ram file: a migration stream whose
    /// configuration lists the `mapped-ram` capability. Never fails: any error
    /// reading the prefix is "no".
    pub fn sniff<R: ReadAt + ?Sized>(src: &R) -> bool {
        read_prefix(src, &Limits::default()).is_ok_and(|p| p.mapped_ram)
    }

    /// Parses and checks the whole layout of `src` (not the page data).
    ///
    /// # Errors
    /// [`Error::Format`] naming what is wrong and its file offset:
    /// [`FormatError::NotMappedRam`] when the capability is absent,
    /// [`FormatError::MappedRam`] for a bad header, bitmap or region,
    /// [`FormatError::Truncated`], the MEM_SIZE errors of the stream reader;
    /// [`Error::Io`] when reading fails.
    pub fn parse<R: ReadAt + ?Sized>(src: &R, limits: &Limits) -> Result<Self, Error> {
        let prefix = read_prefix(src, limits)?;
        if !prefix.mapped_ram {
            return Err(Rd::<R>::fmt(
                prefix.mem_size_offset,
                FormatError::NotMappedRam,
            ));
        }
        let len = src
            .size()
            .map_err(|source| Error::Io { offset: 0, source })?;
        let ignore_shared = prefix.capabilities.iter().any(|c| c == "x-ignore-shared");
        let mut rd = Rd {
            src,
            len,
            pos: prefix.mem_size_offset,
        };
        let bad = |offset, why| Rd::<R>::fmt(offset, FormatError::MappedRam { why });

        // MEM_SIZE with a mapped-ram header after every block.
        let at = rd.pos;
        let head = rd.be64("MEM_SIZE record")?;
        if head & FLAGS_MASK != FLAG_MEM_SIZE {
            return Err(Rd::<R>::fmt(
                at,
                FormatError::BadFlags {
                    flags: head & FLAGS_MASK,
                },
            ));
        }
        let total = head & !FLAGS_MASK;
        if total > limits.max_ram_bytes {
            return Err(Rd::<R>::fmt(
                at,
                FormatError::RamTooLarge {
                    total,
                    limit: limits.max_ram_bytes,
                },
            ));
        }
        let mut blocks: Vec<MappedRamBlock> = Vec::new();
        let mut sum = 0u64;
        while sum < total {
            let block_at = rd.pos;
            if blocks.len() >= limits.max_blocks {
                return Err(Rd::<R>::fmt(
                    block_at,
                    FormatError::TooLong {
                        what: "MEM_SIZE block list",
                        len: blocks.len() as u64 + 1,
                        limit: limits.max_blocks as u64,
                    },
                ));
            }
            let name = rd.name("RAM block")?;
            let used_length = rd.be64("MEM_SIZE block")?;
            let mem_bad = |why| Rd::<R>::fmt(block_at, FormatError::BadMemSize { why });
            if used_length == 0 || used_length & FLAGS_MASK != 0 {
                return Err(mem_bad("zero or unaligned block length"));
            }
            sum = match sum.checked_add(used_length) {
                Some(s) if s <= total => s,
                _ => return Err(mem_bad("block lengths exceed the total")),
            };
            if blocks.iter().any(|b| b.info.name == name) {
                return Err(mem_bad("duplicate block name"));
            }
            if ignore_shared {
                rd.be64("MEM_SIZE block address")?;
            }
            let header_offset = rd.pos;
            let mut hb = [0u8; HEADER_LEN as usize];
            rd.bytes(&mut hb, "mapped-ram header")?;
            let header = MappedRamHeader::from_bytes(&hb);
            if header.version != HEADER_VERSION {
                return Err(bad(header_offset, "header version is not 1"));
            }
            if header.page_size != PAGE_SIZE as u64 {
                return Err(bad(header_offset + 4, "page size is not 4096"));
            }
            let bm_len = bitmap_bytes(used_length);
            if header.bitmap_offset < rd.pos {
                return Err(bad(
                    header_offset + 12,
                    "bitmap offset before the end of its header",
                ));
            }
            let bm_end = header
                .bitmap_offset
                .checked_add(bm_len)
                .filter(|&e| e <= len)
                .ok_or_else(|| bad(header_offset + 12, "bitmap past the end of the file"))?;
            if !header.pages_offset.is_multiple_of(PAGES_ALIGNMENT) {
                return Err(bad(header_offset + 20, "pages offset not 1 MiB-aligned"));
            }
            if header.pages_offset < bm_end {
                return Err(bad(header_offset + 20, "pages region overlaps the bitmap"));
            }
            let pages_end = header
                .pages_offset
                .checked_add(used_length)
                .filter(|&e| e <= len)
                .ok_or_else(|| bad(header_offset + 20, "pages region past the end of the file"))?;
            // The bitmap's size is now known to lie inside the file.
            let mut raw = vec![0u8; bm_len as usize];
            rd.src
                .read_exact_at(&mut raw, header.bitmap_offset)
                .map_err(|source| Error::Io {
                    offset: header.bitmap_offset,
                    source,
                })?;
            let bitmap: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().expect("8-byte chunk")))
                .collect();
            let pages = used_length / PAGE_SIZE as u64;
            if !pages.is_multiple_of(64) {
                let last = bitmap.last().copied().unwrap_or(0);
                if last >> (pages % 64) != 0 {
                    return Err(bad(
                        header.bitmap_offset + bm_len - 8,
                        "bitmap bit set past the block's last page",
                    ));
                }
            }
            blocks.push(MappedRamBlock {
                info: RamBlockInfo::new(name, used_length),
                header_offset,
                header,
                bitmap,
            });
            rd.pos = pages_end;
        }
        let ram_end = rd.pos;
        let mut file = MappedRamFile {
            file_len: len,
            machine_type: prefix.machine_type,
            capabilities: prefix.capabilities,
            ram_section_id: prefix.ram_section_id,
            blocks,
            ram_end,
            sections: Vec::new(),
            saw_eof: false,
            vm_description: None,
        };
        file.parse_tail(&mut rd, limits)?;
        Ok(file)
    }

    /// The rest of the stream: EOS of the START part, later ram parts (EOS
    /// only: every page is in the page regions), commands, device sections, EOF.
    fn parse_tail<R: ReadAt + ?Sized>(
        &mut self,
        rd: &mut Rd<'_, R>,
        limits: &Limits,
    ) -> Result<(), Error> {
        let id = self.ram_section_id;
        let mut ram_open = true;
        let mut ram_ended = false;
        loop {
            if ram_open {
                // ram records: only EOS (and MULTIFD_FLUSH) may appear here.
                let at = rd.pos;
                let h = rd.be64("ram record")?;
                match h {
                    FLAG_EOS => {
                        ram_open = false;
                        if rd.pos < rd.len {
                            let mut b = [0u8; 1];
                            rd.src
                                .read_exact_at(&mut b, rd.pos)
                                .map_err(|source| Error::Io {
                                    offset: rd.pos,
                                    source,
                                })?;
                            if b[0] == SECTION_FOOTER {
                                self.footer(rd, id)?;
                            }
                        }
                    }
                    FLAG_MULTIFD_FLUSH => {}
                    _ => {
                        return Err(Rd::<R>::fmt(
                            at,
                            FormatError::MappedRam {
                                why: "page record in the stream of a mapped-ram file",
                            },
                        ));
                    }
                }
                continue;
            }
            let at = rd.pos;
            match rd.u8("section header")? {
                kind @ (SECTION_PART | SECTION_END) => {
                    let sid = rd.be32("section header")?;
                    if sid != id || ram_ended {
                        return Err(Rd::<R>::fmt(at, FormatError::UnknownSectionId { id: sid }));
                    }
                    ram_open = true;
                    ram_ended = kind == SECTION_END;
                }
                COMMAND => {
                    // be16 command, be16 length, data.
                    let n = u64::from(rd.be32("command")? & 0xffff);
                    let end = rd
                        .pos
                        .checked_add(n)
                        .filter(|&e| e <= rd.len)
                        .ok_or_else(|| {
                            Rd::<R>::fmt(at, FormatError::Truncated { what: "command" })
                        })?;
                    rd.pos = end;
                }
                k @ (SECTION_FULL | SECTION_START) => {
                    let sid = rd.be32("section header")?;
                    let name = rd.name("section")?;
                    let instance_id = rd.be32("section header")?;
                    let version_id = rd.be32("section header")?;
                    if k == SECTION_FULL && name.starts_with(OUR_SECTION_PREFIX) {
                        let n = rd.be32("device state")? as usize;
                        if n > limits.max_device_state_bytes {
                            return Err(Rd::<R>::fmt(
                                rd.pos - 4,
                                FormatError::TooLong {
                                    what: "device state",
                                    len: n as u64,
                                    limit: limits.max_device_state_bytes as u64,
                                },
                            ));
                        }
                        if rd.pos.saturating_add(n as u64) > rd.len {
                            return Err(Rd::<R>::fmt(
                                rd.pos,
                                FormatError::Truncated {
                                    what: "device state",
                                },
                            ));
                        }
                        let mut payload = vec![0u8; n];
                        rd.bytes(&mut payload, "device state")?;
                        self.footer(rd, sid)?;
                        self.sections.push(TailSection {
                            offset: at,
                            name,
                            instance_id,
                            version_id,
                            payload: Some(payload),
                        });
                    } else {
                        self.sections.push(TailSection {
                            offset: at,
                            name,
                            instance_id,
                            version_id,
                            payload: None,
                        });
                        // QEMU's device state: the rest of the file must be its sections,
                        // EOF and (as QEMU writes) a VM description, or the file is torn.
                        let n = rd.len - at;
                        let max = limits
                            .max_device_state_bytes
                            .saturating_add(limits.max_vm_description_bytes)
                            as u64;
                        if n > max {
                            return Err(Rd::<R>::fmt(
                                at,
                                FormatError::TooLong {
                                    what: "device state and VM description",
                                    len: n,
                                    limit: max,
                                },
                            ));
                        }
                        rd.pos = at;
                        let mut tail = vec![0u8; n as usize];
                        rd.bytes(&mut tail, "device state")?;
                        let (_, vmdesc) = crate::foreign::split_device_state(at, &tail)?;
                        self.saw_eof = true;
                        self.vm_description = vmdesc.map(<[u8]>::to_vec);
                        return Ok(());
                    }
                }
                SECTION_EOF => {
                    if !ram_ended {
                        return Err(Rd::<R>::fmt(
                            at,
                            FormatError::Unexpected {
                                what: "EOF before the ram END section",
                            },
                        ));
                    }
                    self.saw_eof = true;
                    // An optional VM description may follow.
                    if rd.pos < rd.len {
                        let vd_at = rd.pos;
                        if rd.u8("VM description")? != VM_DESCRIPTION {
                            return Err(Rd::<R>::fmt(vd_at, FormatError::TrailingData));
                        }
                        let n = rd.be32("VM description")? as usize;
                        if n > limits.max_vm_description_bytes {
                            return Err(Rd::<R>::fmt(
                                vd_at,
                                FormatError::TooLong {
                                    what: "VM description",
                                    len: n as u64,
                                    limit: limits.max_vm_description_bytes as u64,
                                },
                            ));
                        }
                        if rd.pos.saturating_add(n as u64) > rd.len {
                            return Err(Rd::<R>::fmt(
                                vd_at,
                                FormatError::Truncated {
                                    what: "VM description",
                                },
                            ));
                        }
                        let mut json = vec![0u8; n];
                        rd.bytes(&mut json, "VM description")?;
                        if rd.pos != rd.len {
                            return Err(Rd::<R>::fmt(rd.pos, FormatError::TrailingData));
                        }
                        self.vm_description = Some(json);
                    }
                    return Ok(());
                }
                byte => {
                    return Err(Rd::<R>::fmt(at, FormatError::UnknownSectionType { byte }));
                }
            }
        }
    }

    fn footer<R: ReadAt + ?Sized>(&self, rd: &mut Rd<'_, R>, id: u32) -> Result<(), Error> {
        let at = rd.pos;
        if rd.u8("section footer")? != SECTION_FOOTER {
            return Err(Rd::<R>::fmt(
                at,
                FormatError::Unexpected {
                    what: "missing section footer",
                },
            ));
        }
        let found = rd.be32("section footer")?;
        if found != id {
            return Err(Rd::<R>::fmt(
                at,
                FormatError::FooterMismatch {
                    expected: id,
                    found,
                },
            ));
        }
        Ok(())
    }

    /// Total RAM bytes (sum of the blocks' used lengths).
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.info.used_length).sum()
    }

    /// The MEM_SIZE block list.
    pub fn block_infos(&self) -> Vec<RamBlockInfo> {
        self.blocks.iter().map(|b| b.info.clone()).collect()
    }

    /// Reads block `block` into `out` (its used length in bytes): present
    /// pages from the file, holes as zeros. Reads runs of present pages in
    /// one positional read each.
    ///
    /// # Errors
    /// As [`MappedRamFile::read_pages`].
    pub fn read_block<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        block: usize,
        out: &mut [u8],
    ) -> Result<(), Error> {
        let len = self.blocks.get(block).map_or(0, |b| b.info.used_length);
        if out.len() as u64 != len {
            return Err(Error::Format {
                offset: 0,
                kind: FormatError::Unexpected {
                    what: "output buffer length differs from the block length",
                },
            });
        }
        self.read_pages(src, block, 0, out)
    }

    /// Reads `out.len() / 4096` pages of block `block` from page index
    /// `first`: present pages from the file (runs in one positional read
    /// each), holes as zeros.
    ///
    /// # Errors
    /// [`Error::Io`]; a block index out of range, an `out` that is not whole
    /// pages or passes the block's end: [`FormatError::Unexpected`].
    pub fn read_pages<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        block: usize,
        first: u64,
        out: &mut [u8],
    ) -> Result<(), Error> {
        let unexpected = |what| Error::Format {
            offset: 0,
            kind: FormatError::Unexpected { what },
        };
        let b = self
            .blocks
            .get(block)
            .ok_or_else(|| unexpected("block index out of range"))?;
        let ps = PAGE_SIZE as u64;
        let n = out.len() as u64 / ps;
        if !out.len().is_multiple_of(PAGE_SIZE)
            || first.checked_add(n).is_none_or(|e| e > b.pages())
        {
            return Err(unexpected("page range outside the block"));
        }
        let end = first + n;
        let at = |p: u64| ((p - first) * ps) as usize;
        let mut p = first;
        while p < end {
            if !b.is_present(p) {
                let q = (p..end).find(|&q| b.is_present(q)).unwrap_or(end);
                out[at(p)..at(q)].fill(0);
                p = q;
                continue;
            }
            let q = (p..end).find(|&q| !b.is_present(q)).unwrap_or(end);
            let off = b.page_file_offset(p);
            src.read_exact_at(&mut out[at(p)..at(q)], off)
                .map_err(|source| Error::Io {
                    offset: off,
                    source,
                })?;
            p = q;
        }
        Ok(())
    }

    /// SHA-256-ready walk: calls `f` with successive chunks (at most 1 MiB)
    /// of block `block`'s content, holes as zeros, without holding the whole
    /// block in memory.
    ///
    /// # Errors
    /// As [`MappedRamFile::read_pages`].
    pub fn for_each_chunk<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        block: usize,
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), Error> {
        let pages = self.blocks.get(block).map_or(0, |b| b.pages());
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        let mut p = 0;
        while p < pages {
            let n = (pages - p).min(256);
            let chunk = &mut buf[..n as usize * PAGE_SIZE];
            self.read_pages(src, block, p, chunk)?;
            f(chunk);
            p += n;
        }
        Ok(())
    }
}

/// What the sans-IO decoder tells of the prefix.
struct Prefix {
    machine_type: String,
    capabilities: Vec<String>,
    mapped_ram: bool,
    ram_section_id: u32,
    mem_size_offset: u64,
}

/// Decodes file header, configuration and the `ram` START header with the
/// stream crate's [`Decoder`], from the first [`PREFIX_PROBE`] bytes.
fn read_prefix<R: ReadAt + ?Sized>(src: &R, limits: &Limits) -> Result<Prefix, Error> {
    let len = src
        .size()
        .map_err(|source| Error::Io { offset: 0, source })?;
    let n = len.min(PREFIX_PROBE) as usize;
    let mut buf = vec![0u8; n];
    src.read_exact_at(&mut buf, 0)
        .map_err(|source| Error::Io { offset: 0, source })?;
    let mut dec = Decoder::new(*limits);
    let mut pos = 0usize;
    let mut machine_type = String::new();
    let mut capabilities = Vec::new();
    loop {
        match dec.decode(&buf[pos..])? {
            None => {
                return Err(Error::Format {
                    offset: pos as u64,
                    kind: FormatError::Truncated {
                        what: "stream prefix before the ram section",
                    },
                });
            }
            Some((item, used)) => {
                let at = pos as u64;
                pos += used;
                match item {
                    Item::FileHeader { .. } => {}
                    Item::Configuration(c) => {
                        machine_type = c.machine_type.to_owned();
                        capabilities = c.capabilities.iter().map(|s| (*s).to_owned()).collect();
                    }
                    Item::Section(h)
                        if h.kind == SectionKind::Start && h.name == RAM_SECTION_NAME =>
                    {
                        let mapped_ram = capabilities.iter().any(|c| c == CAPABILITY);
                        return Ok(Prefix {
                            machine_type,
                            capabilities,
                            mapped_ram,
                            ram_section_id: h.section_id,
                            mem_size_offset: pos as u64,
                        });
                    }
                    _ => {
                        return Err(Error::Format {
                            offset: at,
                            kind: FormatError::Unexpected {
                                what: "section before the ram START section",
                            },
                        });
                    }
                }
            }
        }
    }
}

/// Where each block goes in a mapped-ram file, and the stream bytes around
/// the page regions. Computed by [`Layout::new`]; used by [`MappedRamWriter`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Blocks with their headers, in MEM_SIZE order.
    pub blocks: Vec<(RamBlockInfo, MappedRamHeader)>,
    /// Stream bytes and the file offsets where they go (before each page region).
    pub pieces: Vec<(u64, Vec<u8>)>,
    /// Offset past the last page region: the stream goes on here.
    pub ram_end: u64,
    /// Section id of the `ram` section.
    pub ram_section_id: u32,
}

impl Layout {
    /// The layout QEMU would give `blocks` for machine type `machine_type`:
    /// header and configuration (with the `mapped-ram` capability), the ram
    /// START with MEM_SIZE and every block's header, bitmap just after its
    /// header, pages at the next 1 MiB boundary.
    ///
    /// # Errors
    /// [`WriteError::BadName`] (machine or block name empty or > 255 bytes),
    /// [`WriteError::BadBlocks`] (no blocks, zero or unaligned length,
    /// duplicate name, sizes that overflow).
    pub fn new(machine_type: &str, blocks: &[RamBlockInfo]) -> Result<Self, WriteError> {
        Self::with_ram_section_id(machine_type, blocks, 0)
    }

    /// As [`Layout::new`], with the `ram` section given id `ram_section_id` (QEMU numbers
    /// its sections by registration order; a stream tail taken from QEMU refers to its id).
    ///
    /// # Errors
    /// As [`Layout::new`].
    pub fn with_ram_section_id(
        machine_type: &str,
        blocks: &[RamBlockInfo],
        ram_section_id: u32,
    ) -> Result<Self, WriteError> {
        crate::encoder::check_name("machine type", machine_type)?;
        if blocks.is_empty() {
            return Err(WriteError::BadBlocks { why: "no blocks" });
        }
        let mut head = Vec::new();
        head.extend_from_slice(&FILE_MAGIC.to_be_bytes());
        head.extend_from_slice(&FILE_VERSION.to_be_bytes());
        head.push(CONFIGURATION);
        head.extend_from_slice(&(machine_type.len() as u32).to_be_bytes());
        head.extend_from_slice(machine_type.as_bytes());
        head.push(SUBSECTION);
        let sub = "configuration/capabilities";
        head.push(sub.len() as u8);
        head.extend_from_slice(sub.as_bytes());
        head.extend_from_slice(&1u32.to_be_bytes());
        head.extend_from_slice(&1u32.to_be_bytes());
        head.push(CAPABILITY.len() as u8);
        head.extend_from_slice(CAPABILITY.as_bytes());
        head.push(SECTION_START);
        head.extend_from_slice(&ram_section_id.to_be_bytes());
        head.push(RAM_SECTION_NAME.len() as u8);
        head.extend_from_slice(RAM_SECTION_NAME.as_bytes());
        head.extend_from_slice(&0u32.to_be_bytes());
        head.extend_from_slice(&RAM_SECTION_VERSION.to_be_bytes());
        let total = crate::encoder::check_ram_blocks(blocks)?;
        head.extend_from_slice(&(total | FLAG_MEM_SIZE).to_be_bytes());
        let overflow = || WriteError::BadBlocks {
            why: "file offsets overflow",
        };
        let mut pieces = Vec::new();
        let mut out_blocks = Vec::new();
        let mut start = 0u64;
        let mut piece = head;
        for b in blocks {
            piece.push(b.name.len() as u8);
            piece.extend_from_slice(b.name.as_bytes());
            piece.extend_from_slice(&b.used_length.to_be_bytes());
            let bitmap_offset = start + piece.len() as u64 + HEADER_LEN;
            let pages_offset = bitmap_offset
                .checked_add(bitmap_bytes(b.used_length))
                .and_then(align_up)
                .ok_or_else(overflow)?;
            let header = MappedRamHeader {
                version: HEADER_VERSION,
                page_size: PAGE_SIZE as u64,
                bitmap_offset,
                pages_offset,
            };
            piece.extend_from_slice(&header.to_bytes());
            pieces.push((start, std::mem::take(&mut piece)));
            out_blocks.push((b.clone(), header));
            start = pages_offset
                .checked_add(b.used_length)
                .ok_or_else(overflow)?;
        }
        Ok(Layout {
            blocks: out_blocks,
            pieces,
            ram_end: start,
            ram_section_id,
        })
    }

    /// The stream bytes after the RAM: EOS + footer closing the START, an
    /// END with EOS + footer, our `precopy/` device sections
    /// (`(name, instance, version, payload)`), EOF.
    ///
    /// # Errors
    /// [`WriteError::BadName`] for a section name without the `precopy/`
    /// prefix or too long; [`WriteError::TooLong`] for a payload ≥ 4 GiB.
    pub fn tail(&self, sections: &[(&str, u32, u32, &[u8])]) -> Result<Vec<u8>, WriteError> {
        let id = self.ram_section_id;
        let mut t = Vec::new();
        t.extend_from_slice(&FLAG_EOS.to_be_bytes());
        t.push(SECTION_FOOTER);
        t.extend_from_slice(&id.to_be_bytes());
        t.push(SECTION_END);
        t.extend_from_slice(&id.to_be_bytes());
        t.extend_from_slice(&FLAG_EOS.to_be_bytes());
        t.push(SECTION_FOOTER);
        t.extend_from_slice(&id.to_be_bytes());
        for (i, (name, instance, version, payload)) in sections.iter().enumerate() {
            if !name.starts_with(OUR_SECTION_PREFIX) || name.len() > MAX_NAME_LEN {
                return Err(WriteError::BadName {
                    what: "device section",
                    name: (*name).to_owned(),
                    why: "must start with \"precopy/\" and be at most 255 bytes",
                });
            }
            let len = u32::try_from(payload.len()).map_err(|_| WriteError::TooLong {
                what: "device state",
                len: payload.len() as u64,
                limit: u32::MAX.into(),
            })?;
            let sid = id + 1 + i as u32;
            t.push(SECTION_FULL);
            t.extend_from_slice(&sid.to_be_bytes());
            t.push(name.len() as u8);
            t.extend_from_slice(name.as_bytes());
            t.extend_from_slice(&instance.to_be_bytes());
            t.extend_from_slice(&version.to_be_bytes());
            t.extend_from_slice(&len.to_be_bytes());
            t.extend_from_slice(payload);
            t.push(SECTION_FOOTER);
            t.extend_from_slice(&sid.to_be_bytes());
        }
        t.push(SECTION_EOF);
        Ok(t)
    }
}

/// Writes a mapped-ram file with positional writes: pages may be written in
/// any order, from several threads at once (`&self`), and again (a page
/// written twice keeps its place). Zero pages are not written: they stay
/// holes of the sparse file. [`MappedRamWriter::finish`] writes the bitmaps
/// and the stream tail, sets the length and fsyncs.
pub struct MappedRamWriter<'f> {
    file: &'f File,
    layout: Layout,
    bitmaps: Vec<Vec<AtomicU64>>,
}

fn wio(source: io::Error) -> WriteError {
    WriteError::Io { written: 0, source }
}

impl<'f> MappedRamWriter<'f> {
    /// Starts a file: truncates `file` to 0 and writes the stream prefix and
    /// every block header (see [`Layout::new`]).
    ///
    /// # Errors
    /// The errors of [`Layout::new`]; [`WriteError::Io`].
    pub fn new(
        file: &'f File,
        machine_type: &str,
        blocks: &[RamBlockInfo],
    ) -> Result<Self, WriteError> {
        Self::with_layout(file, Layout::new(machine_type, blocks)?)
    }

    /// Starts a file with a given layout (see [`Layout::with_ram_section_id`]).
    ///
    /// # Errors
    /// [`WriteError::Io`].
    pub fn with_layout(file: &'f File, layout: Layout) -> Result<Self, WriteError> {
        file.set_len(0).map_err(wio)?;
        for (off, bytes) in &layout.pieces {
            file.write_all_at(bytes, *off).map_err(wio)?;
        }
        let bitmaps = layout
            .blocks
            .iter()
            .map(|(b, _)| {
                (0..bitmap_bytes(b.used_length) / 8)
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        Ok(MappedRamWriter {
            file,
            layout,
            bitmaps,
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn check(&self, block: usize, offset: u64) -> Result<&MappedRamHeader, WriteError> {
        let (info, header) = self
            .layout
            .blocks
            .get(block)
            .ok_or(WriteError::NoSuchBlock { block })?;
        if offset & FLAGS_MASK != 0 || offset >= info.used_length {
            return Err(WriteError::BadOffset {
                block,
                offset,
                length: info.used_length,
            });
        }
        Ok(header)
    }

    /// Writes the page at byte `offset` of block `block` (`data` = 4096
    /// bytes), or records it as zero when every byte is 0 (no write; if it
    /// had been written before, its bit is cleared so it loads as zero).
    /// Returns whether data was written.
    ///
    /// # Errors
    /// [`WriteError::NoSuchBlock`], [`WriteError::BadOffset`], [`WriteError::Io`].
    pub fn write_page(&self, block: usize, offset: u64, data: &Page) -> Result<bool, WriteError> {
        let header = self.check(block, offset)?;
        let page = offset / PAGE_SIZE as u64;
        let word = &self.bitmaps[block][(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        if xbzrle::is_zero(data) {
            word.fetch_and(!bit, Ordering::Relaxed);
            return Ok(false);
        }
        self.file
            .write_all_at(data, header.pages_offset + offset)
            .map_err(wio)?;
        word.fetch_or(bit, Ordering::Relaxed);
        Ok(true)
    }

    /// Writes a run of whole pages of block `block` starting at byte
    /// `offset` (`data.len()` a multiple of 4096): zero pages are skipped,
    /// each run of non-zero pages is one positional write. Returns the number
    /// of pages written.
    ///
    /// # Errors
    /// As [`MappedRamWriter::write_page`]; a length not a multiple of 4096 or
    /// past the block is [`WriteError::BadOffset`].
    pub fn write_pages(&self, block: usize, offset: u64, data: &[u8]) -> Result<u64, WriteError> {
        let header = *self.check(block, offset)?;
        let ps = PAGE_SIZE;
        let length = self.layout.blocks[block].0.used_length;
        if !data.len().is_multiple_of(ps)
            || offset
                .checked_add(data.len() as u64)
                .is_none_or(|e| e > length)
        {
            return Err(WriteError::BadOffset {
                block,
                offset: offset.saturating_add(data.len() as u64),
                length,
            });
        }
        let n = data.len() / ps;
        let page0 = offset / ps as u64;
        let zero: Vec<bool> = data.chunks_exact(ps).map(xbzrle::is_zero).collect();
        let mut written = 0;
        let mut i = 0;
        while i < n {
            let run_zero = zero[i];
            let j = (i..n).find(|&j| zero[j] != run_zero).unwrap_or(n);
            if !run_zero {
                self.file
                    .write_all_at(
                        &data[i * ps..j * ps],
                        header.pages_offset + offset + (i * ps) as u64,
                    )
                    .map_err(wio)?;
                written += (j - i) as u64;
            }
            for k in i..j {
                let page = page0 + k as u64;
                let word = &self.bitmaps[block][(page / 64) as usize];
                let bit = 1u64 << (page % 64);
                if run_zero {
                    word.fetch_and(!bit, Ordering::Relaxed);
                } else {
                    word.fetch_or(bit, Ordering::Relaxed);
                }
            }
            i = j;
        }
        Ok(written)
    }

    /// Writes the bitmaps and the stream tail (see [`Layout::tail`]), sets
    /// the file length and fsyncs. Returns the file length.
    ///
    /// # Errors
    /// The errors of [`Layout::tail`]; [`WriteError::Io`].
    pub fn finish(self, sections: &[(&str, u32, u32, &[u8])]) -> Result<u64, WriteError> {
        let tail = self.layout.tail(sections)?;
        self.finish_with_tail(&tail)
    }

    /// Writes the bitmaps, then `tail` as the stream bytes after the page regions (e.g.
    /// the bytes QEMU wrote after its RAM: EOS, ram PART/END, device sections, EOF, VM
    /// description), sets the file length and fsyncs. Returns the file length.
    ///
    /// # Errors
    /// [`WriteError::Io`].
    pub fn finish_with_tail(self, tail: &[u8]) -> Result<u64, WriteError> {
        for ((_, header), words) in self.layout.blocks.iter().zip(&self.bitmaps) {
            let mut raw = Vec::with_capacity(words.len() * 8);
            for w in words {
                raw.extend_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
            }
            self.file
                .write_all_at(&raw, header.bitmap_offset)
                .map_err(wio)?;
        }
        self.file
            .write_all_at(tail, self.layout.ram_end)
            .map_err(wio)?;
        let len = self.layout.ram_end + tail.len() as u64;
        self.file.set_len(len).map_err(wio)?;
        self.file.sync_all().map_err(wio)?;
        Ok(len)
    }
}

/// Appends the VM description (0x06, be32 length, `json`) at the end of a
/// finished mapped-ram file (after its EOF, as QEMU places it), then fsyncs.
/// Returns the new file length.
///
/// # Errors
/// [`WriteError::TooLong`] for a JSON ≥ 4 GiB; [`WriteError::Io`].
pub fn append_vm_description(file: &File, json: &[u8]) -> Result<u64, WriteError> {
    let len = u32::try_from(json.len()).map_err(|_| WriteError::TooLong {
        what: "VM description",
        len: json.len() as u64,
        limit: u32::MAX.into(),
    })?;
    let end = file.metadata().map_err(wio)?.len();
    let mut b = Vec::with_capacity(json.len() + 5);
    b.push(VM_DESCRIPTION);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(json);
    file.write_all_at(&b, end).map_err(wio)?;
    file.sync_all().map_err(wio)?;
    Ok(end + b.len() as u64)
}
