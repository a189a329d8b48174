//! The sans-IO encoder: stream items appended to a caller's `Vec<u8>`.
//!
//! [`Encoder`] keeps the little state QEMU's writer keeps (the RAM block
//! list, the last block a page record named, which section is open) and
//! checks every call, so its output is always a stream [`Decoder`](crate::Decoder)
//! accepts. On `Err` nothing was appended.
//!
//! Call order (QEMU's names in brackets):
//!
//! ```text
//! file_header(machine_type)                    magic, version, configuration
//! ram_setup(blocks)                            ram START: MEM_SIZE, EOS, footer   [ram_save_setup]
//! ( begin_ram_iteration()                      ram PART                           [ram_save_iterate]
//!     (zero_page | page | xbzrle_page)*
//!   end_ram_section() )*                       EOS, footer
//! begin_ram_complete() records* end_ram_section()   ram END                      [ram_save_complete]
//! device_state(name, ...)*                     FULL "precopy/..." sections
//! eof()
//! vm_description(json)                         optional
//! ```

use crate::error::WriteError;
use crate::format::RamBlockInfo;
use crate::format::*;
use xbzrle::Page;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WState {
    Initial,
    Top,
    RamOpen,
    Eof,
    Done,
}

/// The sans-IO stream encoder. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Encoder {
    state: WState,
    blocks: Vec<RamBlockInfo>,
    last_block: Option<usize>,
    ram_section_id: u32,
    ram_started: bool,
    ram_ended: bool,
    next_section_id: u32,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

fn be64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn be32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Checks a MEM_SIZE block list a writer is given (names 1..=255 bytes and distinct, used
/// lengths non-zero multiples of 4096) and returns the total RAM in bytes.
///
/// # Errors
/// [`WriteError::BadName`], [`WriteError::BadBlocks`] (also when the total overflows).
pub(crate) fn check_ram_blocks(blocks: &[RamBlockInfo]) -> Result<u64, WriteError> {
    let mut total: u64 = 0;
    for (i, b) in blocks.iter().enumerate() {
        check_name("RAM block", &b.name)?;
        if b.used_length == 0 || !b.used_length.is_multiple_of(PAGE_SIZE as u64) {
            return Err(WriteError::BadBlocks {
                why: "used length zero or not a multiple of 4096",
            });
        }
        if blocks[..i].iter().any(|o| o.name == b.name) {
            return Err(WriteError::BadBlocks {
                why: "duplicate block name",
            });
        }
        total = total
            .checked_add(b.used_length)
            .ok_or(WriteError::BadBlocks {
                why: "total RAM size overflows",
            })?;
    }
    Ok(total)
}

/// Checks a name the writer puts on the wire: 1..=255 bytes.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), WriteError> {
    let why = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_NAME_LEN {
        "longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(WriteError::BadName {
        what,
        name: name.to_owned(),
        why,
    })
}

impl Encoder {
    /// An encoder whose `ram` section has id 0 (device sections get the next free ids).
    pub fn new() -> Self {
        Encoder::with_ram_section_id(0)
    }

    /// An encoder whose `ram` section has id `id` (QEMU's pc machine uses 2).
    pub fn with_ram_section_id(id: u32) -> Self {
        Encoder {
            state: WState::Initial,
            blocks: Vec::new(),
            last_block: None,
            ram_section_id: id,
            ram_started: false,
            ram_ended: false,
            next_section_id: 0,
        }
    }

    /// An encoder that writes only page records (ZERO, PAGE, XBZRLE) for the RAM blocks
    /// `blocks` (a MEM_SIZE list, in its order; page records name blocks by index into
    /// it), into a stream whose other items another writer frames.
    ///
    /// For a relay: it forwards a QEMU source's file header, configuration, section
    /// headers, MEM_SIZE, EOS records and footers as they are, and re-encodes the page
    /// records between them with this encoder. The CONTINUE decision spans the whole
    /// stream, as QEMU's destination tracks the last block it read across sections; the
    /// first record names its block. Only [`zero_page`](Self::zero_page),
    /// [`page`](Self::page), [`xbzrle_page`](Self::xbzrle_page),
    /// [`compressed_page`](Self::compressed_page) and, for a multifd page channel
    /// ([`multifd`](crate::multifd)), [`multifd_flush`](Self::multifd_flush) and
    /// [`multifd_channel_end`](Self::multifd_channel_end) may be called.
    pub fn page_records_only(blocks: &[RamBlockInfo]) -> Self {
        Encoder {
            state: WState::RamOpen,
            blocks: blocks.to_vec(),
            ram_started: true,
            ..Encoder::new()
        }
    }

