//! The cache itself: one slot array (metadata) and one page array (data),
//! both allocated once per geometry and indexed by the same slot number.

use crate::{CacheError, Insert, MAX_WAYS, Policy};
use xbzrle::{PAGE_SIZE, Page};

/// Page size as `u64`, for address arithmetic.
const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// Bits of a set-associative stamp that hold the per-generation access tick.
const TICK_BITS: u32 = 24;
/// Largest tick; later accesses in the same generation share it.
const TICK_MAX: u64 = (1 << TICK_BITS) - 1;
/// Largest generation a set-associative stamp can hold; larger generations
/// are clamped to it (a sync every microsecond for 12 days).
pub(crate) const GEN_MAX: u64 = (1 << (64 - TICK_BITS)) - 1;

/// Metadata of one slot: 16 bytes, the whole per-page overhead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    /// Page number + 1 (`addr / PAGE_SIZE + 1`); 0 marks an empty slot.
    tag: u64,
    /// When the page was last used. Direct-mapped: the generation (QEMU's
    /// `it_age`). Set-associative: `generation << 24 | tick`, so comparing
    /// stamps orders by generation, then by access order inside it.
    stamp: u64,
}

const _: () = assert!(core::mem::size_of::<Slot>() == 16);

/// Shape of a cache: `sets * ways` slots, `sets` a power of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) sets: usize,
    pub(crate) ways: usize,
}

impl Geometry {
    pub(crate) fn capacity(self) -> usize {
        // Never overflows: built from a page count that fits in usize.
        self.sets * self.ways
    }

    /// The canonical geometry of `policy` for a budget, or the typed error.
    pub(crate) fn for_budget(policy: Policy, budget_bytes: u64) -> Result<Geometry, CacheError> {
        let pages = budget_bytes / PAGE_SIZE_U64;
        if pages == 0 {
            return Err(CacheError::BudgetTooSmall {
                budget_bytes,
                page_size: PAGE_SIZE_U64,
            });
        }
        let too_large = CacheError::BudgetTooLarge {
            budget_bytes,
            alloc_bytes: None,
        };
        let pages_usize = usize::try_from(pages).map_err(|_| too_large)?;
        // Page data + metadata must be addressable.
        pages_usize
            .checked_mul(PAGE_SIZE + core::mem::size_of::<Slot>())
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or(too_large)?;
        match policy {
            Policy::DirectMapped => {
                if !pages.is_power_of_two() {
                    return Err(CacheError::NotPowerOfTwo {
                        budget_bytes,
                        pages,
                    });
                }
                Ok(Geometry {
                    sets: pages_usize,
                    ways: 1,
                })
            }
            Policy::SetAssociative { ways } => {
                let ways = usize::from(check_ways(ways)?);
                if pages_usize < ways {
                    return Ok(Geometry {
                        sets: 1,
                        ways: pages_usize,
                    });
                }
                let sets = prev_power_of_two(pages_usize / ways);
                Ok(Geometry {
                    sets,
                    ways: pages_usize / sets,
                })
            }
        }
    }
}

pub(crate) fn check_ways(ways: u16) -> Result<u16, CacheError> {
    if ways == 0 || ways > MAX_WAYS {
        Err(CacheError::InvalidWays {
            ways,
            max: MAX_WAYS,
        })
    } else {
        Ok(ways)
    }
}

/// Largest power of two `<= n`, for `n >= 1`.
fn prev_power_of_two(n: usize) -> usize {
    debug_assert!(n >= 1);
    1usize << (usize::BITS - 1 - n.leading_zeros())
}

/// Set-index hash of the set-associative policy. Fixed (independent of the
/// set count), so that with `set = hash & (sets - 1)` doubling the set count
/// splits every set in two: the basis of "growing keeps every page".
///
/// It is a bijection on each aligned run of 65536 pages (256 MiB): the low
/// 16 bits are the page number's, XORed with a constant for that run. So a
/// contiguous region spreads over the sets as evenly as QEMU's modulo, while
/// the higher bits folded in break power-of-two strides between regions.
#[inline]
fn set_hash(page_number: u64) -> u64 {
    page_number ^ ((page_number >> 16).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16)
}

/// Internal cache state. Public API lives on [`crate::PageCache`].
#[derive(Clone)]
pub(crate) struct Inner {
    policy: Policy,
    budget_bytes: u64,
    geom: Geometry,
    /// `sets - 1`.
    set_mask: u64,
    slots: Vec<Slot>,
    data: Vec<Page>,
    resident: usize,
    /// Generation of the last stamp, and the next tick within it.
    clock_generation: u64,
    tick: u64,
    pub(crate) stats: crate::CacheStats,
}

/// Allocates `n` copies of `value` without aborting on failure.
fn try_filled<T: Clone>(n: usize, value: T) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, value);
    Some(v)
}

fn alloc_error(budget_bytes: u64, geom: Geometry) -> CacheError {
    let bytes = geom
        .capacity()
        .checked_mul(PAGE_SIZE + core::mem::size_of::<Slot>())
        .and_then(|b| u64::try_from(b).ok());
    CacheError::BudgetTooLarge {
        budget_bytes,
        alloc_bytes: bytes,
    }
}

