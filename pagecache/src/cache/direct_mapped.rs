//! QEMU's direct-mapped policy (`migration/page_cache.c`), exactly: one slot
//! per page number modulo the slot count; an insert is refused over another
//! page used in this or the previous generation.

use super::{Geometry, Placement, Slots, try_filled};
use crate::Policy;

/// Slot metadata of the direct-mapped policy: per slot the key (page number
/// + 1, 0 = empty) and the age (generation of the last use, QEMU's `it_age`).
#[derive(Clone)]
pub(crate) struct DirectMapped {
    /// `sets` slots of one way.
    geom: Geometry,
    /// Per slot: page number + 1, or 0 for an empty slot.
    keys: Vec<u64>,
    /// Per slot: generation of the last lookup hit or insert (meaningless
    /// for an empty slot).
    ages: Vec<u64>,
}

impl DirectMapped {
    /// Empty slots for `geom` (one way); `None` when they cannot be allocated.
    pub(crate) fn new(geom: Geometry) -> Option<Self> {
        debug_assert_eq!(geom.ways, 1);
        let n = geom.capacity();
        Some(DirectMapped {
            geom,
            keys: try_filled(n, 0u64)?,
            ages: try_filled(n, 0u64)?,
        })
    }

    /// The one slot page number `pn` may use (QEMU: page number mod slots).
    #[inline]
    fn slot(&self, pn: u64) -> usize {
        // Masked to < sets, which is a usize.
        (pn & self.geom.set_mask()) as usize
    }

    #[inline]
    fn record_use(&mut self, slot: usize, key: u64, generation: u64) {
        self.keys[slot] = key;
        self.ages[slot] = generation;
    }
}

impl Slots for DirectMapped {
    fn policy(&self) -> Policy {
        Policy::DirectMapped
    }

    fn geometry(&self) -> Geometry {
        self.geom
    }

    fn empty_like(&self, geom: Geometry) -> Option<Self> {
        DirectMapped::new(geom)
    }

    #[inline]
    fn find(&self, pn: u64) -> Option<usize> {
        let i = self.slot(pn);
        (self.keys[i] == pn + 1).then_some(i)
    }

    #[inline]
    fn lookup(&mut self, pn: u64, generation: u64) -> Option<usize> {
        let i = self.find(pn)?;
        self.ages[i] = generation;
        Some(i)
    }

    /// QEMU `cache_insert`: refuse only over another, fresh page.
    #[inline]
    fn place(&mut self, pn: u64, generation: u64) -> Placement {
        let key = pn + 1;
        let i = self.slot(pn);
        let held = self.keys[i];
        let placement = if held == key {
            Placement::Replaced(i)
        } else if held == 0 {
            Placement::Free(i)
        } else if self.ages[i].wrapping_add(2) > generation {
            return Placement::Refused;
        } else {
            Placement::Evicted(i)
        };
        self.record_use(i, key, generation);
        placement
    }

    fn clear(&mut self) {
        // An empty slot's age is never read.
        self.keys.fill(0);
    }

    fn page_number(&self, slot: usize) -> Option<u64> {
        self.keys[slot].checked_sub(1)
    }

    fn recency_rank(&self, slot: usize) -> u64 {
        u64::MAX - self.ages[slot]
    }

    /// Slot = page number mod a power of two: pages in distinct old slots
    /// stay in distinct new slots, so the canonical geometry keeps them all.
    fn grow_geometry(&self, canonical: Geometry, _: u64, _: &[(u64, usize)]) -> Option<Geometry> {
        Some(canonical)
    }

    fn adopt(&mut self, from: &Self, old: usize) -> Option<usize> {
        let key = from.keys[old];
        let new = self.slot(key - 1);
        if self.keys[new] != 0 {
            return None;
        }
        self.record_use(new, key, from.ages[old]);
        Some(new)
    }
}