    /// The MEM_SIZE block list given to [`ram_setup`](Self::ram_setup).
    pub fn blocks(&self) -> &[RamBlockInfo] {
        &self.blocks
    }

    /// True while a ram PART/END section is open for page records.
    pub fn ram_section_open(&self) -> bool {
        self.state == WState::RamOpen
    }

    fn order(&self, op: &'static str, want: WState) -> Result<(), WriteError> {
        if self.state == want {
            return Ok(());
        }
        let state = match self.state {
            WState::Initial => "before the file header",
            WState::Top => "outside a ram section",
            WState::RamOpen => "inside a ram section",
            WState::Eof => "after EOF",
            WState::Done => "after the VM description",
        };
        Err(WriteError::Order { op, state })
    }

    /// Appends magic, version and the configuration section naming
    /// `machine_type` (e.g. `pc-i440fx-7.2`; 1..=255 bytes).
    ///
    /// # Errors
    /// [`WriteError::BadName`], [`WriteError::Order`].
    pub fn file_header(&mut self, out: &mut Vec<u8>, machine_type: &str) -> Result<(), WriteError> {
        self.order("file header", WState::Initial)?;
        check_name("machine type", machine_type)?;
        be32(out, FILE_MAGIC);
        be32(out, FILE_VERSION);
        out.push(CONFIGURATION);
        be32(out, machine_type.len() as u32);
        out.extend_from_slice(machine_type.as_bytes());
        self.state = WState::Top;
        Ok(())
    }

    fn section_header(
        &self,
        out: &mut Vec<u8>,
        kind: u8,
        id: u32,
        name: &str,
        instance: u32,
        version: u32,
    ) {
        out.push(kind);
        be32(out, id);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        be32(out, instance);
        be32(out, version);
    }

    fn eos_footer(out: &mut Vec<u8>, id: u32) {
        be64(out, FLAG_EOS);
        out.push(SECTION_FOOTER);
        be32(out, id);
    }

    /// Appends the `ram` section START: MEM_SIZE with `blocks` (in this
    /// order; page records name blocks by index into it), EOS, footer.
    ///
    /// # Errors
    /// [`WriteError::BadBlocks`] for a zero or unaligned length, a duplicate
    /// name or a total past 2^64; [`WriteError::BadName`];
    /// [`WriteError::Order`] (once only, after the file header).
    pub fn ram_setup(
        &mut self,
        out: &mut Vec<u8>,
        blocks: &[RamBlockInfo],
    ) -> Result<(), WriteError> {
        self.order("ram setup", WState::Top)?;
        if self.ram_started {
            return Err(WriteError::Order {
                op: "ram setup",
                state: "twice",
            });
        }
        let total = check_ram_blocks(blocks)?;
        self.section_header(
            out,
            SECTION_START,
            self.ram_section_id,
            RAM_SECTION_NAME,
            0,
            RAM_SECTION_VERSION,
        );
        be64(out, total | FLAG_MEM_SIZE);
        for b in blocks {
            out.push(b.name.len() as u8);
            out.extend_from_slice(b.name.as_bytes());
            be64(out, b.used_length);
        }
        Self::eos_footer(out, self.ram_section_id);
        self.blocks = blocks.to_vec();
        self.ram_started = true;
        Ok(())
    }

    fn begin_ram(
        &mut self,
        out: &mut Vec<u8>,
        op: &'static str,
        kind: u8,
    ) -> Result<(), WriteError> {
        self.order(op, WState::Top)?;
        if !self.ram_started || self.ram_ended {
            return Err(WriteError::Order {
                op,
                state: if self.ram_ended {
                    "after the ram END section"
                } else {
                    "before ram setup"
                },
            });
        }
        out.push(kind);
        be32(out, self.ram_section_id);
        self.state = WState::RamOpen;
        if kind == SECTION_END {
            self.ram_ended = true;
        }
        Ok(())
    }

    /// Appends a `ram` PART header: one iteration's page records follow.
    ///
    /// # Errors
    /// [`WriteError::Order`] unless after [`ram_setup`](Self::ram_setup),
    /// outside a ram section and before the END.
    pub fn begin_ram_iteration(&mut self, out: &mut Vec<u8>) -> Result<(), WriteError> {
        self.begin_ram(out, "ram iteration", SECTION_PART)
    }

    /// Appends the `ram` END header: the last page records (guest stopped) follow.
    ///
    /// # Errors
    /// As [`begin_ram_iteration`](Self::begin_ram_iteration).
    pub fn begin_ram_complete(&mut self, out: &mut Vec<u8>) -> Result<(), WriteError> {
        self.begin_ram(out, "ram complete", SECTION_END)
    }

