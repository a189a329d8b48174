//! The run-walker shared by every backend.
//!
//! A backend supplies one kernel, "64-byte block pair → `u64` equality mask"
//! (bit `i` set when byte `i` of both blocks is equal); this module turns
//! masks into maximal zero runs and literal runs with `trailing_zeros` and
//! writes them through one bounds-checked output cursor. It is written once,
//! in safe code, and inlined into each backend's `#[target_feature]` entry
//! point, so the overflow rule is implemented exactly once: `Err` if and
//! only if the canonical delta is longer than `out.len()`, and nothing is
//! ever written at or past `out.len()`.
#![forbid(unsafe_code)]

use crate::{EncodeError, PAGE_SIZE, Page};

/// Bytes per block handed to a kernel.
pub(crate) const BLOCK: usize = 64;
/// A block of a page.
pub(crate) type Block = [u8; BLOCK];
/// Blocks per page.
pub(crate) const BLOCKS: usize = PAGE_SIZE / BLOCK;

/// The blocks of a page (exactly [`BLOCKS`] of them).
#[inline(always)]
pub(crate) fn blocks(page: &Page) -> &[Block] {
    page.as_chunks::<BLOCK>().0
}

/// The blocks of a page, mutably.
#[inline(always)]
fn blocks_mut(page: &mut Page) -> &mut [Block] {
    page.as_chunks_mut::<BLOCK>().0
}

/// Where the walker reads the old and new page, and what it does with each
/// block it has compared (nothing, or copy it into the XBZRLE cache).
pub(crate) trait Pages {
    /// Block `b` of the old page. Read once per block, before [`Pages::sync`].
    fn old_block(&self, b: usize) -> &Block;
    /// Block `b` of the new page.
    fn new_block(&self, b: usize) -> &Block;
    /// The whole new page (source of literal bytes).
    fn new_page(&self) -> &Page;
    /// Block `b` was compared and is not equal: the old copy may now be
    /// replaced.
    fn sync(&mut self, b: usize);
    /// Blocks `from..` may not have been synced (the walk stopped early).
    fn sync_rest(&mut self, from: usize);
}

/// Plain encoding: two read-only pages.
pub(crate) struct ReadOnly<'a> {
    old: &'a [Block],
    new: &'a [Block],
    new_page: &'a Page,
}

impl<'a> ReadOnly<'a> {
    #[inline(always)]
    pub(crate) fn new(old: &'a Page, new: &'a Page) -> Self {
        ReadOnly {
            old: blocks(old),
            new: blocks(new),
            new_page: new,
        }
    }
}

impl Pages for ReadOnly<'_> {
    #[inline(always)]
    fn old_block(&self, b: usize) -> &Block {
        &self.old[b]
    }
    #[inline(always)]
    fn new_block(&self, b: usize) -> &Block {
        &self.new[b]
    }
    #[inline(always)]
    fn new_page(&self) -> &Page {
        self.new_page
    }
    #[inline(always)]
    fn sync(&mut self, _b: usize) {}
    #[inline(always)]
    fn sync_rest(&mut self, _from: usize) {}
}

/// Encoding against the cached copy, which is brought up to date (cache :=
/// new) in the same pass: unchanged blocks are not written at all.
pub(crate) struct Update<'a> {
    cached: &'a mut [Block],
    new: &'a [Block],
    new_page: &'a Page,
}

impl<'a> Update<'a> {
    #[inline(always)]
    pub(crate) fn new(cached: &'a mut Page, new: &'a Page) -> Self {
        Update {
            cached: blocks_mut(cached),
            new: blocks(new),
            new_page: new,
        }
    }
}

impl Pages for Update<'_> {
    #[inline(always)]
    fn old_block(&self, b: usize) -> &Block {
        &self.cached[b]
    }
    #[inline(always)]
    fn new_block(&self, b: usize) -> &Block {
        &self.new[b]
    }
    #[inline(always)]
    fn new_page(&self) -> &Page {
        self.new_page
    }
    #[inline(always)]
    fn sync(&mut self, b: usize) {
        self.cached[b] = self.new[b];
    }
    #[inline(always)]
    fn sync_rest(&mut self, from: usize) {
        if let (Some(dst), Some(src)) = (self.cached.get_mut(from..), self.new.get(from..)) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = *s;
            }
        }
    }
}

/// ULEB128 "small" of `v` (≤ 0x3fff) as little-endian bytes in a `u32`, and
/// its length (1 or 2).
#[inline(always)]
fn uleb(v: usize) -> (u32, usize) {
    let v = v as u32;
    if v < 0x80 {
        (v, 1)
    } else {
        ((v & 0x7f) | 0x80 | ((v >> 7) << 8), 2)
    }
}

