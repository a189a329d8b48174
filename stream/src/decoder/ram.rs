//! The `ram` section's records: MEM_SIZE, the page records (ZERO, PAGE,
//! XBZRLE, COMPRESS_PAGE, and our COMPRESSED), HOOK and EOS.

use super::cursor::{Cur, P, Pr, bad};
use super::{Decoder, Item, State};
use crate::error::FormatError;
use crate::format::*;
use xbzrle::Page;

/// One `ram` section record. Page records name their block by index into
/// the MEM_SIZE list ([`Decoder::blocks`]); `offset` is the page's byte
/// offset in that block (page-aligned, checked to lie inside it); `named` is
/// true when the block name was on the wire (CONTINUE not set).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RamRecord<'a> {
    /// `MEM_SIZE`: total RAM bytes and the block list.
    MemSize {
        /// Total bytes (sum of the blocks' used lengths).
        total: u64,
        /// The blocks, in stream order.
        blocks: Vec<RamBlockInfo>,
    },
    /// `ZERO`: the page is all `fill` (always 0; other fills are refused).
    Zero {
        /// Block index.
        block: usize,
        /// Byte offset in the block.
        offset: u64,
        /// Fill byte.
        fill: u8,
        /// Block name present on the wire.
        named: bool,
    },
    /// `PAGE`: the raw page.
    Page {
        /// Block index.
        block: usize,
        /// Byte offset in the block.
        offset: u64,
        /// Page contents.
        data: &'a Page,
        /// Block name present on the wire.
        named: bool,
    },
    /// `XBZRLE`: a delta (≤ 4096 bytes) to apply onto the destination's page.
    Xbzrle {
        /// Block index.
        block: usize,
        /// Byte offset in the block.
        offset: u64,
        /// The encoded delta.
        delta: &'a [u8],
        /// Block name present on the wire.
        named: bool,
    },
    /// `COMPRESS_PAGE`: a zlib-compressed page (≤ 4110 bytes); framing only.
    CompressedPage {
        /// Block index.
        block: usize,
        /// Byte offset in the block.
        offset: u64,
        /// zlib data.
        data: &'a [u8],
        /// Block name present on the wire.
        named: bool,
    },
    /// Our compressed-page record (`FLAG_COMPRESSED`, see
    /// [`format`](crate::format)): a zstd or zlib frame of one page.
    Compressed {
        /// Block index.
        block: usize,
        /// Byte offset in the block.
        offset: u64,
        /// Method of the frame (zstd or zlib).
        method: precopy_compress::Method,
        /// The frame, 1..=4096 bytes (not yet checked to inflate to a page).
        frame: &'a [u8],
        /// Block name present on the wire.
        named: bool,
    },
    /// `MULTIFD_FLUSH`: a multifd sync point (no payload). `seq` is the header's
    /// offset bits shifted down by 12: 0 from QEMU, the sync number in our multifd
    /// streams ([`multifd`](crate::multifd)).
    MultifdFlush {
        /// Sync number (0 from QEMU).
        seq: u64,
    },
    /// `HOOK`: an RDMA hook point (no data in the stream).
    Hook,
    /// `EOS`: end of the section's content.
    Eos,
}

