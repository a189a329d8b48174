//! The diff snapshot file (our extension): the pages dirtied since the previous snapshot.
//!
//! ```text
//! "PCPYDIFF"                     magic (8 bytes)
//! be32 1                         version
//! [16] id, [16] parent id        this snapshot, and the one it applies onto
//! be64 sequence                  0 = the full snapshot, then 1, 2, ...
//! be32 n, n × (u8 len + name, be64 used length)   RAM blocks (must equal the base's)
//! be64 m, m records:
//!     u8 kind, be32 block, be64 page index
//!     kind 1 ZERO:   nothing
//!     kind 2 RAW:    4096 bytes
//!     kind 3 XBZRLE: be16 length (1..=4096), the delta (against the page as the chain left it)
//! be32 k, k device sections: u8 len + name, be32 instance, be32 version, be32 len, payload
//! [32] BLAKE3 of every byte before it
//! "PCPYEND\0"                    end magic (8 bytes)
//! ```
//!
//! Records apply in order (a page may appear more than once: copied while the guest ran,
//! then again in the final pass). The trailer makes a torn or corrupted file fail before
//! any of it is applied. Every count and length is checked against the file size and
//! [`Limits`](precopy_stream::Limits) before use.

use xbzrle::{PAGE_SIZE, Page};

use super::{SnapshotError, SnapshotId};
use crate::guest::{DeviceStateEntry, RamBlockInfo};

/// Magic at the start of a diff file.
pub const DIFF_MAGIC: &[u8; 8] = b"PCPYDIFF";
/// Magic at the end of a diff file.
pub const DIFF_END_MAGIC: &[u8; 8] = b"PCPYEND\0";
/// Version of the diff format.
pub const DIFF_VERSION: u32 = 1;
const TRAILER: usize = 32 + 8;

/// What a record makes of its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffRecordKind {
    /// The page is all zeros.
    Zero = 1,
    /// The page's bytes follow.
    Raw = 2,
    /// An XBZRLE delta against the page as the chain left it.
    Xbzrle = 3,
}

/// Builds a diff file in memory.
pub(crate) struct DiffBuilder {
    buf: Vec<u8>,
    count_at: usize,
    records: u64,
}

impl DiffBuilder {
    pub(crate) fn new(
        id: SnapshotId,
        parent: SnapshotId,
        seq: u64,
        blocks: &[RamBlockInfo],
    ) -> Self {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(DIFF_MAGIC);
        buf.extend_from_slice(&DIFF_VERSION.to_be_bytes());
        buf.extend_from_slice(&id.0);
        buf.extend_from_slice(&parent.0);
        buf.extend_from_slice(&seq.to_be_bytes());
        buf.extend_from_slice(&(blocks.len() as u32).to_be_bytes());
        for b in blocks {
            buf.push(b.name.len() as u8);
            buf.extend_from_slice(b.name.as_bytes());
            buf.extend_from_slice(&b.used_length.to_be_bytes());
        }
        let count_at = buf.len();
        buf.extend_from_slice(&0u64.to_be_bytes());
        DiffBuilder {
            buf,
            count_at,
            records: 0,
        }
    }

    fn head(&mut self, kind: DiffRecordKind, block: usize, page: u64) {
        self.buf.push(kind as u8);
        self.buf.extend_from_slice(&(block as u32).to_be_bytes());
        self.buf.extend_from_slice(&page.to_be_bytes());
        self.records += 1;
    }

    pub(crate) fn zero(&mut self, block: usize, page: u64) {
        self.head(DiffRecordKind::Zero, block, page);
    }

    pub(crate) fn raw(&mut self, block: usize, page: u64, data: &Page) {
        self.head(DiffRecordKind::Raw, block, page);
        self.buf.extend_from_slice(data);
    }

