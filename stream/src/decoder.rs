//! The sans-IO decoder: bytes in, [`Item`]s out, "need more bytes" as a normal outcome.
//!
//! [`Decoder::decode`] follows tokio-util's `Decoder` contract: it looks at
//! the unconsumed input, and returns `Ok(Some((item, consumed)))` for one
//! complete item, `Ok(None)` when the input ends inside the next item (call
//! again with the same bytes plus more; the decoder's state is unchanged), or
//! `Err` when the stream is malformed (the decoder is then stopped). At the
//! end of the input, [`Decoder::finish`] tells a complete stream from a
//! truncated one.
//!
//! Every length is checked against the protocol and against [`Limits`]
//! before it is used; nothing is allocated from an unchecked field; page
//! offsets and block names are checked against the MEM_SIZE block list, so an
//! [`Item`] that comes out is safe to apply.

use crate::error::{Error, FormatError};
use crate::format::*;
use xbzrle::Page;

/// Limits a reader enforces before trusting a length field.
///
/// The defaults fit any ordinary VM; lower them for untrusted input on a
/// small machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest MEM_SIZE total (bytes of RAM, so bytes a loader allocates).
    /// Default 16 GiB.
    pub max_ram_bytes: u64,
    /// Most RAM blocks in MEM_SIZE. Default 1024.
    pub max_blocks: usize,
    /// Largest payload of one of our device sections. Default 16 MiB.
    pub max_device_state_bytes: usize,
    /// Largest VM description JSON. Default 16 MiB.
    pub max_vm_description_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_ram_bytes: 16 << 30,
            max_blocks: 1024,
            max_device_state_bytes: 16 << 20,
            max_vm_description_bytes: 16 << 20,
        }
    }
}

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

/// The kind of a section header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// `QEMU_VM_SECTION_START` (0x01): first part of an iterable section.
    Start,
    /// `QEMU_VM_SECTION_PART` (0x02): one iteration.
    Part,
    /// `QEMU_VM_SECTION_END` (0x03): the last part, guest stopped.
    End,
    /// `QEMU_VM_SECTION_FULL` (0x04): a whole device state.
    Full,
}

impl SectionKind {
    /// QEMU's name: `START`, `PART`, `END`, `FULL`.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Start => "START",
            SectionKind::Part => "PART",
            SectionKind::End => "END",
            SectionKind::Full => "FULL",
        }
    }
}

/// A section header. For PART and END (which carry only the id on the
/// wire) the name, instance and version are those of the section's START.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionHeader<'a> {
    /// START, PART, END or FULL.
    pub kind: SectionKind,
    /// Section id (unique per stream).
    pub section_id: u32,
    /// Id string, e.g. `ram`, `timer`, `precopy/vcpu`.
    pub name: &'a str,
    /// Instance id.
    pub instance_id: u32,
    /// Version id.
    pub version_id: u32,
}

/// The configuration section (`QEMU_VM_CONFIGURATION`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Configuration<'a> {
    /// Machine type, e.g. `pc-i440fx-7.2`.
    pub machine_type: &'a str,
    /// Capabilities from the `configuration/capabilities` subsection, if any
    /// (e.g. `x-ignore-shared`).
    pub capabilities: Vec<&'a str>,
    /// UUID from the `configuration/uuid` subsection, if any.
    pub uuid: Option<[u8; 16]>,
}

/// One of our own device sections (FULL, id string `precopy/...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceState<'a> {
    /// The section header.
    pub header: SectionHeader<'a>,
    /// The payload bytes (the be32 length is not included).
    pub payload: &'a [u8],
}

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
    /// `HOOK`: an RDMA hook point (no data in the stream).
    Hook,
    /// `EOS`: end of the section's content.
    Eos,
}

