//! The destination side: [`Loader`] applies items onto a [`RamTarget`] (by
//! default a [`RamImage`]); [`load`] reads a whole stream.

use std::io::Read;

use crate::decoder::{DeviceState, Item, Limits, RamRecord, SectionHeader, SectionKind};
use crate::error::{Error, FormatError};
use crate::foreign::{ForeignDeviceState, section_header_bytes, split_device_state};
use crate::format::PAGE_SIZE;
use crate::format::RamBlockInfo;
use crate::image::{RamImage, RamTarget, TargetError};
use crate::io::StreamReader;
use xbzrle::Page;

/// Count and stream bytes (header included) of one record kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindStats {
    /// Records seen.
    pub count: u64,
    /// Stream bytes they took.
    pub bytes: u64,
}

impl KindStats {
    fn add(&mut self, bytes: usize) {
        self.count += 1;
        self.bytes += bytes as u64;
    }
}

/// What a load saw, per record kind and section kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// MEM_SIZE records.
    pub mem_size: KindStats,
    /// ZERO records (QEMU `ram.duplicate`).
    pub zero: KindStats,
    /// PAGE records (QEMU `ram.normal`).
    pub page: KindStats,
    /// XBZRLE records.
    pub xbzrle: KindStats,
    /// Our compressed-page records with zstd frames.
    pub zstd: KindStats,
    /// Our compressed-page records with zlib frames.
    pub zlib: KindStats,
    /// EOS records.
    pub eos: KindStats,
    /// Sum of the XBZRLE deltas' lengths (without the 3-byte encoding/length prefix).
    pub xbzrle_delta_bytes: u64,
    /// Page records that carried a block name (CONTINUE not set).
    pub records_with_block_name: u64,
    /// Page records with CONTINUE.
    pub records_with_continue: u64,
    /// ram section START headers.
    pub ram_start: u64,
    /// ram section PART headers.
    pub ram_part: u64,
    /// ram section END headers.
    pub ram_end: u64,
    /// Section footers.
    pub footers: u64,
    /// Our device sections (FULL `precopy/...`).
    pub device_sections: KindStats,
    /// `MIG_CMD_SWITCHOVER_START` commands (QEMU 10.0 sends one before the final phase).
    pub switchover_start: u64,
    /// Stream bytes read up to where loading stopped.
    pub bytes: u64,
}

impl LoadStats {
    /// Adds the page-record counts of `other` (ZERO, PAGE, XBZRLE, zstd, zlib, delta
    /// bytes, named/CONTINUE) and its bytes, e.g. a multifd page channel's into the
    /// migration's total.
    pub fn add_pages(&mut self, other: &LoadStats) {
        for (a, b) in [
            (&mut self.zero, &other.zero),
            (&mut self.page, &other.page),
            (&mut self.xbzrle, &other.xbzrle),
            (&mut self.zstd, &other.zstd),
            (&mut self.zlib, &other.zlib),
        ] {
            a.count += b.count;
            a.bytes += b.bytes;
        }
        self.xbzrle_delta_bytes += other.xbzrle_delta_bytes;
        self.records_with_block_name += other.records_with_block_name;
        self.records_with_continue += other.records_with_continue;
        self.bytes += other.bytes;
    }
}

/// A device section of ours, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedDeviceState {
    /// Stream offset of the section.
    pub offset: u64,
    /// Section id.
    pub section_id: u32,
    /// Id string, `precopy/...`.
    pub name: String,
    /// Instance id.
    pub instance_id: u32,
    /// Version id.
    pub version_id: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

impl OwnedDeviceState {
    /// An owned copy of the device section `d` read at stream `offset`.
    fn copied(offset: u64, d: &DeviceState<'_>) -> Self {
        OwnedDeviceState {
            offset,
            section_id: d.header.section_id,
            name: d.header.name.to_owned(),
            instance_id: d.header.instance_id,
            version_id: d.header.version_id,
            payload: d.payload.to_vec(),
        }
    }
}

/// Why loading stopped (when it did not fail).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// EOF was read; `vm_description` tells whether a VM description followed.
    EndOfStream {
        /// Offset of the EOF byte.
        offset: u64,
        /// A VM description followed EOF.
        vm_description: bool,
    },
    /// A device section we cannot parse (QEMU device state): all RAM data
    /// before it was applied.
    ForeignSection {
        /// Offset of the section header.
        offset: u64,
        /// START or FULL.
        kind: SectionKind,
        /// Section id.
        section_id: u32,
        /// Id string, e.g. `timer`.
        name: String,
        /// Instance id.
        instance_id: u32,
        /// Version id.
        version_id: u32,
    },
}

