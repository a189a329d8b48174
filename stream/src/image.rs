//! Where the loader puts RAM records: the [`RamTarget`] trait, and its
//! default implementation [`RamImage`], one [`RamBlock`] per MEM_SIZE block.

use crate::format::{PAGE_SIZE, RamBlockInfo};
use xbzrle::Page;

/// Why a [`RamTarget`] refused a MEM_SIZE block list; the loader turns it into an
/// [`Error`](crate::Error) at the MEM_SIZE record's offset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The RAM asked for (`bytes` in total) is over the limit or cannot be had
    /// ([`Error::Alloc`](crate::Error::Alloc)).
    #[error("cannot allocate {bytes} bytes of RAM")]
    Alloc {
        /// Total bytes of the block list.
        bytes: u64,
    },
    /// The block list is not the target's own
    /// ([`FormatError::BadMemSize`](crate::FormatError::BadMemSize)).
    #[error("{why}")]
    Mismatch {
        /// What does not match.
        why: &'static str,
    },
    /// The target could not take these blocks for a reason of its own, e.g. a VMM
    /// error ([`Error::Target`](crate::Error::Target)).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// Where RAM records land: the destination's RAM blocks as the
/// [`Loader`](crate::Loader) fills them.
///
/// The loader calls [`set_blocks`](RamTarget::set_blocks) for each MEM_SIZE record,
/// then [`page_mut`](RamTarget::page_mut) for each ZERO, PAGE and XBZRLE record, and
/// nothing else while loading. Blocks are addressed by their index in the MEM_SIZE
/// list, pages by their byte offset in the block (a multiple of [`PAGE_SIZE`]). Read
/// access ([`block_parts`](RamTarget::block_parts)) is for what comes after loading,
/// such as a digest of the RAM received.
///
/// [`RamImage`] (plain heap buffers) is the default target; a VMM implements this
/// trait for its guest memory so that records are loaded straight into the guest.
pub trait RamTarget {
    /// MEM_SIZE listed `blocks` (at most `max_bytes` in total may be allocated): set
    /// them up, or, when the target already has blocks, check that they are exactly
    /// these (names and lengths, in order).
    ///
    /// # Errors
    /// [`TargetError::Alloc`] for RAM over `max_bytes` or that cannot be had,
    /// [`TargetError::Mismatch`] for a block list that is not the target's,
    /// [`TargetError::Other`] for anything else.
    fn set_blocks(&mut self, blocks: &[RamBlockInfo], max_bytes: u64) -> Result<(), TargetError>;

    /// Number of blocks (0 before MEM_SIZE).
    fn block_count(&self) -> usize;

    /// Name and length in bytes of block index `block`.
    fn block_info(&self, block: usize) -> Option<(&str, u64)>;

    /// The page at byte `offset` of block index `block`, mutably; `None` when it
    /// does not lie inside the block.
    fn page_mut(&mut self, block: usize, offset: u64) -> Option<&mut Page>;

    /// The bytes of block index `block`, in order, as one or more contiguous parts
    /// (concatenated they are the whole block; empty for no such block).
    fn block_parts(&self, block: usize) -> Vec<&[u8]>;

    /// Total bytes over all blocks.
    fn total_bytes(&self) -> u64 {
        (0..self.block_count())
            .filter_map(|b| self.block_info(b))
            .map(|(_, len)| len)
            .sum()
    }
}

/// One RAM block's contents at the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    name: String,
    data: Vec<u8>,
}

impl RamBlock {
    /// The block's id string.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The block's bytes (`used_length` of them).
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// The block's bytes, mutably.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
    /// `used_length` in bytes.
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }
    /// True for a block of no bytes (never produced by MEM_SIZE).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The destination's RAM: one zero-filled byte buffer per MEM_SIZE block; the
/// default [`RamTarget`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamImage {
    blocks: Vec<RamBlock>,
}