/// One decoded unit of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Item<'a> {
    /// Magic and version.
    FileHeader {
        /// File version (3).
        version: u32,
    },
    /// The configuration section.
    Configuration(Configuration<'a>),
    /// A `ram` section header (START/PART/END); records follow up to EOS.
    Section(SectionHeader<'a>),
    /// A record of the `ram` section.
    Ram(RamRecord<'a>),
    /// A section footer.
    Footer {
        /// Id of the section it closes.
        section_id: u32,
    },
    /// One of our device sections, whole.
    DeviceState(DeviceState<'a>),
    /// A section we cannot parse (QEMU device state): decoding stops here;
    /// the item's bytes are the section header only.
    ForeignSection(SectionHeader<'a>),
    /// A `QEMU_VM_COMMAND` (postcopy, return path...): framing only.
    Command {
        /// Command number (`MIG_CMD_*`).
        command: u16,
        /// Its data.
        data: &'a [u8],
    },
    /// `QEMU_VM_EOF`.
    Eof,
    /// The VM description JSON (after EOF).
    VmDescription(&'a [u8]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Magic,
    AfterHeader,
    Top,
    Ram,
    AfterEof,
    Done,
    Stopped,
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct RamSection {
    id: u32,
    ended: bool,
}

/// Internal parse outcome: need more bytes (inside `what`), or refused.
enum P {
    Incomplete(&'static str),
    Bad(FormatError),
}

type Pr<T> = Result<T, P>;

fn bad<T>(kind: FormatError) -> Pr<T> {
    Err(P::Bad(kind))
}

/// A bounds-checked cursor over the unconsumed input.
struct Cur<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cur<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cur { buf, pos: 0, what }
    }
    fn bytes(&mut self, n: usize) -> Pr<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(P::Incomplete(self.what))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(P::Incomplete(self.what))?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Pr<[u8; N]> {
        let s = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Pr<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn be16(&mut self) -> Pr<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn be32(&mut self) -> Pr<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn be64(&mut self) -> Pr<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn peek(&self) -> Pr<u8> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(P::Incomplete(self.what))
    }
    /// u8 length + name bytes, as UTF-8.
    fn name(&mut self, what: &'static str) -> Pr<&'a str> {
        let len = self.u8()? as usize;
        let raw = self.bytes(len)?;
        if raw.is_empty() {
            return bad(FormatError::BadName { what });
        }
        std::str::from_utf8(raw).or(bad(FormatError::BadName { what }))
    }
}

/// The sans-IO stream decoder. See the [module docs](self).
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    state: State,
    pos: u64,
    pending: &'static str,
    blocks: Vec<RamBlockInfo>,
    mem_size_seen: bool,
    last_block: Option<usize>,
    ram: Option<RamSection>,
    pending_footer: Option<u32>,
    ignore_shared: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(Limits::default())
    }
}

impl Decoder {
    /// A decoder expecting the file header, enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Decoder {
            limits,
            state: State::Magic,
            pos: 0,
            pending: "file header",
            blocks: Vec::new(),
            mem_size_seen: false,
            last_block: None,
            ram: None,
            pending_footer: None,
            ignore_shared: false,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes consumed so far: the stream offset of the next item.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The MEM_SIZE block list (empty before MEM_SIZE); page records index it.
    pub fn blocks(&self) -> &[RamBlockInfo] {
        &self.blocks
    }

    /// True once EOF (and possibly the VM description) was read: the end of
    /// input here is a complete stream.
    pub fn is_complete(&self) -> bool {
        matches!(self.state, State::AfterEof | State::Done)
    }

    /// True once decoding stopped at a foreign section.
    pub fn is_stopped(&self) -> bool {
        self.state == State::Stopped
    }

    /// Decodes the next item from `input` (the unconsumed bytes).
    ///
    /// Returns `Ok(Some((item, consumed)))`; `Ok(None)` when `input` ends
    /// inside the next item (state unchanged; retry with more bytes); never
    /// panics.
    ///
    /// # Errors
    /// [`Error::Format`] with the stream offset of the refused item. After an
    /// error, or after [`Item::ForeignSection`], every call returns
    /// [`FormatError::Stopped`].
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<Option<(Item<'a>, usize)>, Error> {
        let r = match self.state {
            State::Magic => self.parse_header(input),
            State::AfterHeader | State::Top => self.parse_top(input),
            State::Ram => self.parse_ram(input),
            State::AfterEof => self.parse_after_eof(input),
            State::Done => {
                if input.is_empty() {
                    Err(P::Incomplete("end of stream"))
                } else {
                    Err(P::Bad(FormatError::TrailingData))
                }
            }
            State::Stopped | State::Failed => Err(P::Bad(FormatError::Stopped)),
        };
        match r {
            Ok((item, n)) => {
                self.pos += n as u64;
                Ok(Some((item, n)))
            }
            Err(P::Incomplete(what)) => {
                self.pending = what;
                Ok(None)
            }
            Err(P::Bad(kind)) => {
                if self.state != State::Stopped {
                    self.state = State::Failed;
                }
                Err(Error::Format {
                    offset: self.pos,
                    kind,
                })
            }
        }
    }

    /// Ends decoding: `rest` is the input left unconsumed when the source
    /// ended.
    ///
    /// # Errors
    /// [`FormatError::Truncated`] (at the offset of the cut item, naming it)
    /// unless the stream is complete ([`is_complete`](Self::is_complete))
    /// with nothing left over, or decoding stopped at a foreign section.
    pub fn finish(&mut self, rest: &[u8]) -> Result<(), Error> {
        if self.state == State::Stopped || (self.is_complete() && rest.is_empty()) {
            return Ok(());
        }
        if self.state == State::Failed {
            return Err(Error::Format {
                offset: self.pos,
                kind: FormatError::Stopped,
            });
        }
        // Re-run on the leftover to learn what was cut (state unchanged on None).
        let what = match self.decode(rest) {
            Ok(None) => self.pending,
            Ok(Some(_)) => "stream (finish called with a complete item left)",
            Err(e) => return Err(e),
        };
        let what = if rest.is_empty() {
            match self.state {
                State::Magic => "file header",
                State::Ram => "ram section (no EOS)",
                _ => "stream (no EOF marker)",
            }
        } else {
            what
        };
        self.state = State::Failed;
        Err(Error::Format {
            offset: self.pos,
            kind: FormatError::Truncated { what },
        })
    }

    fn parse_header<'a>(&mut self, input: &'a [u8]) -> Pr<(Item<'a>, usize)> {
        let mut c = Cur::new(input, "file header");
        let magic = c.be32()?;
        if magic != FILE_MAGIC {
            return bad(FormatError::BadMagic { found: magic });
        }
        let version = c.be32()?;
        if version != FILE_VERSION {
            return bad(FormatError::UnsupportedFileVersion { found: version });
        }
        self.state = State::AfterHeader;
        Ok((Item::FileHeader { version }, c.pos))
    }

    fn parse_config<'a>(&mut self, c: &mut Cur<'a>) -> Pr<Item<'a>> {
        c.what = "configuration section";
        let len = c.be32()?;
        if len as usize > MAX_NAME_LEN {
            return bad(FormatError::TooLong {
                what: "machine type",
                len: len.into(),
                limit: MAX_NAME_LEN as u64,
            });
        }
        let raw = c.bytes(len as usize)?;
        let machine_type = std::str::from_utf8(raw).or(bad(FormatError::BadName {
            what: "machine type",
        }))?;
        let mut capabilities = Vec::new();
        let mut uuid = None;
        // Subsections follow while the next byte is QEMU_VM_SUBSECTION; the
        // next section type byte is never 0x05, so the peek is unambiguous.
        while c.peek()? == SUBSECTION {
            c.u8()?;
            let name = c.name("subsection")?;
            let _version = c.be32()?;
            match name {
                "configuration/target-page-bits" => {
                    let bits = c.be32()?;
                    if bits != PAGE_SIZE.trailing_zeros() {
                        return bad(FormatError::Unsupported {
                            what: "target page size other than 4096",
                        });
                    }
                }
                "configuration/capabilities" => {
                    let count = c.be32()?;
                    if count > 64 {
                        return bad(FormatError::TooLong {
                            what: "capability list",
                            len: count.into(),
                            limit: 64,
                        });
                    }
                    for _ in 0..count {
                        capabilities.push(c.name("capability")?);
                    }
                }
                "configuration/uuid" => uuid = Some(c.array::<16>()?),
                other => {
                    return bad(FormatError::UnknownSubsection {
                        name: other.to_owned(),
                    });
                }
            }
        }
        self.ignore_shared = capabilities.contains(&"x-ignore-shared");
        self.state = State::Top;
        Ok(Item::Configuration(Configuration {
            machine_type,
            capabilities,
            uuid,
        }))
    }

    fn parse_top<'a>(&mut self, input: &'a [u8]) -> Pr<(Item<'a>, usize)> {
        let mut c = Cur::new(input, "section header");
        let t = c.u8()?;
        if t == SECTION_FOOTER {
            c.what = "section footer";
            let found = c.be32()?;
            let Some(expected) = self.pending_footer else {
                return bad(FormatError::Unexpected {
                    what: "section footer",
                });
            };
            if found != expected {
                return bad(FormatError::FooterMismatch { expected, found });
            }
            self.pending_footer = None;
            return Ok((Item::Footer { section_id: found }, c.pos));
        }
        let item = match t {
            CONFIGURATION if self.state == State::AfterHeader => self.parse_config(&mut c)?,
            CONFIGURATION => {
                return bad(FormatError::Unexpected {
                    what: "configuration section",
                });
            }
            SECTION_START | SECTION_FULL => {
                c.what = "section header";
                let kind = if t == SECTION_START {
                    SectionKind::Start
                } else {
                    SectionKind::Full
                };
                let section_id = c.be32()?;
                let name = c.name("section")?;
                let instance_id = c.be32()?;
                let version_id = c.be32()?;
                let header = SectionHeader {
                    kind,
                    section_id,
                    name,
                    instance_id,
                    version_id,
                };
                if name == RAM_SECTION_NAME {
                    if kind == SectionKind::Full {
                        return bad(FormatError::Unexpected {
                            what: "ram section as FULL",
                        });
                    }
                    if self.ram.is_some() {
                        return bad(FormatError::DuplicateRamSection);
                    }
                    if instance_id != 0 || version_id != RAM_SECTION_VERSION {
                        return bad(FormatError::UnsupportedRamSection {
                            instance: instance_id,
                            version: version_id,
                        });
                    }
                    self.ram = Some(RamSection {
                        id: section_id,
                        ended: false,
                    });
                    self.state = State::Ram;
                    Item::Section(header)
                } else if name.starts_with(OUR_SECTION_PREFIX) {
                    if kind != SectionKind::Full {
                        return bad(FormatError::Unexpected {
                            what: "precopy/ section as START",
                        });
                    }
                    c.what = "device section";
                    let len = c.be32()?;
                    let limit = self.limits.max_device_state_bytes;
                    if len as u64 > limit as u64 {
                        return bad(FormatError::TooLong {
                            what: "device state",
                            len: len.into(),
                            limit: limit as u64,
                        });
                    }
                    let payload = c.bytes(len as usize)?;
                    self.pending_footer = Some(section_id);
                    self.state = State::Top;
                    return Ok((Item::DeviceState(DeviceState { header, payload }), c.pos));
                } else {
                    self.state = State::Stopped;
                    Item::ForeignSection(header)
                }
            }
            SECTION_PART | SECTION_END => {
                c.what = "section header";
                let id = c.be32()?;
                match self.ram {
                    Some(RamSection { id: rid, ended }) if rid == id && !ended => {}
                    _ => return bad(FormatError::UnknownSectionId { id }),
                }
                let kind = if t == SECTION_PART {
                    SectionKind::Part
                } else {
                    SectionKind::End
                };
                self.ram = Some(RamSection {
                    id,
                    ended: kind == SectionKind::End,
                });
                self.state = State::Ram;
                Item::Section(SectionHeader {
                    kind,
                    section_id: id,
                    name: RAM_SECTION_NAME,
                    instance_id: 0,
                    version_id: RAM_SECTION_VERSION,
                })
            }
            SECTION_EOF => {
                self.state = State::AfterEof;
                Item::Eof
            }
            COMMAND => {
                c.what = "command";
                let command = c.be16()?;
                let len = c.be16()?;
                let data = c.bytes(len as usize)?;
                self.state = State::Top;
                Item::Command { command, data }
            }
            VM_DESCRIPTION => {
                return bad(FormatError::Unexpected {
                    what: "VM description before EOF",
                });
            }
            SUBSECTION => return bad(FormatError::Unexpected { what: "subsection" }),
            byte => return bad(FormatError::UnknownSectionType { byte }),
        };
        // Footers are optional (QEMU's `send-section-footer`); once another
        // section starts, the previous one can no longer get one.
        self.pending_footer = None;
        if self.state == State::AfterHeader {
            self.state = State::Top;
        }
        Ok((item, c.pos))
    }

    fn parse_after_eof<'a>(&mut self, input: &'a [u8]) -> Pr<(Item<'a>, usize)> {
        let mut c = Cur::new(input, "VM description");
        let t = c.u8()?;
        if t != VM_DESCRIPTION {
            return bad(FormatError::TrailingData);
        }
        let len = c.be32()?;
        let limit = self.limits.max_vm_description_bytes;
        if len as u64 > limit as u64 {
            return bad(FormatError::TooLong {
                what: "VM description",
                len: len.into(),
                limit: limit as u64,
            });
        }
        let json = c.bytes(len as usize)?;
        self.state = State::Done;
        Ok((Item::VmDescription(json), c.pos))
    }

    fn parse_ram<'a>(&mut self, input: &'a [u8]) -> Pr<(Item<'a>, usize)> {
        let mut c = Cur::new(input, "ram record");
        let header = c.be64()?;
        let flags = header & FLAGS_MASK;
        let addr = header & !FLAGS_MASK;
        let cont = flags & FLAG_CONTINUE != 0;
        let base = flags & !FLAG_CONTINUE;
        let rec = match base {
            FLAG_MEM_SIZE if !cont => self.parse_mem_size(&mut c, addr)?,
            FLAG_EOS if !cont => {
                let id = self.ram.map(|r| r.id).unwrap_or(0);
                self.pending_footer = Some(id);
                self.state = State::Top;
                RamRecord::Eos
            }
            FLAG_HOOK if !cont => RamRecord::Hook,
            FLAG_ZERO | FLAG_PAGE | FLAG_XBZRLE | FLAG_COMPRESS_PAGE => {
                c.what = match base {
                    FLAG_ZERO => "ZERO record",
                    FLAG_PAGE => "PAGE record",
                    FLAG_XBZRLE => "XBZRLE record",
                    _ => "COMPRESS_PAGE record",
                };
                if !self.mem_size_seen {
                    return bad(FormatError::RecordBeforeMemSize);
                }
                let block = if cont {
                    self.last_block
                        .ok_or(P::Bad(FormatError::ContinueWithoutBlock))?
                } else {
                    let len = c.u8()? as usize;
                    let raw = c.bytes(len)?;
                    self.blocks
                        .iter()
                        .position(|b| b.name.as_bytes() == raw)
                        .ok_or_else(|| {
                            P::Bad(FormatError::UnknownBlock {
                                name: String::from_utf8_lossy(raw).into_owned(),
                            })
                        })?
                };
                let info = &self.blocks[block];
                if addr >= info.used_length || info.used_length - addr < PAGE_SIZE as u64 {
                    return bad(FormatError::PageOutsideBlock {
                        block: info.name.clone(),
                        offset: addr,
                        length: info.used_length,
                    });
                }
                let named = !cont;
                let rec = match base {
                    FLAG_ZERO => {
                        let fill = c.u8()?;
                        if fill != 0 {
                            return bad(FormatError::NonZeroFill { fill });
                        }
                        RamRecord::Zero {
                            block,
                            offset: addr,
                            fill,
                            named,
                        }
                    }
                    FLAG_PAGE => {
                        let data: &Page = c
                            .bytes(PAGE_SIZE)?
                            .try_into()
                            .or(Err(P::Incomplete("PAGE record")))?;
                        RamRecord::Page {
                            block,
                            offset: addr,
                            data,
                            named,
                        }
                    }
                    FLAG_XBZRLE => {
                        let enc = c.u8()?;
                        if enc != ENCODING_XBZRLE {
                            return bad(FormatError::BadXbzrleEncoding { byte: enc });
                        }
                        let len = c.be16()? as usize;
                        if len > PAGE_SIZE {
                            return bad(FormatError::TooLong {
                                what: "XBZRLE delta",
                                len: len as u64,
                                limit: PAGE_SIZE as u64,
                            });
                        }
                        RamRecord::Xbzrle {
                            block,
                            offset: addr,
                            delta: c.bytes(len)?,
                            named,
                        }
                    }
                    _ => {
                        let len = c.be32()? as usize;
                        if len > MAX_COMPRESSED_PAGE {
                            return bad(FormatError::TooLong {
                                what: "compressed page",
                                len: len as u64,
                                limit: MAX_COMPRESSED_PAGE as u64,
                            });
                        }
                        RamRecord::CompressedPage {
                            block,
                            offset: addr,
                            data: c.bytes(len)?,
                            named,
                        }
                    }
                };
                self.last_block = Some(block);
                rec
            }
            _ => return bad(FormatError::BadFlags { flags }),
        };
        Ok((Item::Ram(rec), c.pos))
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