impl StopReason {
    /// Stopped at the foreign section `h` read at stream `offset`.
    fn foreign_section(offset: u64, h: &SectionHeader<'_>) -> Self {
        StopReason::ForeignSection {
            offset,
            kind: h.kind,
            section_id: h.section_id,
            name: h.name.to_owned(),
            instance_id: h.instance_id,
            version_id: h.version_id,
        }
    }

    /// Offset where reading stopped (EOF byte or foreign section header).
    pub fn offset(&self) -> u64 {
        match self {
            StopReason::EndOfStream { offset, .. } | StopReason::ForeignSection { offset, .. } => {
                *offset
            }
        }
    }
}

/// Whether to go on after [`Loader::apply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Feed the next item.
    Continue,
    /// Stop: a foreign section was reached ([`Loader::stop_reason`]).
    Stop,
}

/// The destination-side loader: applies decoded items onto its RAM, a
/// [`RamTarget`] `T` (default [`RamImage`]).
///
/// ZERO fills the page, PAGE copies it, XBZRLE decodes onto the current page
/// with [`xbzrle::decode`] (all-or-nothing), our COMPRESSED record inflates
/// its zstd/zlib frame (bounded, all-or-nothing), each straight into the page the
/// target hands out, so the RAM is held once, wherever the target keeps it.
/// The target sets up its blocks when MEM_SIZE arrives
/// ([`RamTarget::set_blocks`]), bounded by [`Limits::max_ram_bytes`]. Our device
/// sections and the VM description are kept; a foreign section stops
/// loading. `MIG_CMD_SWITCHOVER_START` is counted and skipped; compressed pages, RDMA
/// hooks and other commands are refused
/// ([`FormatError::Unsupported`]). On any error the page concerned is untouched.
#[derive(Debug, Default)]
pub struct Loader<T = RamImage> {
    limits: Limits,
    image: T,
    stats: LoadStats,
    device_states: Vec<OwnedDeviceState>,
    vm_description: Option<Vec<u8>>,
    machine_type: Option<String>,
    file_version: Option<u32>,
    stop: Option<StopReason>,
    foreign: Option<ForeignDeviceState>,
    /// Applies the page records.
    pages: PageApplier,
}

/// The result of [`load`] (and of [`Loader::finish`], for any target `T`).
#[derive(Clone, Debug)]
pub struct Loaded<T = RamImage> {
    /// The reconstructed RAM.
    pub image: T,
    /// Counts and bytes per record kind.
    pub stats: LoadStats,
    /// Where and why reading stopped.
    pub stop: StopReason,
    /// Our device sections, in stream order.
    pub device_states: Vec<OwnedDeviceState>,
    /// The VM description JSON, if read.
    pub vm_description: Option<Vec<u8>>,
    /// Machine type from the configuration section, if any.
    pub machine_type: Option<String>,
    /// File version (3).
    pub file_version: u32,
    /// QEMU's device state after the RAM, kept as bytes (only from
    /// [`Loader::load_to_end`], and only when the stream has some).
    pub foreign_device_state: Option<ForeignDeviceState>,
}

fn fmt_err(offset: u64, kind: FormatError) -> Error {
    Error::Format { offset, kind }
}

/// [`FormatError::Unsupported`] at `offset`.
fn unsupported(offset: u64, what: &'static str) -> Error {
    fmt_err(offset, FormatError::Unsupported { what })
}

impl Loader {
    /// A loader with no RAM yet, allocating at most `limits.max_ram_bytes`.
    pub fn new(limits: Limits) -> Self {
        Loader::with_target(limits, RamImage::default())
    }

    /// A loader that loads onto an existing RAM image, as QEMU's destination
    /// loads onto its own RAM blocks: MEM_SIZE must then list exactly the
    /// image's blocks (names and lengths, in order), else
    /// [`FormatError::BadMemSize`]. Pages the stream does not send keep their
    /// contents. An empty image behaves as [`new`](Self::new).
    pub fn with_image(limits: Limits, image: RamImage) -> Self {
        Loader::with_target(limits, image)
    }

    /// Takes the RAM image out (leaving an empty one), e.g. to reuse it.
    pub fn take_image(&mut self) -> RamImage {
        std::mem::take(&mut self.image)
    }
}

impl<T: RamTarget> Loader<T> {
    /// A loader that loads onto `target`: on MEM_SIZE the target sets up its
    /// blocks or checks them ([`RamTarget::set_blocks`], at most
    /// `limits.max_ram_bytes`), then every page record is applied in place,
    /// in the page [`RamTarget::page_mut`] returns.
    pub fn with_target(limits: Limits, target: T) -> Self {
        Loader {
            limits,
            image: target,
            stats: LoadStats::default(),
            device_states: Vec::new(),
            vm_description: None,
            machine_type: None,
            file_version: None,
            stop: None,
            foreign: None,
            pages: PageApplier::new(),
        }
    }

