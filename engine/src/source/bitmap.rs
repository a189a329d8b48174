//! The migration bitmap (QEMU `RAMBlock::bmap`): one bit per page of every RAM block, set
//! while the page still has to be sent, with the count of set bits and the cursor where the
//! current pass is.

use crate::guest::{DirtyLog, GuestError, RamBlockInfo, block_pages};

/// Pages counted by one [`DirtyBitmap::sync`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SyncCount {
    /// Dirty pages after the sync (the bitmap's set bits).
    pub(crate) dirty: u64,
    /// Pages the sync set that were not set before (newly dirtied since the last sync).
    pub(crate) newly: u64,
}

/// The migration bitmap of every RAM block (bit `i % 64` of word `i / 64` is page `i`, as in
/// the [`DirtyLog`] contract). Bits past a block's last page are always clear (the tail
/// mask, applied in one place: [`DirtyBitmap::mask_tail`]).
#[derive(Debug)]
pub(crate) struct DirtyBitmap {
    words: Vec<Vec<u64>>,
    pages: Vec<u64>,
    dirty: u64,
    cursor_block: usize,
    cursor_word: usize,
}

impl DirtyBitmap {
    /// Every page of `blocks` dirty (the first pass sends every page), cursor at the start.
    pub(crate) fn all_dirty(blocks: &[RamBlockInfo]) -> DirtyBitmap {
        let mut bm = DirtyBitmap {
            words: Vec::with_capacity(blocks.len()),
            pages: Vec::with_capacity(blocks.len()),
            dirty: 0,
            cursor_block: 0,
            cursor_word: 0,
        };
        for b in blocks {
            let pages = block_pages(b);
            let mut words = vec![u64::MAX; pages.div_ceil(64) as usize];
            Self::mask_tail(&mut words, pages);
            bm.words.push(words);
            bm.pages.push(pages);
            bm.dirty += pages;
        }
        bm
    }

    /// Clear the bits past the last page of a block of `pages` pages.
    fn mask_tail(words: &mut [u64], pages: u64) {
        if !pages.is_multiple_of(64)
            && let Some(l) = words.last_mut()
        {
            *l &= (1u64 << (pages % 64)) - 1;
        }
    }

    /// Pages still to send.
    pub(crate) fn dirty_pages(&self) -> u64 {
        self.dirty
    }

    /// One dirty-bitmap sync (QEMU `migration_bitmap_sync`): fetch-and-clear the guest's
    /// dirty log of every block, in block order, into this bitmap.
    ///
    /// Errors: the guest's; the bitmap then holds what was fetched so far.
    pub(crate) fn sync(&mut self, log: &dyn DirtyLog) -> Result<SyncCount, GuestError> {
        let mut count = SyncCount::default();
        for (i, (words, &pages)) in self.words.iter_mut().zip(&self.pages).enumerate() {
            let before: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
            log.fetch_and_clear(i, words)?;
            Self::mask_tail(words, pages);
            let after: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
            count.dirty += after;
            count.newly += after - before;
        }
        self.dirty = count.dirty;
        Ok(count)
    }

    /// Take the next dirty page `(block, page)` from the cursor on, clearing its bit, or
    /// `None` at the end of the pass (the cursor then restarts at the first block).
    /// The page [`next_dirty`](Self::next_dirty) would return, without taking it (only
    /// looks in the cursor's block; `None` past its end).
    pub(crate) fn peek_dirty(&self) -> Option<(usize, u64)> {
        let words = self.words.get(self.cursor_block)?;
        let rest = words.get(self.cursor_word..)?;
        let (i, w) = rest.iter().enumerate().take(64).find(|(_, w)| **w != 0)?;
        let page = (self.cursor_word + i) as u64 * 64 + u64::from(w.trailing_zeros());
        Some((self.cursor_block, page))
    }

    pub(crate) fn next_dirty(&mut self) -> Option<(usize, u64)> {
        while self.cursor_block < self.words.len() {
            let words = &mut self.words[self.cursor_block];
            while self.cursor_word < words.len() {
                let w = words[self.cursor_word];
                if w != 0 {
                    let bit = w.trailing_zeros();
                    words[self.cursor_word] = w & (w - 1);
                    self.dirty -= 1;
                    let page = self.cursor_word as u64 * 64 + u64::from(bit);
                    return Some((self.cursor_block, page));
                }
                self.cursor_word += 1;
            }
            self.cursor_block += 1;
            self.cursor_word = 0;
        }
        self.cursor_block = 0;
        self.cursor_word = 0;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::sim::{SimConfig, SimGuest};

    #[test]
    fn tail_is_masked_and_the_cursor_walks_every_page_once() {
        let blocks = [
            RamBlockInfo::new("a", 70 * 4096),
            RamBlockInfo::new("b", 4096),
        ];
        let mut bm = DirtyBitmap::all_dirty(&blocks);
        assert_eq!(bm.dirty_pages(), 71);
        let mut seen = Vec::new();
        while let Some(p) = bm.next_dirty() {
            seen.push(p);
        }
        assert_eq!(seen.len(), 71);
        assert_eq!(seen[69], (0, 69));
        assert_eq!(seen[70], (1, 0));
        assert_eq!(bm.dirty_pages(), 0);
        // A sync ORs in the guest's log; the tail stays clear whatever the log says.
        let g = SimGuest::new(SimConfig {
            blocks: vec![("a".into(), 70 * 4096), ("b".into(), 4096)],
            ..SimConfig::default()
        })
        .unwrap();
        g.write_page(0, 65, &[1; 4096]).unwrap();
        let c = bm.sync(&g).unwrap();
        assert_eq!(c, SyncCount { dirty: 1, newly: 1 });
        assert_eq!(bm.next_dirty(), Some((0, 65)));
        assert_eq!(bm.next_dirty(), None);
    }
}
