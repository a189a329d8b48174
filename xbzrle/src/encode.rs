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

/// The old side of a page pair: read-only (plain encoding) or the XBZRLE
/// cache's copy, which is brought up to date block by block.
pub(crate) trait OldSide {
    /// Block `b` of the old page.
    fn block(&self, b: usize) -> &Block;
    /// Block `b` differs from `new`: replace it (or do nothing).
    fn sync(&mut self, b: usize, new: &Block);
    /// Blocks `from..` take `new[from..]` (or nothing).
    fn sync_rest(&mut self, from: usize, new: &[Block]);
}

impl OldSide for &[Block] {
    #[inline(always)]
    fn block(&self, b: usize) -> &Block {
        &self[b]
    }
    #[inline(always)]
    fn sync(&mut self, _b: usize, _new: &Block) {}
    #[inline(always)]
    fn sync_rest(&mut self, _from: usize, _new: &[Block]) {}
}

impl OldSide for &mut [Block] {
    #[inline(always)]
    fn block(&self, b: usize) -> &Block {
        &self[b]
    }
    #[inline(always)]
    fn sync(&mut self, b: usize, new: &Block) {
        self[b] = *new;
    }
    #[inline(always)]
    fn sync_rest(&mut self, from: usize, new: &[Block]) {
        if let (Some(dst), Some(src)) = (self.get_mut(from..), new.get(from..)) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = *s;
            }
        }
    }
}

/// An old page (of kind `O`) and the new page, as the walker sees them.
pub(crate) struct PagePair<'a, O> {
    old: O,
    new: &'a [Block],
    new_page: &'a Page,
}

/// Plain encoding: two read-only pages.
pub(crate) type ReadOnly<'a> = PagePair<'a, &'a [Block]>;

/// Encoding against the cached copy, which is brought up to date (cache :=
/// new) in the same pass: unchanged blocks are not written at all.
pub(crate) type Update<'a> = PagePair<'a, &'a mut [Block]>;

impl<'a> ReadOnly<'a> {
    #[inline(always)]
    pub(crate) fn new(old: &'a Page, new: &'a Page) -> Self {
        PagePair {
            old: blocks(old),
            new: blocks(new),
            new_page: new,
        }
    }
}

impl<'a> Update<'a> {
    #[inline(always)]
    pub(crate) fn new(cached: &'a mut Page, new: &'a Page) -> Self {
        PagePair {
            old: blocks_mut(cached),
            new: blocks(new),
            new_page: new,
        }
    }
}