    /// Appends EOS and the footer, closing the open ram PART/END.
    ///
    /// # Errors
    /// [`WriteError::Order`] when no ram section is open.
    pub fn end_ram_section(&mut self, out: &mut Vec<u8>) -> Result<(), WriteError> {
        self.order("end of ram section", WState::RamOpen)?;
        Self::eos_footer(out, self.ram_section_id);
        self.state = WState::Top;
        Ok(())
    }

    /// Appends a `MULTIFD_FLUSH` sync point carrying sync number `seq` in its offset bits
    /// ([`multifd`](crate::multifd)): inside a `ram` section of a multifd main channel,
    /// or on a page channel ([`page_records_only`](Self::page_records_only)).
    ///
    /// # Errors
    /// [`WriteError::Order`] outside a ram section; [`WriteError::BadOffset`] for a
    /// `seq` of 2^52 or more (it would not fit the offset bits).
    pub fn multifd_flush(&mut self, out: &mut Vec<u8>, seq: u64) -> Result<(), WriteError> {
        self.order("multifd sync point", WState::RamOpen)?;
        if seq > u64::MAX >> 12 {
            return Err(WriteError::BadOffset {
                block: 0,
                offset: seq,
                length: u64::MAX >> 12,
            });
        }
        be64(out, (seq << 12) | FLAG_MULTIFD_FLUSH);
        Ok(())
    }

    /// Appends the EOS that ends a multifd page channel ([`multifd`](crate::multifd));
    /// nothing may be written after it.
    ///
    /// # Errors
    /// [`WriteError::Order`] when the encoder is not open for page records.
    pub fn multifd_channel_end(&mut self, out: &mut Vec<u8>) -> Result<(), WriteError> {
        self.order("end of multifd channel", WState::RamOpen)?;
        be64(out, FLAG_EOS);
        self.state = WState::Done;
        Ok(())
    }

    fn page_header(
        &mut self,
        out: &mut Vec<u8>,
        op: &'static str,
        block: usize,
        offset: u64,
        flag: u64,
    ) -> Result<(), WriteError> {
        self.order(op, WState::RamOpen)?;
        let info = self
            .blocks
            .get(block)
            .ok_or(WriteError::NoSuchBlock { block })?;
        if !offset.is_multiple_of(PAGE_SIZE as u64) || offset >= info.used_length {
            return Err(WriteError::BadOffset {
                block,
                offset,
                length: info.used_length,
            });
        }
        if self.last_block == Some(block) {
            be64(out, offset | flag | FLAG_CONTINUE);
        } else {
            be64(out, offset | flag);
            out.push(info.name.len() as u8);
            out.extend_from_slice(info.name.as_bytes());
            self.last_block = Some(block);
        }
        Ok(())
    }

    /// Appends a ZERO record (fill byte 0) for the page at byte `offset` of
    /// block index `block`. The block name is written only when the block
    /// differs from the previous page record's (else CONTINUE), as QEMU does.
    ///
    /// # Errors
    /// [`WriteError::NoSuchBlock`], [`WriteError::BadOffset`] (unaligned or
    /// outside the block), [`WriteError::Order`] (no ram section open).
    pub fn zero_page(
        &mut self,
        out: &mut Vec<u8>,
        block: usize,
        offset: u64,
    ) -> Result<(), WriteError> {
        self.page_header(out, "zero page", block, offset, FLAG_ZERO)?;
        out.push(0);
        Ok(())
    }

    /// Appends a PAGE record carrying `data`. Errors as [`zero_page`](Self::zero_page).
    ///
    /// # Errors
    /// As [`zero_page`](Self::zero_page).
    pub fn page(
        &mut self,
        out: &mut Vec<u8>,
        block: usize,
        offset: u64,
        data: &Page,
    ) -> Result<(), WriteError> {
        self.page_header(out, "page", block, offset, FLAG_PAGE)?;
        out.extend_from_slice(data);
        Ok(())
    }

    /// Appends an XBZRLE record: encoding byte 0x01, be16 length, `delta`
    /// (from [`xbzrle::encode`], at most 4096 bytes).
    ///
    /// # Errors
    /// [`WriteError::TooLong`] for a delta over 4096 bytes, else as
    /// [`zero_page`](Self::zero_page).
    pub fn xbzrle_page(
        &mut self,
        out: &mut Vec<u8>,
        block: usize,
        offset: u64,
        delta: &[u8],
    ) -> Result<(), WriteError> {
        if delta.len() > PAGE_SIZE {
            return Err(WriteError::TooLong {
                what: "XBZRLE delta",
                len: delta.len() as u64,
                limit: PAGE_SIZE as u64,
            });
        }
        self.page_header(out, "XBZRLE page", block, offset, FLAG_XBZRLE)?;
        out.push(ENCODING_XBZRLE);
        out.extend_from_slice(&(delta.len() as u16).to_be_bytes());
        out.extend_from_slice(delta);
        Ok(())
    }