/// The single output cursor: every byte of a delta is written through it,
/// and every write is bounds-checked against `out`.
struct Cursor<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Cursor<'_> {
    /// Appends one pair: zero-run length `zrun`, literal length `nzrun`, and
    /// the literal `page[s..s + nzrun]`. Fails, having written nothing past
    /// `out.len()`, exactly when the pair does not fit.
    ///
    /// Fast paths copy a whole 32- or 64-byte chunk of literal (and 4 header
    /// bytes) when both the output and the page have room for it; the bytes
    /// past the pair are scratch that the next pair overwrites (or that stay
    /// past the returned length).
    #[inline(always)]
    fn pair(
        &mut self,
        zrun: usize,
        nzrun: usize,
        page: &Page,
        s: usize,
    ) -> Result<(), EncodeError> {
        let (zh, zl) = uleb(zrun);
        let (nh, nl) = uleb(nzrun);
        let head = zh | (nh << (8 * zl));
        let hl = zl + nl;
        let pos = self.pos;
        if nzrun <= 32 {
            if let (Some(dst), Some(src)) =
                (self.out.get_mut(pos..pos + 4 + 32), page.get(s..s + 32))
            {
                dst[..4].copy_from_slice(&head.to_le_bytes());
                dst[hl..hl + 32].copy_from_slice(src);
                self.pos = pos + hl + nzrun;
                return Ok(());
            }
        } else if nzrun <= 64
            && let (Some(dst), Some(src)) =
                (self.out.get_mut(pos..pos + 4 + 64), page.get(s..s + 64))
        {
            dst[..4].copy_from_slice(&head.to_le_bytes());
            dst[hl..hl + 64].copy_from_slice(src);
            self.pos = pos + hl + nzrun;
            return Ok(());
        }
        // Exact path: long literals (one bulk copy), and pairs near the end
        // of `out` or of the page.
        let end = pos + hl + nzrun;
        let (Some(dst), Some(src)) = (self.out.get_mut(pos..end), page.get(s..s + nzrun)) else {
            return Err(EncodeError::Overflow);
        };
        let (h, lit) = dst.split_at_mut(hl);
        h.copy_from_slice(&head.to_le_bytes()[..hl]);
        lit.copy_from_slice(src);
        self.pos = end;
        Ok(())
    }
}

/// Encodes the pages behind `pages` into `out` with the block kernel
/// `eq_mask` (bit `i` of the result set iff byte `i` of both blocks is
/// equal). Inlined into each backend's entry point so that `eq_mask` is
/// compiled with that backend's target features.
#[inline(always)]
pub(crate) fn encode_with<P: Pages>(
    pages: &mut P,
    out: &mut [u8],
    eq_mask: impl Fn(&Block, &Block) -> u64,
) -> Result<usize, EncodeError> {
    let mut w = Cursor { out, pos: 0 };
    // Index of the next block to compare.
    let mut next = 0;
    // Changed-byte bits of block `next - 1` at or after the current position.
    let mut ne = 0u64;
    // Page offset where the current zero run starts.
    let mut zstart = 0;
    loop {
        // Zero run: find the first changed byte, skipping equal blocks.
        while ne == 0 {
            if next == BLOCKS {
                // The trailing zero run is not written.
                return Ok(w.pos);
            }
            let m = eq_mask(pages.old_block(next), pages.new_block(next));
            if m != u64::MAX {
                ne = !m;
                pages.sync(next);
            }
            next += 1;
        }
        let s = (next - 1) * BLOCK + ne.trailing_zeros() as usize;
        // Literal run: find the first unchanged byte at or after `s`.
        let mut eq = !ne & (u64::MAX << (s % BLOCK));
        while eq == 0 && next < BLOCKS {
            eq = eq_mask(pages.old_block(next), pages.new_block(next));
            pages.sync(next);
            next += 1;
        }
        let e = if eq == 0 {
            PAGE_SIZE
        } else {
            (next - 1) * BLOCK + eq.trailing_zeros() as usize
        };
        if let Err(err) = w.pair(s - zstart, e - s, pages.new_page(), s) {
            pages.sync_rest(next);
            return Err(err);
        }
        zstart = e;
        // Changed bytes of the current block after the literal (none when
        // the literal ran to the end of the page: the loop then returns).
        ne = if eq == 0 {
            0
        } else {
            !eq & (u64::MAX << (e % BLOCK))
        };
    }
}