impl Inner {
    pub(crate) fn new(budget_bytes: u64, policy: Policy) -> Result<Inner, CacheError> {
        let geom = Geometry::for_budget(policy, budget_bytes)?;
        let (slots, data) = Self::alloc(budget_bytes, geom)?;
        Ok(Inner {
            policy,
            budget_bytes,
            geom,
            set_mask: geom.sets as u64 - 1,
            slots,
            data,
            resident: 0,
            clock_generation: 0,
            tick: 0,
            stats: crate::CacheStats::default(),
        })
    }

    fn alloc(budget_bytes: u64, geom: Geometry) -> Result<(Vec<Slot>, Vec<Page>), CacheError> {
        let cap = geom.capacity();
        let slots = try_filled(cap, Slot::default()).ok_or(alloc_error(budget_bytes, geom))?;
        let data = try_filled(cap, [0u8; PAGE_SIZE]).ok_or(alloc_error(budget_bytes, geom))?;
        Ok((slots, data))
    }

    pub(crate) fn policy(&self) -> Policy {
        self.policy
    }
    pub(crate) fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }
    pub(crate) fn geometry(&self) -> Geometry {
        self.geom
    }
    pub(crate) fn len(&self) -> usize {
        self.resident
    }

    #[inline]
    fn set_of(&self, page_number: u64) -> usize {
        let h = match self.policy {
            Policy::DirectMapped => page_number,
            Policy::SetAssociative { .. } => set_hash(page_number),
        };
        // Masked to < sets, which is a usize.
        (h & self.set_mask) as usize
    }

    /// Slot range of the set that `tag` maps to.
    #[inline]
    fn set_range(&self, tag: u64) -> core::ops::Range<usize> {
        let base = self.set_of(tag - 1) * self.geom.ways;
        base..base + self.geom.ways
    }

    #[inline]
    fn find(&self, tag: u64) -> Option<usize> {
        let range = self.set_range(tag);
        let start = range.start;
        self.slots[range]
            .iter()
            .position(|s| s.tag == tag)
            .map(|i| start + i)
    }

    /// The stamp for a use at `generation` now.
    #[inline]
    fn stamp(&mut self, generation: u64) -> u64 {
        match self.policy {
            Policy::DirectMapped => generation,
            Policy::SetAssociative { .. } => {
                if generation != self.clock_generation {
                    self.clock_generation = generation;
                    self.tick = 0;
                }
                let t = self.tick.min(TICK_MAX);
                self.tick = self.tick.saturating_add(1);
                (generation.min(GEN_MAX) << TICK_BITS) | t
            }
        }
    }

    /// QEMU's freshness rule: a page used at `stamp` is protected from
    /// eviction at `generation` while `age + 2 > generation`.
    #[inline]
    fn is_fresh(&self, stamp: u64, generation: u64) -> bool {
        match self.policy {
            // C unsigned arithmetic, as in QEMU's `it_age + 2 > current_age`.
            Policy::DirectMapped => stamp.wrapping_add(2) > generation,
            Policy::SetAssociative { .. } => (stamp >> TICK_BITS) + 2 > generation.min(GEN_MAX),
        }
    }

    pub(crate) fn contains(&self, addr: u64) -> bool {
        self.find(tag_of(addr)).is_some()
    }

    pub(crate) fn peek(&self, addr: u64) -> Option<&Page> {
        self.find(tag_of(addr)).and_then(|i| self.data.get(i))
    }

    pub(crate) fn lookup(&mut self, addr: u64, generation: u64) -> Option<&mut Page> {
        self.stats.lookups = self.stats.lookups.wrapping_add(1);
        match self.find(tag_of(addr)) {
            Some(i) => {
                self.stats.hits = self.stats.hits.wrapping_add(1);
                let stamp = self.stamp(generation);
                self.slots[i].stamp = stamp;
                self.data.get_mut(i)
            }
            None => {
                self.stats.misses = self.stats.misses.wrapping_add(1);
                None
            }
        }
    }

    pub(crate) fn insert(&mut self, addr: u64, page: &Page, generation: u64) -> Insert {
        let tag = tag_of(addr);
        let range = self.set_range(tag);
        let mut empty = None;
        let mut victim = range.start;
        let mut victim_stamp = u64::MAX;
        for (i, s) in self.slots[range.clone()].iter().enumerate() {
            if s.tag == tag {
                let i = range.start + i;
                self.store(i, tag, page, generation);
                return Insert::Replaced;
            }
            if s.tag == 0 {
                if empty.is_none() {
                    empty = Some(range.start + i);
                }
            } else if s.stamp < victim_stamp {
                victim = range.start + i;
                victim_stamp = s.stamp;
            }
        }
        if let Some(i) = empty {
            self.resident += 1;
            self.store(i, tag, page, generation);
            return Insert::Inserted;
        }
        if self.is_fresh(victim_stamp, generation) {
            self.stats.refused_inserts = self.stats.refused_inserts.wrapping_add(1);
            return Insert::Refused;
        }
        self.stats.evictions = self.stats.evictions.wrapping_add(1);
        self.store(victim, tag, page, generation);
        Insert::Inserted
    }

    fn store(&mut self, i: usize, tag: u64, page: &Page, generation: u64) {
        self.stats.inserts = self.stats.inserts.wrapping_add(1);
        let stamp = self.stamp(generation);
        self.slots[i] = Slot { tag, stamp };
        self.data[i].copy_from_slice(page);
    }

    pub(crate) fn clear(&mut self) {
        self.slots.fill(Slot::default());
        self.resident = 0;
    }

    pub(crate) fn resize(&mut self, budget_bytes: u64) -> Result<(), CacheError> {
        let canonical = Geometry::for_budget(self.policy, budget_bytes)?;
        let old_pages = self.budget_bytes / PAGE_SIZE_U64;
        let new_pages = budget_bytes / PAGE_SIZE_U64;
        if new_pages == old_pages {
            // Same page count: same (or an equally good) geometry; no-op.
            self.budget_bytes = budget_bytes;
            return Ok(());
        }
        // Resident slots, most recently used first (stable: ties keep slot order).
        let mut order: Vec<(u64, usize)> = Vec::new();
        order
            .try_reserve_exact(self.resident)
            .map_err(|_| alloc_error(budget_bytes, canonical))?;
        order.extend(
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.tag != 0)
                .map(|(i, s)| (s.stamp, i)),
        );
        order.sort_by_key(|o| core::cmp::Reverse(o.0));

        let geom = if new_pages > old_pages {
            self.grow_geometry(canonical, new_pages, &order)
                .ok_or(alloc_error(budget_bytes, canonical))?
        } else {
            canonical
        };
        let (mut slots, mut data) = Self::alloc(budget_bytes, geom)?;
        let mask = geom.sets as u64 - 1;
        let mut kept = 0usize;
        for &(_, old) in &order {
            let s = self.slots[old];
            let set = self.set_index_with(s.tag - 1, mask);
            let base = set * geom.ways;
            if let Some(free) = slots[base..base + geom.ways]
                .iter()
                .position(|n| n.tag == 0)
            {
                slots[base + free] = s;
                data[base + free].copy_from_slice(&self.data[old]);
                kept += 1;
            }
        }
        let dropped = self.resident - kept;
        self.stats.evictions = self.stats.evictions.wrapping_add(dropped as u64);
        self.slots = slots;
        self.data = data;
        self.geom = geom;
        self.set_mask = mask;
        self.resident = kept;
        self.budget_bytes = budget_bytes;
        Ok(())
    }

    fn set_index_with(&self, page_number: u64, mask: u64) -> usize {
        let h = match self.policy {
            Policy::DirectMapped => page_number,
            Policy::SetAssociative { .. } => set_hash(page_number),
        };
        (h & mask) as usize
    }

    /// Geometry for growing to `new_pages`: the canonical one if every
    /// resident page fits in it, else the largest set count between the
    /// current and the canonical one where they all fit. The current set
    /// count always qualifies (each set gets at least as many ways), so
    /// growing never drops a page. `None` only if a counter array cannot be
    /// allocated.
    fn grow_geometry(
        &self,
        canonical: Geometry,
        new_pages: u64,
        order: &[(u64, usize)],
    ) -> Option<Geometry> {
        let new_pages = usize::try_from(new_pages).ok()?;
        let current_sets = self.geom.sets;
        if canonical.sets <= current_sets {
            // Direct-mapped always lands here or splits exactly; for
            // set-associative this keeps the sets and widens them.
            let sets = canonical.sets.max(current_sets).min(new_pages);
            return Some(Geometry {
                sets,
                ways: new_pages / sets,
            });
        }
        if matches!(self.policy, Policy::DirectMapped) {
            // Slot = page number mod a power of two: pages in distinct old
            // slots stay in distinct new slots.
            return Some(canonical);
        }
        let mut sets = canonical.sets;
        let mut counts: Vec<u32> = try_filled(sets, 0u32)?;
        while sets > current_sets {
            let ways = new_pages / sets;
            counts[..sets].fill(0);
            let mask = sets as u64 - 1;
            let fits = order.iter().all(|&(_, i)| {
                let c = &mut counts[self.set_index_with(self.slots[i].tag - 1, mask)];
                *c += 1;
                (*c as usize) <= ways
            });
            if fits {
                return Some(Geometry { sets, ways });
            }
            sets /= 2;
        }
        Some(Geometry {
            sets: current_sets,
            ways: new_pages / current_sets,
        })
    }
}

/// Slot tag of an address: page number + 1 (low 12 bits ignored).
#[inline]
fn tag_of(addr: u64) -> u64 {
    // addr / 4096 < 2^52, so + 1 cannot overflow.
    addr / PAGE_SIZE_U64 + 1
}