impl Decoder {
    /// One `ram` record: dispatches on the header's flags.
    pub(super) fn parse_ram<'a>(&mut self, input: &'a [u8]) -> Pr<(Item<'a>, usize)> {
        let mut c = Cur::new(input, "ram record");
        let header = c.be64()?;
        let flags = header & FLAGS_MASK;
        let addr = header & !FLAGS_MASK;
        let cont = flags & FLAG_CONTINUE != 0;
        let base = flags & !FLAG_CONTINUE;
        let rec = match base {
            FLAG_MEM_SIZE if !cont && self.channel => {
                return bad(FormatError::Multifd {
                    why: "MEM_SIZE on a multifd channel (only the main channel carries it)",
                });
            }
            FLAG_MEM_SIZE if !cont => self.parse_mem_size(&mut c, addr)?,
            FLAG_EOS if !cont && self.channel => {
                // The end of a multifd channel: nothing may follow.
                self.state = State::Done;
                RamRecord::Eos
            }
            FLAG_EOS if !cont => {
                let id = self.ram.map(|r| r.id).unwrap_or(0);
                self.pending_footer = Some(id);
                self.state = State::Top;
                RamRecord::Eos
            }
            FLAG_HOOK if !cont => RamRecord::Hook,
            FLAG_MULTIFD_FLUSH if !cont => RamRecord::MultifdFlush { seq: addr >> 12 },
            FLAG_ZERO | FLAG_PAGE | FLAG_XBZRLE | FLAG_COMPRESS_PAGE | FLAG_COMPRESSED => {
                self.parse_page_record(&mut c, base, addr, cont)?
            }
            _ => return bad(FormatError::BadFlags { flags }),
        };
        Ok((Item::Ram(rec), c.pos))
    }

    /// A page record of kind `base` (without CONTINUE) for the page at
    /// `offset`: its block (named, or the previous one with CONTINUE),
    /// checked to hold the page, then the kind's body.
    fn parse_page_record<'a>(
        &mut self,
        c: &mut Cur<'a>,
        base: u64,
        offset: u64,
        cont: bool,
    ) -> Pr<RamRecord<'a>> {
        c.what = match base {
            FLAG_ZERO => "ZERO record",
            FLAG_PAGE => "PAGE record",
            FLAG_XBZRLE => "XBZRLE record",
            FLAG_COMPRESSED => "COMPRESSED record",
            _ => "COMPRESS_PAGE record",
        };
        if !self.mem_size_seen {
            return bad(FormatError::RecordBeforeMemSize);
        }
        let block = self.parse_record_block(c, cont)?;
        let info = &self.blocks[block];
        if offset >= info.used_length || info.used_length - offset < PAGE_SIZE as u64 {
            return bad(FormatError::PageOutsideBlock {
                block: info.name.clone(),
                offset,
                length: info.used_length,
            });
        }
        let named = !cont;
        let rec = match base {
            FLAG_ZERO => zero_record(c, block, offset, named)?,
            FLAG_PAGE => page_record(c, block, offset, named)?,
            FLAG_XBZRLE => xbzrle_record(c, block, offset, named)?,
            FLAG_COMPRESSED => compressed_record(c, block, offset, named)?,
            _ => zlib_record(c, block, offset, named)?,
        };
        self.last_block = Some(block);
        Ok(rec)
    }

    /// The block index of a page record: the previous record's with
    /// CONTINUE, else the one named by `u8 len + name`.
    fn parse_record_block(&self, c: &mut Cur<'_>, cont: bool) -> Pr<usize> {
        if cont {
            return self
                .last_block
                .ok_or(P::Bad(FormatError::ContinueWithoutBlock));
        }
        let len = c.u8()? as usize;
        let raw = c.bytes(len)?;
        self.blocks
            .iter()
            .position(|b| b.name.as_bytes() == raw)
            .ok_or_else(|| {
                P::Bad(FormatError::UnknownBlock {
                    name: String::from_utf8_lossy(raw).into_owned(),
                })
            })
    }

    fn parse_mem_size<'a>(&mut self, c: &mut Cur<'a>, total: u64) -> Pr<RamRecord<'a>> {
        c.what = "MEM_SIZE record";
        if self.mem_size_seen {
            return bad(FormatError::DuplicateMemSize);
        }
        if total > self.limits.max_ram_bytes {
            return bad(FormatError::RamTooLarge {
                total,
                limit: self.limits.max_ram_bytes,
            });
        }
        let mut blocks: Vec<RamBlockInfo> = Vec::new();
        let mut remaining = total;
        while remaining > 0 {
            if blocks.len() >= self.limits.max_blocks {
                return bad(FormatError::TooLong {
                    what: "MEM_SIZE block count",
                    len: blocks.len() as u64 + 1,
                    limit: self.limits.max_blocks as u64,
                });
            }
            let name = c.name("RAM block")?;
            let used_length = c.be64()?;
            if self.ignore_shared {
                let _mr_addr = c.be64()?;
            }
            if used_length == 0 || !used_length.is_multiple_of(PAGE_SIZE as u64) {
                return bad(FormatError::BadMemSize {
                    why: "block length zero or not a multiple of the page size",
                });
            }
            if used_length > remaining {
                return bad(FormatError::BadMemSize {
                    why: "block lengths exceed the total",
                });
            }
            if blocks.iter().any(|b| b.name == name) {
                return bad(FormatError::BadMemSize {
                    why: "duplicate block name",
                });
            }
            remaining -= used_length;
            blocks.push(RamBlockInfo::new(name, used_length));
        }
        self.blocks = blocks.clone();
        self.mem_size_seen = true;
        Ok(RamRecord::MemSize { total, blocks })
    }
}