    /// The RAM so far (the target).
    pub fn image(&self) -> &T {
        &self.image
    }

    /// Counts so far.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// Our device sections so far.
    pub fn device_states(&self) -> &[OwnedDeviceState] {
        &self.device_states
    }

    /// The VM description, once read.
    pub fn vm_description(&self) -> Option<&[u8]> {
        self.vm_description.as_deref()
    }

    /// Machine type, once read.
    pub fn machine_type(&self) -> Option<&str> {
        self.machine_type.as_deref()
    }

    /// Why loading stopped, once it did.
    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.stop.as_ref()
    }

    /// Applies one item that started at stream `offset` and took `len` bytes.
    ///
    /// # Errors
    /// [`Error::Alloc`] when the RAM image cannot be allocated;
    /// [`Error::Format`] for an XBZRLE delta that does not apply
    /// ([`FormatError::Xbzrle`]), a page outside the image, or an
    /// unsupported record. The page is untouched on error.
    pub fn apply(&mut self, offset: u64, item: &Item<'_>, len: usize) -> Result<Control, Error> {
        let s = &mut self.stats;
        match item {
            Item::FileHeader { version } => self.file_version = Some(*version),
            Item::Configuration(c) => self.machine_type = Some(c.machine_type.to_owned()),
            Item::Section(h) => match h.kind {
                SectionKind::Start => s.ram_start += 1,
                SectionKind::Part => s.ram_part += 1,
                SectionKind::End => s.ram_end += 1,
                SectionKind::Full => {}
            },
            Item::Footer { .. } => s.footers += 1,
            Item::Ram(rec) => {
                self.apply_ram(offset, rec, len)?;
            }
            Item::DeviceState(d) => {
                self.stats.device_sections.add(len);
                self.device_states.push(OwnedDeviceState::copied(offset, d));
            }
            Item::ForeignSection(h) => {
                self.stats.bytes = offset;
                self.stop = Some(StopReason::foreign_section(offset, h));
                return Ok(Control::Stop);
            }
            Item::Command { command, data }
                if *command == crate::format::MIG_CMD_SWITCHOVER_START && data.is_empty() =>
            {
                self.stats.switchover_start += 1;
            }
            Item::Command { .. } => {
                return Err(unsupported(
                    offset,
                    "migration command (postcopy/return path)",
                ));
            }
            Item::Eof => {
                self.stop = Some(StopReason::EndOfStream {
                    offset,
                    vm_description: false,
                });
            }
            Item::VmDescription(json) => {
                self.vm_description = Some(json.to_vec());
                if let Some(StopReason::EndOfStream { vm_description, .. }) = &mut self.stop {
                    *vm_description = true;
                }
            }
        }
        self.stats.bytes = offset + len as u64;
        Ok(Control::Continue)
    }

    fn apply_ram(&mut self, offset: u64, rec: &RamRecord<'_>, len: usize) -> Result<(), Error> {
        match *rec {
            RamRecord::MemSize { ref blocks, .. } => {
                self.apply_mem_size(offset, blocks)?;
                self.stats.mem_size.add(len);
            }
            RamRecord::Eos => self.stats.eos.add(len),
            RamRecord::Zero { .. }
            | RamRecord::Page { .. }
            | RamRecord::Xbzrle { .. }
            | RamRecord::Compressed { .. } => {
                self.pages
                    .apply(&mut self.image, offset, rec, len, &mut self.stats)?;
            }
            RamRecord::CompressedPage { .. } => {
                return Err(unsupported(offset, "compressed page (compress capability)"));
            }
            RamRecord::MultifdFlush { .. } => {
                return Err(unsupported(
                    offset,
                    "multifd sync point: the pages travel on multifd channels, which a \
                     single-stream reader does not have",
                ));
            }
            RamRecord::Hook => return Err(unsupported(offset, "RDMA hook record")),
        }
        Ok(())
    }

    /// MEM_SIZE: the target sets up its blocks, or checks that it has
    /// exactly the listed blocks.
    fn apply_mem_size(&mut self, offset: u64, blocks: &[RamBlockInfo]) -> Result<(), Error> {
        self.image
            .set_blocks(blocks, self.limits.max_ram_bytes)
            .map_err(|e| match e {
                TargetError::Alloc { bytes } => Error::Alloc { offset, bytes },
                TargetError::Mismatch { why } => fmt_err(offset, FormatError::BadMemSize { why }),
                TargetError::Other(source) => Error::Target { offset, source },
            })
    }

    /// Reads and applies items from `reader` until the stream ends or a
    /// foreign section is reached.
    ///
    /// # Errors
    /// As [`StreamReader::next_with`] and [`apply`](Self::apply).
    pub fn load_from<R: Read>(&mut self, reader: &mut StreamReader<R>) -> Result<(), Error> {
        while let Some(r) = reader.next_with(|off, item, len| self.apply(off, item, len))? {
            if r? == Control::Stop {
                break;
            }
        }
        if self.stop.is_none() {
            // next_with returned None: the decoder accepted the end of input,
            // which it only does after EOF.
            return Err(fmt_err(
                reader.decoder().position(),
                FormatError::Truncated {
                    what: "stream (no EOF marker)",
                },
            ));
        }
        Ok(())
    }

    /// Reads and applies items from `reader` to the very end of the input: as
    /// [`load_from`](Self::load_from), then, when it stopped at a foreign section (QEMU's
    /// device state after the RAM), reads the rest (at most
    /// `max_device_state_bytes + max_vm_description_bytes` bytes), keeps it as a
    /// [`ForeignDeviceState`] ([`Loaded::foreign_device_state`]) and takes the VM
    /// description from its end. The stop reason then is [`StopReason::EndOfStream`].
    ///
    /// This is what a destination must do: a QEMU source fails the migration when the
    /// destination closes the connection before its device state, EOF and VM description
    /// are read.
    ///
    /// # Errors
    /// As [`load_from`](Self::load_from); [`FormatError::Unsupported`] when a foreign
    /// section comes before the `ram` section's END (the RAM records after it could not be
    /// read); [`FormatError::TooLong`] for a tail over the limit; [`FormatError::Truncated`]
    /// when the input does not end with EOF and a VM description (see
    /// [`split_device_state`]).
    pub fn load_to_end<R: Read>(&mut self, reader: &mut StreamReader<R>) -> Result<(), Error> {
        self.load_from(reader)?;
        let Some(StopReason::ForeignSection {
            offset,
            kind,
            section_id,
            ref name,
            instance_id,
            version_id,
        }) = self.stop
        else {
            return Ok(());
        };
        if self.stats.ram_start > 0 && self.stats.ram_end == 0 {
            return Err(unsupported(
                offset,
                "a device section before the ram section's END (RAM records after it cannot be read)",
            ));
        }
        let mut tail = section_header_bytes(kind, section_id, name, instance_id, version_id);
        let max = self
            .limits
            .max_device_state_bytes
            .saturating_add(self.limits.max_vm_description_bytes);
        let (_, rest) = reader.read_rest(max)?;
        tail.extend_from_slice(&rest);
        let (foreign, vmdesc) = split_device_state(offset, &tail)?;
        self.vm_description = vmdesc.map(<[u8]>::to_vec);
        self.stats.bytes = offset + tail.len() as u64;
        self.stop = Some(StopReason::EndOfStream {
            offset: foreign.eof_offset,
            vm_description: vmdesc.is_some(),
        });
        self.foreign = Some(foreign);
        Ok(())
    }

    /// Ends loading and hands back everything.
    ///
    /// # Errors
    /// [`FormatError::Truncated`] when loading never reached EOF or a foreign section.
    pub fn finish(self) -> Result<Loaded<T>, Error> {
        let stop = self.stop.ok_or_else(|| {
            fmt_err(
                self.stats.bytes,
                FormatError::Truncated {
                    what: "stream (no EOF marker)",
                },
            )
        })?;
        Ok(Loaded {
            image: self.image,
            stats: self.stats,
            stop,
            device_states: self.device_states,
            vm_description: self.vm_description,
            machine_type: self.machine_type,
            file_version: self.file_version.unwrap_or(0),
            foreign_device_state: self.foreign,
        })
    }
}