impl<O: OldSide> Pages for PagePair<'_, O> {
    #[inline(always)]
    fn old_block(&self, b: usize) -> &Block {
        self.old.block(b)
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
        self.old.sync(b, &self.new[b]);
    }
    #[inline(always)]
    fn sync_rest(&mut self, from: usize) {
        self.old.sync_rest(from, self.new);
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

/// Slots of the transition ring (a power of two, so indexing never fails).
const RING: usize = 256;
/// Pending transitions that trigger writing out the runs found so far.
const BATCH: usize = 128;

/// Encodes the pages behind `pages` into `out` with the block kernel
/// `eq_mask` (bit `i` of the result set iff byte `i` of both blocks is
/// equal). Inlined into each backend's entry point so that `eq_mask` is
/// compiled with that backend's target features. `hw_popcnt`: the entry
/// point enables `popcnt` (then `count_ones` is one instruction and counts
/// a block's transitions; otherwise they are counted along the way).
///
/// Two phases, interleaved in batches so the scratch stays small:
/// 1. per block, the *transitions* (bytes where changed/unchanged flips
///    relative to the byte before) are appended to a ring of page offsets
///    with a fixed, branch-free 4-way unrolled `trailing_zeros` step. They
///    alternate: literal start, literal end, start, end, ... Unchanged
///    blocks outside a literal cost one compare and one predicted branch.
/// 2. each (start, end) pair becomes one `zrun nzrun literal`. This loop
///    has no data-dependent exits per block, which is what makes dense
///    pages fast; the common pair (one-byte lengths, at most 32 literal
///    bytes, room in `out`) is one branch, a 2-byte header store and one
///    32-byte copy, the rest goes through the exact cursor.
///
/// (Computing all 64 block masks first, then the runs, was 6 % faster on
/// `words25` but 10 to 25 % slower on sparse, unchanged and cold pages.)
///
/// Before a batch is written, its length is bounded from below (2 header
/// bytes per pair plus the literal bytes): when that already exceeds
/// `out.len()` the overflow is certain and no literal byte is copied (random
/// pages fail after one pass of compares).
#[inline(always)]
pub(crate) fn encode_with<P: Pages>(
    pages: &mut P,
    out: &mut [u8],
    eq_mask: impl Fn(&Block, &Block) -> u64,
    hw_popcnt: bool,
) -> Result<usize, EncodeError> {
    let mut w = Cursor { out, pos: 0 };
    let mut ring = [0u16; RING];
    // Transitions in the ring not yet written out (ring[0..n]).
    let mut n = 0usize;
    // 1 when the last byte of the previous block changed.
    let mut carry = 0u64;
    // Page offset where the next zero run starts.
    let mut zstart = 0usize;
    for b in 0..BLOCKS {
        let m = eq_mask(pages.old_block(b), pages.new_block(b));
        if m == u64::MAX && carry == 0 {
            continue;
        }
        if m != u64::MAX {
            pages.sync(b);
        }
        let ne = !m;
        let mut t = ne ^ ((ne << 1) | carry);
        carry = ne >> 63;
        if t == 0 {
            continue; // inside a literal that spans the whole block
        }
        let base = (b * BLOCK) as u16;
        // Unconditional 4 slots (extra ones are overwritten later), then the
        // rest. Four fits dense pages (about 3 transitions per block at 25 %
        // changed words) and measured faster than 2, 5, 6 or 8.
        let cnt = if hw_popcnt {
            let cnt = t.count_ones() as usize;
            for k in 0..4 {
                ring[(n + k) % RING] = base + t.trailing_zeros() as u16;
                t &= t.wrapping_sub(1);
            }
            if cnt > 4 {
                let mut k = 4;
                while t != 0 {
                    ring[(n + k) % RING] = base + t.trailing_zeros() as u16;
                    k += 1;
                    t &= t.wrapping_sub(1);
                }
            }
            cnt
        } else {
            let mut cnt = 0;
            for k in 0..4 {
                ring[(n + k) % RING] = base + t.trailing_zeros() as u16;
                cnt += usize::from(t != 0);
                t &= t.wrapping_sub(1);
            }
            while t != 0 {
                ring[(n + cnt) % RING] = base + t.trailing_zeros() as u16;
                cnt += 1;
                t &= t.wrapping_sub(1);
            }
            cnt
        };
        n += cnt;
        if n >= BATCH {
            if let Err(e) = flush(&mut w, &ring, n & !1, &mut zstart, pages.new_page()) {
                pages.sync_rest(b + 1);
                return Err(e);
            }
            // An odd count leaves a literal open: its start moves to slot 0.
            ring[0] = ring[(n - 1) % RING];
            n &= 1;
        }
    }
    if n % 2 == 1 {
        // The last literal runs to the end of the page.
        ring[n % RING] = PAGE_SIZE as u16;
        n += 1;
    }
    flush(&mut w, &ring, n, &mut zstart, pages.new_page())?;
    Ok(w.pos)
}

/// Writes the `n / 2` (start, end) pairs at the front of `ring`, or fails
/// without copying when they cannot fit (each pair takes at least 2 header
/// bytes plus its literal).
#[inline(always)]
fn flush(
    w: &mut Cursor<'_>,
    ring: &[u16; RING],
    n: usize,
    zstart: &mut usize,
    page: &Page,
) -> Result<(), EncodeError> {
    let pairs = ring.get(..n).unwrap_or_default().as_chunks::<2>().0;
    let mut least = w.pos;
    for &[s, e] in pairs {
        least += 2 + usize::from(e) - usize::from(s);
    }
    if least > w.out.len() {
        return Err(EncodeError::Overflow);
    }
    let mut z = *zstart;
    let mut pos = w.pos;
    // Output offsets from which a header and a 32-byte chunk fit.
    let room = w.out.len().saturating_sub(2 + 32);
    for &[s, e] in pairs {
        let (s, e) = (usize::from(s), usize::from(e));
        let (zrun, nzrun) = (s - z, e - s);
        z = e;
        // The common pair: one-byte lengths, at most 32 literal bytes, with
        // room for a whole 32-byte chunk of page and of output. One branch.
        if (zrun < 0x80) & (nzrun <= 32) & (s <= PAGE_SIZE - 32) & (pos <= room)
            && let (Some(dst), Some(src)) = (w.out.get_mut(pos..pos + 34), page.get(s..s + 32))
        {
            let (head, lit) = dst.split_at_mut(2);
            head.copy_from_slice(&((zrun | nzrun << 8) as u16).to_le_bytes());
            lit.copy_from_slice(src);
            pos += 2 + nzrun;
            continue;
        }
        w.pos = pos;
        w.pair(zrun, nzrun, page, s)?;
        pos = w.pos;
    }
    w.pos = pos;
    *zstart = z;
    Ok(())
}