/// ZERO body: one fill byte, which must be 0.
fn zero_record<'a>(c: &mut Cur<'a>, block: usize, offset: u64, named: bool) -> Pr<RamRecord<'a>> {
    let fill = c.u8()?;
    if fill != 0 {
        return bad(FormatError::NonZeroFill { fill });
    }
    Ok(RamRecord::Zero {
        block,
        offset,
        fill,
        named,
    })
}

/// PAGE body: the 4096 page bytes.
fn page_record<'a>(c: &mut Cur<'a>, block: usize, offset: u64, named: bool) -> Pr<RamRecord<'a>> {
    let data: &Page = c
        .bytes(PAGE_SIZE)?
        .try_into()
        .or(Err(P::Incomplete("PAGE record")))?;
    Ok(RamRecord::Page {
        block,
        offset,
        data,
        named,
    })
}

/// XBZRLE body: encoding byte 0x01, be16 length ≤ 4096, the delta.
fn xbzrle_record<'a>(c: &mut Cur<'a>, block: usize, offset: u64, named: bool) -> Pr<RamRecord<'a>> {
    let enc = c.u8()?;
    if enc != ENCODING_XBZRLE {
        return bad(FormatError::BadXbzrleEncoding { byte: enc });
    }
    let len = c.be16()? as usize;
    Ok(RamRecord::Xbzrle {
        block,
        offset,
        delta: bounded_bytes(c, len, PAGE_SIZE, "XBZRLE delta")?,
        named,
    })
}

/// Our COMPRESSED body: u8 method (known), be16 length 1..=4096, the frame.
fn compressed_record<'a>(
    c: &mut Cur<'a>,
    block: usize,
    offset: u64,
    named: bool,
) -> Pr<RamRecord<'a>> {
    let byte = c.u8()?;
    let method = precopy_compress::Method::from_wire_id(byte)
        .map_err(|_| P::Bad(FormatError::UnknownPageCompression { byte }))?;
    let len = c.be16()? as usize;
    if len == 0 {
        return bad(FormatError::PageCompression(
            precopy_compress::DecompressError::TooShort { method, len: 0 },
        ));
    }
    Ok(RamRecord::Compressed {
        block,
        offset,
        method,
        frame: bounded_bytes(c, len, MAX_COMPRESSED_FRAME, "compressed page frame")?,
        named,
    })
}

/// COMPRESS_PAGE body: be32 length ≤ 4110, the zlib data (framing only).
fn zlib_record<'a>(c: &mut Cur<'a>, block: usize, offset: u64, named: bool) -> Pr<RamRecord<'a>> {
    let len = c.be32()? as usize;
    Ok(RamRecord::CompressedPage {
        block,
        offset,
        data: bounded_bytes(c, len, MAX_COMPRESSED_PAGE, "compressed page")?,
        named,
    })
}

/// The next `len` bytes, after checking `len` against `limit`
/// ([`FormatError::TooLong`] naming `what` when it is over).
fn bounded_bytes<'a>(
    c: &mut Cur<'a>,
    len: usize,
    limit: usize,
    what: &'static str,
) -> Pr<&'a [u8]> {
    if len > limit {
        return bad(FormatError::TooLong {
            what,
            len: len as u64,
            limit: limit as u64,
        });
    }
    c.bytes(len)
}
