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

mod cursor;
mod ram;
mod section;

use crate::error::{Error, FormatError};
pub use crate::format::RamBlockInfo;
use cursor::P;
pub use ram::RamRecord;
pub use section::{Configuration, DeviceState, SectionHeader, SectionKind};

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
    /// A multifd channel's records ([`Decoder::multifd_channel`]).
    channel: bool,
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
            channel: false,
        }
    }

    /// A decoder for one multifd channel's records ([`multifd`](crate::multifd)): no
    /// file header and no sections, only `ram` page records, `MULTIFD_FLUSH` sync points
    /// and the closing `EOS`, against the block list `blocks` that the main channel's
    /// MEM_SIZE gave. Offsets ([`position`](Self::position)) count from the first byte
    /// after the channel's hello. After EOS every further byte is
    /// [`FormatError::TrailingData`]; the channel is complete
    /// ([`is_complete`](Self::is_complete)) exactly then.
    pub fn multifd_channel(limits: Limits, blocks: Vec<RamBlockInfo>) -> Self {
        Decoder {
            state: State::Ram,
            pending: "ram record",
            blocks,
            mem_size_seen: true,
            ram: Some(RamSection {
                id: 0,
                ended: false,
            }),
            channel: true,
            ..Decoder::new(limits)
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
                State::Ram if self.channel => "multifd page channel (no closing EOS)",
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
}
