//! The destination's RAM as the loader fills it: [`RamImage`], one
//! [`RamBlock`] per MEM_SIZE block.

use crate::format::{PAGE_SIZE, RamBlockInfo};
use xbzrle::Page;

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

/// The destination's RAM: one zero-filled byte buffer per MEM_SIZE block.
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