/// Reads a whole stream from `input` onto a fresh RAM image.
///
/// Stops at EOF (reading the VM description if present) or at the first
/// foreign device section ([`StopReason::ForeignSection`]).
///
/// # Errors
/// [`Error`] with the byte offset: malformed or truncated stream, RAM over
/// `limits.max_ram_bytes`, I/O.
pub fn load<R: Read>(input: R, limits: Limits) -> Result<Loaded, Error> {
    let mut reader = StreamReader::new(input, limits);
    let mut loader = Loader::new(limits);
    loader.load_from(&mut reader)?;
    loader.finish()
}

/// Applies page records (ZERO, PAGE, XBZRLE, our COMPRESSED) onto a [`RamTarget`] and
/// counts them into a [`LoadStats`], exactly as [`Loader`] does; for readers that apply
/// records decoded elsewhere, such as one multifd channel's thread
/// ([`multifd`](crate::multifd)), onto a target it reaches through a lock.
#[derive(Debug, Default)]
pub struct PageApplier {
    /// Made at the first COMPRESSED record (zstd allocates a context): a stream without
    /// one never touches zstd or zlib.
    decompressor: Option<Box<precopy_compress::PageDecompressor>>,
}

impl PageApplier {
    /// An applier (no decompressor until the first COMPRESSED record).
    pub fn new() -> PageApplier {
        PageApplier::default()
    }