    pub(crate) fn xbzrle(&mut self, block: usize, page: u64, delta: &[u8]) {
        self.head(DiffRecordKind::Xbzrle, block, page);
        self.buf
            .extend_from_slice(&(delta.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(delta);
    }

    /// Appends the device sections and the trailer; returns the file bytes.
    pub(crate) fn finish(mut self, devices: &[DeviceStateEntry]) -> Vec<u8> {
        let n = self.records.to_be_bytes();
        self.buf[self.count_at..self.count_at + 8].copy_from_slice(&n);
        self.buf
            .extend_from_slice(&(devices.len() as u32).to_be_bytes());
        for (name, inst, ver, payload) in devices {
            self.buf.push(name.len().min(255) as u8);
            self.buf
                .extend_from_slice(&name.as_bytes()[..name.len().min(255)]);
            self.buf.extend_from_slice(&inst.to_be_bytes());
            self.buf.extend_from_slice(&ver.to_be_bytes());
            self.buf
                .extend_from_slice(&(payload.len() as u32).to_be_bytes());
            self.buf.extend_from_slice(payload);
        }
        let sum = blake3::hash(&self.buf);
        self.buf.extend_from_slice(sum.as_bytes());
        self.buf.extend_from_slice(DIFF_END_MAGIC);
        self.buf
    }
}

/// A diff record, borrowed from the file bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffRecord<'a> {
    /// File offset of the record.
    pub offset: u64,
    /// What it makes of the page.
    pub kind: DiffRecordKind,
    /// Block index.
    pub block: usize,
    /// Page index in the block.
    pub page: u64,
    /// RAW: the page; XBZRLE: the delta; ZERO: empty.
    pub data: &'a [u8],
}

/// A checked diff file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffFile<'a> {
    /// This snapshot.
    pub id: SnapshotId,
    /// The snapshot it applies onto.
    pub parent: SnapshotId,
    /// Position in the chain (≥ 1).
    pub sequence: u64,
    /// RAM blocks.
    pub blocks: Vec<RamBlockInfo>,
    /// Records, in file order.
    pub records: Vec<DiffRecord<'a>>,
    /// Device sections.
    pub device_states: Vec<DeviceStateEntry>,
}

struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(SnapshotError::Corrupt {
                offset: self.pos as u64,
                why: what,
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, SnapshotError> {
        Ok(self.take(1, what)?[0])
    }
    fn be16(&mut self, what: &'static str) -> Result<u16, SnapshotError> {
        Ok(u16::from_be_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn be32(&mut self, what: &'static str) -> Result<u32, SnapshotError> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn be64(&mut self, what: &'static str) -> Result<u64, SnapshotError> {
        Ok(u64::from_be_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    fn id(&mut self, what: &'static str) -> Result<SnapshotId, SnapshotError> {
        Ok(SnapshotId(self.take(16, what)?.try_into().expect("16")))
    }
    fn name(&mut self, what: &'static str) -> Result<String, SnapshotError> {
        let at = self.pos as u64;
        let n = self.u8(what)? as usize;
        let raw = self.take(n, what)?;
        if raw.is_empty() {
            return Err(SnapshotError::Corrupt {
                offset: at,
                why: "empty name",
            });
        }
        String::from_utf8(raw.to_vec()).map_err(|_| SnapshotError::Corrupt {
            offset: at,
            why: "name is not UTF-8",
        })
    }
}

impl<'a> DiffFile<'a> {
    /// Checks the trailer (length, end magic, BLAKE3 of the rest), then parses every field
    /// with bounds checks. `limits` bounds the block list, RAM and device state.
    ///
    /// # Errors
    /// [`SnapshotError::Torn`] when the trailer is missing or the checksum does not match;
    /// [`SnapshotError::Corrupt`] (with the offset) for a bad field.
    pub fn parse(b: &'a [u8], limits: &precopy_stream::Limits) -> Result<Self, SnapshotError> {
        if b.len() < DIFF_MAGIC.len() + TRAILER || &b[..8] != DIFF_MAGIC {
            return Err(SnapshotError::Corrupt {
                offset: 0,
                why: "not a diff snapshot (bad magic or too short)",
            });
        }
        let body_end = b.len() - TRAILER;
        if &b[b.len() - 8..] != DIFF_END_MAGIC
            || blake3::hash(&b[..body_end]).as_bytes()[..] != b[body_end..body_end + 32]
        {
            return Err(SnapshotError::Torn {
                offset: body_end as u64,
            });
        }
        let mut c = Cur {
            b: &b[..body_end],
            pos: 8,
        };
        let v = c.be32("version")?;
        if v != DIFF_VERSION {
            return Err(SnapshotError::Corrupt {
                offset: 8,
                why: "unsupported diff version",
            });
        }
        let id = c.id("id")?;
        let parent = c.id("parent id")?;
        let sequence = c.be64("sequence")?;
        let nb_at = c.pos as u64;
        let nb = c.be32("block count")? as usize;
        if nb == 0 || nb > limits.max_blocks {
            return Err(SnapshotError::Corrupt {
                offset: nb_at,
                why: "block count is 0 or over the limit",
            });
        }
        let mut blocks = Vec::with_capacity(nb);
        let mut total = 0u64;
        for _ in 0..nb {
            let at = c.pos as u64;
            let name = c.name("block name")?;
            let len = c.be64("block length")?;
            total = total.saturating_add(len);
            if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) || total > limits.max_ram_bytes {
                return Err(SnapshotError::Corrupt {
                    offset: at,
                    why: "block length zero, unaligned or over the RAM limit",
                });
            }
            blocks.push(RamBlockInfo::new(name, len));
        }
        let n_at = c.pos as u64;
        let n = c.be64("record count")?;
        // Each record takes at least 13 bytes: the count is bounded by the file.
        if n > (body_end as u64) / 13 {
            return Err(SnapshotError::Corrupt {
                offset: n_at,
                why: "record count larger than the file",
            });
        }
        let mut records = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let offset = c.pos as u64;
            let k = c.u8("record kind")?;
            let block = c.be32("record block")? as usize;
            let page = c.be64("record page")?;
            let Some(bi) = blocks.get(block) else {
                return Err(SnapshotError::Corrupt {
                    offset,
                    why: "record names a block that does not exist",
                });
            };
            if page >= bi.used_length / PAGE_SIZE as u64 {
                return Err(SnapshotError::Corrupt {
                    offset,
                    why: "record page past the end of its block",
                });
            }
            let (kind, data) = match k {
                1 => (DiffRecordKind::Zero, &[][..]),
                2 => (DiffRecordKind::Raw, c.take(PAGE_SIZE, "RAW page")?),
                3 => {
                    let len = c.be16("XBZRLE length")? as usize;
                    if len == 0 || len > PAGE_SIZE {
                        return Err(SnapshotError::Corrupt {
                            offset,
                            why: "XBZRLE length 0 or over 4096",
                        });
                    }
                    (DiffRecordKind::Xbzrle, c.take(len, "XBZRLE delta")?)
                }
                _ => {
                    return Err(SnapshotError::Corrupt {
                        offset,
                        why: "unknown record kind",
                    });
                }
            };
            records.push(DiffRecord {
                offset,
                kind,
                block,
                page,
                data,
            });
        }
        let nd_at = c.pos as u64;
        let nd = c.be32("device count")? as usize;
        if nd > 1024 {
            return Err(SnapshotError::Corrupt {
                offset: nd_at,
                why: "device section count over 1024",
            });
        }
        let mut device_states = Vec::new();
        for _ in 0..nd {
            let at = c.pos as u64;
            let name = c.name("device name")?;
            let inst = c.be32("device instance")?;
            let ver = c.be32("device version")?;
            let len = c.be32("device length")? as usize;
            if len > limits.max_device_state_bytes {
                return Err(SnapshotError::Corrupt {
                    offset: at,
                    why: "device state over the limit",
                });
            }
            let payload = c.take(len, "device state")?.to_vec();
            device_states.push((name, inst, ver, payload));
        }
        if c.pos != body_end {
            return Err(SnapshotError::Corrupt {
                offset: c.pos as u64,
                why: "bytes after the device sections",
            });
        }
        Ok(DiffFile {
            id,
            parent,
            sequence,
            blocks,
            records,
            device_states,
        })
    }
}
