//! Everything outside the `ram` section's records: the file header, the
//! configuration section, section headers and footers, our device sections,
//! commands, and the VM description after EOF.

use super::cursor::{Cur, Pr, bad};
use super::{Decoder, Item, RamSection, State};
use crate::error::FormatError;
use crate::format::*;

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

impl Decoder {
    pub(super) fn parse_header<'a>(&mut self, input: &'a [u8]) -> Pr<(Item<'a>, usize)> {
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
        let mut config = Configuration {
            machine_type,
            capabilities: Vec::new(),
            uuid: None,
        };
        // Subsections follow while the next byte is QEMU_VM_SUBSECTION; the
        // next section type byte is never 0x05, so the peek is unambiguous.
        while c.peek()? == SUBSECTION {
            c.u8()?;
            parse_config_subsection(c, &mut config)?;
        }
        self.ignore_shared = config.capabilities.contains(&"x-ignore-shared");
        self.state = State::Top;
        Ok(Item::Configuration(config))
    }

    /// One item at the top level: dispatches on the section type byte.
    pub(super) fn parse_top<'a>(&mut self, input: &'a [u8]) -> Pr<(Item<'a>, usize)> {
        let mut c = Cur::new(input, "section header");
        let item = match c.u8()? {
            SECTION_FOOTER => {
                let item = self.parse_footer(&mut c)?;
                return Ok((item, c.pos));
            }
            CONFIGURATION if self.state == State::AfterHeader => self.parse_config(&mut c)?,
            CONFIGURATION => {
                return bad(FormatError::Unexpected {
                    what: "configuration section",
                });
            }
            SECTION_START => self.parse_section_start(&mut c, SectionKind::Start)?,
            SECTION_FULL => self.parse_section_start(&mut c, SectionKind::Full)?,
            SECTION_PART => self.parse_ram_section_next(&mut c, SectionKind::Part)?,
            SECTION_END => self.parse_ram_section_next(&mut c, SectionKind::End)?,
            SECTION_EOF => {
                self.state = State::AfterEof;
                Item::Eof
            }
            COMMAND => self.parse_command(&mut c)?,
            VM_DESCRIPTION => {
                return bad(FormatError::Unexpected {
                    what: "VM description before EOF",
                });
            }
            SUBSECTION => return bad(FormatError::Unexpected { what: "subsection" }),
            byte => return bad(FormatError::UnknownSectionType { byte }),
        };
        // Footers are optional (QEMU's `send-section-footer`); once another
        // section starts, the previous one can no longer get one. Our device
        // sections are always followed by theirs.
        self.pending_footer = match &item {
            Item::DeviceState(d) => Some(d.header.section_id),
            _ => None,
        };
        if self.state == State::AfterHeader {
            self.state = State::Top;
        }
        Ok((item, c.pos))
    }

    /// FOOTER: the id of the section that expects one.
    fn parse_footer<'a>(&mut self, c: &mut Cur<'a>) -> Pr<Item<'a>> {
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
        Ok(Item::Footer { section_id: found })
    }

    /// START or FULL: the header, then by id string the `ram` section, one
    /// of our device sections, or a foreign section (decoding stops).
    fn parse_section_start<'a>(&mut self, c: &mut Cur<'a>, kind: SectionKind) -> Pr<Item<'a>> {
        c.what = "section header";
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
            self.open_ram_section(header)
        } else if name.starts_with(OUR_SECTION_PREFIX) {
            self.parse_device_state(c, header)
        } else {
            self.state = State::Stopped;
            Ok(Item::ForeignSection(header))
        }
    }

    /// The `ram` section's START: once per stream, instance 0, version 4.
    fn open_ram_section<'a>(&mut self, header: SectionHeader<'a>) -> Pr<Item<'a>> {
        if header.kind == SectionKind::Full {
            return bad(FormatError::Unexpected {
                what: "ram section as FULL",
            });
        }
        if self.ram.is_some() {
            return bad(FormatError::DuplicateRamSection);
        }
        if header.instance_id != 0 || header.version_id != RAM_SECTION_VERSION {
            return bad(FormatError::UnsupportedRamSection {
                instance: header.instance_id,
                version: header.version_id,
            });
        }
        self.ram = Some(RamSection {
            id: header.section_id,
            ended: false,
        });
        self.state = State::Ram;
        Ok(Item::Section(header))
    }

    /// One of our device sections (FULL only): be32 length + payload.
    fn parse_device_state<'a>(
        &mut self,
        c: &mut Cur<'a>,
        header: SectionHeader<'a>,
    ) -> Pr<Item<'a>> {
        if header.kind != SectionKind::Full {
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
        self.state = State::Top;
        Ok(Item::DeviceState(DeviceState { header, payload }))
    }

    /// PART or END: only for the open `ram` section, and none after its END.
    fn parse_ram_section_next<'a>(&mut self, c: &mut Cur<'a>, kind: SectionKind) -> Pr<Item<'a>> {
        c.what = "section header";
        let id = c.be32()?;
        match self.ram {
            Some(RamSection { id: rid, ended }) if rid == id && !ended => {}
            _ => return bad(FormatError::UnknownSectionId { id }),
        }
        self.ram = Some(RamSection {
            id,
            ended: kind == SectionKind::End,
        });
        self.state = State::Ram;
        Ok(Item::Section(SectionHeader {
            kind,
            section_id: id,
            name: RAM_SECTION_NAME,
            instance_id: 0,
            version_id: RAM_SECTION_VERSION,
        }))
    }

    /// COMMAND: be16 command, be16 length, data (framing only).
    fn parse_command<'a>(&mut self, c: &mut Cur<'a>) -> Pr<Item<'a>> {
        c.what = "command";
        let command = c.be16()?;
        let len = c.be16()?;
        let data = c.bytes(len as usize)?;
        self.state = State::Top;
        Ok(Item::Command { command, data })
    }

    pub(super) fn parse_after_eof<'a>(&mut self, input: &'a [u8]) -> Pr<(Item<'a>, usize)> {
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
}

/// One configuration subsection (after its 0x05 byte): target page bits,
/// capabilities or UUID.
fn parse_config_subsection<'a>(c: &mut Cur<'a>, config: &mut Configuration<'a>) -> Pr<()> {
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
                config.capabilities.push(c.name("capability")?);
            }
        }
        "configuration/uuid" => config.uuid = Some(c.array::<16>()?),
        other => {
            return bad(FormatError::UnknownSubsection {
                name: other.to_owned(),
            });
        }
    }
    Ok(())
}