    /// Appends our compressed-page record (see [`format`](crate::format)):
    /// method byte, be16 length, `frame` (from
    /// [`precopy_compress::PageCompressor::compress`] with `method`,
    /// 1..=4096 bytes). Not a QEMU record: only readers of this crate load it.
    ///
    /// # Errors
    /// [`WriteError::NotACompressedMethod`] for `none` and `xbzrle`,
    /// [`WriteError::TooLong`] for a frame over 4096 bytes or an empty one,
    /// else as [`zero_page`](Self::zero_page).
    pub fn compressed_page(
        &mut self,
        out: &mut Vec<u8>,
        block: usize,
        offset: u64,
        method: precopy_compress::Method,
        frame: &[u8],
    ) -> Result<(), WriteError> {
        let id = method
            .wire_id()
            .ok_or(WriteError::NotACompressedMethod { method })?;
        if frame.is_empty() || frame.len() > MAX_COMPRESSED_FRAME {
            return Err(WriteError::TooLong {
                what: "compressed page frame (1..=4096)",
                len: frame.len() as u64,
                limit: MAX_COMPRESSED_FRAME as u64,
            });
        }
        self.page_header(out, "compressed page", block, offset, FLAG_COMPRESSED)?;
        out.push(id);
        out.extend_from_slice(&(frame.len() as u16).to_be_bytes());
        out.extend_from_slice(frame);
        Ok(())
    }

    fn alloc_section_id(&mut self) -> u32 {
        if self.next_section_id == self.ram_section_id {
            self.next_section_id = self.next_section_id.wrapping_add(1);
        }
        let id = self.next_section_id;
        self.next_section_id = self.next_section_id.wrapping_add(1);
        id
    }

    /// Appends one of our device sections: FULL, id string `name` (must
    /// start with `precopy/`, e.g. `precopy/vcpu`), `instance_id`,
    /// `version_id`, then be32 length + `payload`, then the footer. Returns
    /// the section id it was given. Allowed outside ram sections, before EOF.
    ///
    /// # Errors
    /// [`WriteError::BadName`], [`WriteError::TooLong`] (payload ≥ 4 GiB),
    /// [`WriteError::Order`].
    pub fn device_state(
        &mut self,
        out: &mut Vec<u8>,
        name: &str,
        instance_id: u32,
        version_id: u32,
        payload: &[u8],
    ) -> Result<u32, WriteError> {
        self.order("device state", WState::Top)?;
        check_name("device section", name)?;
        if !name.starts_with(OUR_SECTION_PREFIX) {
            return Err(WriteError::BadName {
                what: "device section",
                name: name.to_owned(),
                why: "does not start with \"precopy/\"",
            });
        }
        let len = u32::try_from(payload.len()).map_err(|_| WriteError::TooLong {
            what: "device state",
            len: payload.len() as u64,
            limit: u32::MAX.into(),
        })?;
        let id = self.alloc_section_id();
        self.section_header(out, SECTION_FULL, id, name, instance_id, version_id);
        be32(out, len);
        out.extend_from_slice(payload);
        out.push(SECTION_FOOTER);
        be32(out, id);
        Ok(id)
    }

    /// Appends EOF.
    ///
    /// # Errors
    /// [`WriteError::Order`] inside a ram section, after a ram START
    /// without END, or twice.
    pub fn eof(&mut self, out: &mut Vec<u8>) -> Result<(), WriteError> {
        self.order("EOF", WState::Top)?;
        if self.ram_started && !self.ram_ended {
            return Err(WriteError::Order {
                op: "EOF",
                state: "before the ram END section",
            });
        }
        out.push(SECTION_EOF);
        self.state = WState::Eof;
        Ok(())
    }

    /// Appends the VM description (0x06, be32 length, `json`), after EOF.
    ///
    /// # Errors
    /// [`WriteError::TooLong`] (≥ 4 GiB), [`WriteError::Order`].
    pub fn vm_description(&mut self, out: &mut Vec<u8>, json: &[u8]) -> Result<(), WriteError> {
        self.order("VM description", WState::Eof)?;
        let len = u32::try_from(json.len()).map_err(|_| WriteError::TooLong {
            what: "VM description",
            len: json.len() as u64,
            limit: u32::MAX.into(),
        })?;
        out.push(VM_DESCRIPTION);
        be32(out, len);
        out.extend_from_slice(json);
        self.state = WState::Done;
        Ok(())
    }
}