    /// Applies the page record `rec` (which started at stream `offset` and took `len`
    /// bytes) onto its page of `target` and counts it in `stats` (kind, bytes, named or
    /// CONTINUE). Records that are not page writes (MEM_SIZE, EOS, ...) are ignored.
    ///
    /// # Errors
    /// [`FormatError::PageOutsideBlock`] when `target` has no such page,
    /// [`FormatError::Xbzrle`] for a delta that does not apply,
    /// [`FormatError::PageCompression`] for a bad frame; all at `offset`, and the page is
    /// untouched.
    pub fn apply<T: RamTarget + ?Sized>(
        &mut self,
        target: &mut T,
        offset: u64,
        rec: &RamRecord<'_>,
        len: usize,
        stats: &mut LoadStats,
    ) -> Result<(), Error> {
        let (block, page, named) = match *rec {
            RamRecord::Zero {
                block,
                offset,
                named,
                ..
            }
            | RamRecord::Page {
                block,
                offset,
                named,
                ..
            }
            | RamRecord::Xbzrle {
                block,
                offset,
                named,
                ..
            }
            | RamRecord::Compressed {
                block,
                offset,
                named,
                ..
            } => (block, offset, named),
            _ => return Ok(()),
        };
        let decompressor = match rec {
            RamRecord::Compressed { .. } => Some(
                self.decompressor
                    .get_or_insert_with(|| Box::new(precopy_compress::PageDecompressor::new())),
            ),
            _ => None,
        };
        write_page(target, offset, block, page, |p| match *rec {
            // As QEMU (`ram_handle_compressed`): write only when the page is
            // not already all `fill`, so never-touched RAM stays unmapped.
            RamRecord::Zero { fill, .. } if fill != 0 || *p != [0u8; PAGE_SIZE] => {
                p.fill(fill);
                Ok(())
            }
            RamRecord::Page { data, .. } => {
                p.copy_from_slice(data);
                Ok(())
            }
            RamRecord::Xbzrle { delta, .. } => {
                xbzrle::decode(delta, p).map_err(|e| fmt_err(offset, FormatError::Xbzrle(e)))
            }
            RamRecord::Compressed { method, frame, .. } => match decompressor {
                Some(d) => d
                    .decompress(method, frame, p)
                    .map_err(|e| fmt_err(offset, FormatError::PageCompression(e))),
                None => Ok(()),
            },
            _ => Ok(()),
        })?;
        match *rec {
            RamRecord::Zero { .. } => stats.zero.add(len),
            RamRecord::Page { .. } => stats.page.add(len),
            RamRecord::Xbzrle { delta, .. } => {
                stats.xbzrle.add(len);
                stats.xbzrle_delta_bytes += delta.len() as u64;
            }
            RamRecord::Compressed {
                method: precopy_compress::Method::Zlib,
                ..
            } => stats.zlib.add(len),
            RamRecord::Compressed { .. } => stats.zstd.add(len),
            _ => {}
        }
        if named {
            stats.records_with_block_name += 1;
        } else {
            stats.records_with_continue += 1;
        }
        Ok(())
    }
}

/// Runs `write` on page `page` of block index `block`, for the record at
/// stream `offset`; [`FormatError::PageOutsideBlock`] when the image has
/// no such page.
fn write_page<T: RamTarget + ?Sized>(
    image: &mut T,
    offset: u64,
    block: usize,
    page: u64,
    write: impl FnOnce(&mut Page) -> Result<(), Error>,
) -> Result<(), Error> {
    let Some(p) = image.page_mut(block, page) else {
        let (name, length) = image
            .block_info(block)
            .map(|(name, len)| (name.to_owned(), len))
            .unwrap_or_else(|| (format!("#{block}"), 0));
        return Err(fmt_err(
            offset,
            FormatError::PageOutsideBlock {
                block: name,
                offset: page,
                length,
            },
        ));
    };
    write(p)
}