impl RamImage {
    /// Allocates zeroed blocks for `infos`, refusing more than `max_bytes`
    /// in total (checked before anything is allocated).
    ///
    /// # Errors
    /// `Err(bytes)` with the total asked for, when it is over `max_bytes`
    /// or the allocation fails.
    pub fn new(infos: &[RamBlockInfo], max_bytes: u64) -> Result<Self, u64> {
        let total = infos
            .iter()
            .try_fold(0u64, |a, b| a.checked_add(b.used_length))
            .unwrap_or(u64::MAX);
        if total > max_bytes {
            return Err(total);
        }
        let mut blocks = Vec::with_capacity(infos.len());
        for b in infos {
            let len = usize::try_from(b.used_length).map_err(|_| total)?;
            // Probe that the allocation can be had (without aborting), then
            // take zeroed memory from the allocator: for large blocks that is
            // fresh, lazily zeroed pages, so untouched RAM costs nothing.
            let mut probe: Vec<u8> = Vec::new();
            probe.try_reserve_exact(len).map_err(|_| total)?;
            drop(probe);
            let data = vec![0u8; len];
            blocks.push(RamBlock {
                name: b.name.clone(),
                data,
            });
        }
        Ok(RamImage { blocks })
    }

    /// The blocks in MEM_SIZE order.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// The block named `name`.
    pub fn block(&self, name: &str) -> Option<&RamBlock> {
        self.blocks.iter().find(|b| b.name == name)
    }

    /// Total bytes over all blocks.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(RamBlock::len).sum()
    }

    /// The blocks, mutably (their contents; names and lengths stay).
    pub fn blocks_mut(&mut self) -> &mut [RamBlock] {
        &mut self.blocks
    }

    /// The page at byte `offset` of block index `block`, if it lies inside.
    pub fn page(&self, block: usize, offset: u64) -> Option<&Page> {
        let b = self.blocks.get(block)?;
        let o = usize::try_from(offset).ok()?;
        b.data.get(o..o.checked_add(PAGE_SIZE)?)?.try_into().ok()
    }

    /// The page at byte `offset` of block index `block`, mutably.
    pub fn page_mut(&mut self, block: usize, offset: u64) -> Option<&mut Page> {
        let b = self.blocks.get_mut(block)?;
        let o = usize::try_from(offset).ok()?;
        b.data
            .get_mut(o..o.checked_add(PAGE_SIZE)?)?
            .try_into()
            .ok()
    }
}

/// Allocates the blocks on the first MEM_SIZE ([`RamImage::new`]); a later one, or
/// one for an image made beforehand, must list exactly the image's blocks.
impl RamTarget for RamImage {
    fn set_blocks(&mut self, blocks: &[RamBlockInfo], max_bytes: u64) -> Result<(), TargetError> {
        if self.blocks.is_empty() {
            *self =
                RamImage::new(blocks, max_bytes).map_err(|bytes| TargetError::Alloc { bytes })?;
            return Ok(());
        }
        let same = self.blocks.len() == blocks.len()
            && self
                .blocks
                .iter()
                .zip(blocks)
                .all(|(have, want)| have.name == want.name && have.len() == want.used_length);
        if !same {
            return Err(TargetError::Mismatch {
                why: "block list does not match the destination's RAM blocks",
            });
        }
        Ok(())
    }

    fn block_count(&self) -> usize {
        self.blocks.len()
    }

    fn block_info(&self, block: usize) -> Option<(&str, u64)> {
        self.blocks.get(block).map(|b| (b.name(), b.len()))
    }

    fn page_mut(&mut self, block: usize, offset: u64) -> Option<&mut Page> {
        RamImage::page_mut(self, block, offset)
    }

    fn block_parts(&self, block: usize) -> Vec<&[u8]> {
        self.blocks
            .get(block)
            .map(|b| vec![b.data()])
            .unwrap_or_default()
    }

    fn total_bytes(&self) -> u64 {
        RamImage::total_bytes(self)
    }
}
