//! The cache itself: one page array (data) shared by both policies, and per
//! policy its own metadata (16 bytes per slot), indexed by the same slot
//! number.
//!
//! * [`Cache`] holds what every policy has: the page data, the budget, the
//!   resident count and the counters. Lookup, insert, clear and resize are
//!   written once there, over the [`Slots`] trait.
//! * [`DirectMapped`] (QEMU's policy) and [`SetAssociative`] (the default)
//!   implement [`Slots`]: where a page may live, what a slot records, which
//!   slot an insert takes or whether it is refused.
//! * [`Inner`] is the one place that picks the policy at run time: an enum
//!   over the two monomorphic caches, dispatched by [`dispatch!`].

mod direct_mapped;
mod set_associative;

use crate::{CacheError, CacheStats, Insert, MAX_WAYS, Policy};
use direct_mapped::DirectMapped;
use set_associative::SetAssociative;
use xbzrle::{PAGE_SIZE, Page};

/// Page size as `u64`, for address arithmetic.
const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// Metadata bytes per slot: two `u64` words in either policy.
pub(crate) const META_BYTES_PER_SLOT: usize = 16;

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

    /// `sets - 1`: masks a set hash to a set index.
    #[inline]
    fn set_mask(self) -> u64 {
        self.sets as u64 - 1
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
            .checked_mul(PAGE_SIZE + META_BYTES_PER_SLOT)
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
    1usize << (usize::BITS - 1 - n.max(1).leading_zeros())
}

/// Where an insert puts a page, as decided by the policy (which has already
/// recorded the use in the slot's metadata unless the insert is refused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// The page was resident in this slot.
    Replaced(usize),
    /// The page takes this free slot.
    Free(usize),
    /// The page takes this slot from another, no longer fresh page.
    Evicted(usize),
    /// The page is not placed (a fresh page would be evicted, or the
    /// admission filter said no).
    Refused,
}

/// A replacement policy's slot metadata: which slots a page may use, what
/// each slot records, and the placement decision. Page data, counters and
/// the resident count live in [`Cache`].
///
/// Page numbers are `addr / PAGE_SIZE` (`< 2^52`); "key" below means page
/// number + 1, so that a zero metadata word is an empty slot.
pub(crate) trait Slots: Clone + Sized {
    /// The policy these slots implement.
    fn policy(&self) -> Policy;
    /// The shape of the slot array.
    fn geometry(&self) -> Geometry;
    /// Empty slots of the same policy in `geom` (for resize), carrying over
    /// whatever is not per slot; `None` when they cannot be allocated.
    fn empty_like(&self, geom: Geometry) -> Option<Self>;
    /// The slot holding page number `pn`, without recording a use.
    fn find(&self, pn: u64) -> Option<usize>;
    /// A lookup at `generation`: the slot holding `pn`, whose use is
    /// recorded.
    fn lookup(&mut self, pn: u64, generation: u64) -> Option<usize>;
    /// Decides where an insert of `pn` at `generation` goes and records the
    /// use there.
    fn place(&mut self, pn: u64, generation: u64) -> Placement;
    /// Empties every slot.
    fn clear(&mut self);
    /// Page number held by `slot`, `None` when it is empty.
    fn page_number(&self, slot: usize) -> Option<u64>;
    /// Recency of an occupied slot: smaller = more recently used.
    fn recency_rank(&self, slot: usize) -> u64;
    /// Geometry for growing to `new_pages`, given the occupied slots
    /// (`(rank, slot)`, most recent first); `None` only if scratch memory
    /// cannot be allocated.
    fn grow_geometry(
        &self,
        canonical: Geometry,
        new_pages: u64,
        order: &[(u64, usize)],
    ) -> Option<Geometry>;
    /// Moves the metadata of `from`'s occupied slot `old` into a free slot
    /// of its page's set here, and returns that slot; `None` when the set is
    /// full (the page is dropped).
    fn adopt(&mut self, from: &Self, old: usize) -> Option<usize>;
}

/// Allocates `n` copies of `zero` (a zero integer) without aborting when
/// the allocator refuses the size: a fallible reservation of the same size
/// probes first. The allocation itself then goes through `vec!`, which asks
/// the allocator for zeroed memory for integer zeros (`calloc`): on common
/// systems the OS hands out zero pages lazily, so a large cache costs no
/// time to build and its memory is committed as pages are inserted.
fn try_filled<T: Clone>(n: usize, zero: T) -> Option<Vec<T>> {
    let mut probe: Vec<T> = Vec::new();
    probe.try_reserve_exact(n).ok()?;
    drop(probe);
    Some(vec![zero; n])
}

fn alloc_error(budget_bytes: u64, geom: Geometry) -> CacheError {
    let bytes = geom
        .capacity()
        .checked_mul(PAGE_SIZE + META_BYTES_PER_SLOT)
        .and_then(|b| u64::try_from(b).ok());
    CacheError::BudgetTooLarge {
        budget_bytes,
        alloc_bytes: bytes,
    }
}

/// The counters that are stored; [`CacheStats::misses`], the resident pages
/// and bytes are derived from these and the cache in [`Inner::stats`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    lookups: u64,
    hits: u64,
    inserts: u64,
    refused_inserts: u64,
    evictions: u64,
}

/// A cache of one policy: its slots, the page data and the counters.
#[derive(Clone)]
pub(crate) struct Cache<S: Slots> {
    slots: S,
    budget_bytes: u64,
    /// Page data: `capacity * PAGE_SIZE` bytes, slot `i` at `i * PAGE_SIZE`.
    /// Bytes rather than `Page`s so that the allocation is a zeroed one
    /// (`calloc`, lazily backed), see [`try_filled`].
    data: Vec<u8>,
    /// Occupied slots.
    resident: usize,
    counters: Counters,
}

impl<S: Slots> Cache<S> {
    fn new(budget_bytes: u64, slots: S) -> Result<Self, CacheError> {
        let geom = slots.geometry();
        let data = Self::alloc_data(budget_bytes, geom)?;
        Ok(Cache {
            slots,
            budget_bytes,
            data,
            resident: 0,
            counters: Counters::default(),
        })
    }

    fn alloc_data(budget_bytes: u64, geom: Geometry) -> Result<Vec<u8>, CacheError> {
        // capacity * PAGE_SIZE fits: checked in Geometry::for_budget.
        try_filled(geom.capacity() * PAGE_SIZE, 0u8).ok_or_else(|| alloc_error(budget_bytes, geom))
    }

    fn contains(&self, addr: u64) -> bool {
        self.slots.find(page_number(addr)).is_some()
    }

    fn peek(&self, addr: u64) -> Option<&Page> {
        let i = self.slots.find(page_number(addr))?;
        page_at(&self.data, i)
    }

    #[inline]
    fn lookup(&mut self, addr: u64, generation: u64) -> Option<&mut Page> {
        self.counters.lookups = self.counters.lookups.wrapping_add(1);
        let i = self.slots.lookup(page_number(addr), generation)?;
        self.counters.hits = self.counters.hits.wrapping_add(1);
        page_at_mut(&mut self.data, i)
    }

    #[inline]
    fn insert(&mut self, addr: u64, page: &Page, generation: u64) -> Insert {
        let (slot, outcome) = match self.slots.place(page_number(addr), generation) {
            Placement::Replaced(i) => (i, Insert::Replaced),
            Placement::Free(i) => {
                self.resident += 1;
                (i, Insert::Inserted)
            }
            Placement::Evicted(i) => {
                self.counters.evictions = self.counters.evictions.wrapping_add(1);
                (i, Insert::Inserted)
            }
            Placement::Refused => {
                self.counters.refused_inserts = self.counters.refused_inserts.wrapping_add(1);
                return Insert::Refused;
            }
        };
        self.counters.inserts = self.counters.inserts.wrapping_add(1);
        if let Some(p) = page_at_mut(&mut self.data, slot) {
            p.copy_from_slice(page);
        }
        outcome
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.resident = 0;
    }

    fn resize(&mut self, budget_bytes: u64) -> Result<(), CacheError> {
        let canonical = Geometry::for_budget(self.slots.policy(), budget_bytes)?;
        let old_pages = self.budget_bytes / PAGE_SIZE_U64;
        let new_pages = budget_bytes / PAGE_SIZE_U64;
        if new_pages == old_pages {
            // Same page count: same geometry; no-op.
            self.budget_bytes = budget_bytes;
            return Ok(());
        }
        // Occupied slots, most recently used first (stable: ties keep slot order).
        let mut order: Vec<(u64, usize)> = Vec::new();
        order
            .try_reserve_exact(self.resident)
            .map_err(|_| alloc_error(budget_bytes, canonical))?;
        order.extend(
            (0..self.slots.geometry().capacity())
                .filter(|&i| self.slots.page_number(i).is_some())
                .map(|i| (self.slots.recency_rank(i), i)),
        );
        order.sort_by_key(|o| o.0);

        let geom = if new_pages > old_pages {
            self.slots
                .grow_geometry(canonical, new_pages, &order)
                .ok_or_else(|| alloc_error(budget_bytes, canonical))?
        } else {
            canonical
        };
        let mut slots = self
            .slots
            .empty_like(geom)
            .ok_or_else(|| alloc_error(budget_bytes, geom))?;
        let mut data = Self::alloc_data(budget_bytes, geom)?;
        let mut kept = 0usize;
        for &(_, old) in &order {
            if let Some(new) = slots.adopt(&self.slots, old) {
                if let (Some(dst), Some(src)) =
                    (page_at_mut(&mut data, new), page_at(&self.data, old))
                {
                    dst.copy_from_slice(src);
                }
                kept += 1;
            }
        }
        let dropped = self.resident - kept;
        self.counters.evictions = self.counters.evictions.wrapping_add(dropped as u64);
        self.slots = slots;
        self.data = data;
        self.resident = kept;
        self.budget_bytes = budget_bytes;
        Ok(())
    }
}

/// The cache of either policy. Public API lives on [`crate::PageCache`].
#[derive(Clone)]
pub(crate) enum Inner {
    /// QEMU's policy.
    DirectMapped(Cache<DirectMapped>),
    /// The default policy.
    SetAssociative(Cache<SetAssociative>),
}

/// The one place the policy is chosen at run time: runs `$body` with `$c`
/// bound to the [`Cache`] of whichever policy `$inner` holds.
macro_rules! dispatch {
    ($inner:expr, $c:ident => $body:expr) => {
        match $inner {
            Inner::DirectMapped($c) => $body,
            Inner::SetAssociative($c) => $body,
        }
    };
}

impl Inner {
    pub(crate) fn new(budget_bytes: u64, policy: Policy) -> Result<Inner, CacheError> {
        let geom = Geometry::for_budget(policy, budget_bytes)?;
        let err = || alloc_error(budget_bytes, geom);
        Ok(match policy {
            Policy::DirectMapped => {
                let slots = DirectMapped::new(geom).ok_or_else(err)?;
                Inner::DirectMapped(Cache::new(budget_bytes, slots)?)
            }
            Policy::SetAssociative { ways } => {
                let slots = SetAssociative::new(ways, geom).ok_or_else(err)?;
                Inner::SetAssociative(Cache::new(budget_bytes, slots)?)
            }
        })
    }

    pub(crate) fn policy(&self) -> Policy {
        dispatch!(self, c => c.slots.policy())
    }
    pub(crate) fn budget_bytes(&self) -> u64 {
        dispatch!(self, c => c.budget_bytes)
    }
    pub(crate) fn geometry(&self) -> Geometry {
        dispatch!(self, c => c.slots.geometry())
    }
    pub(crate) fn len(&self) -> usize {
        dispatch!(self, c => c.resident)
    }
    pub(crate) fn contains(&self, addr: u64) -> bool {
        dispatch!(self, c => c.contains(addr))
    }
    pub(crate) fn peek(&self, addr: u64) -> Option<&Page> {
        dispatch!(self, c => c.peek(addr))
    }
    #[inline]
    pub(crate) fn lookup(&mut self, addr: u64, generation: u64) -> Option<&mut Page> {
        dispatch!(self, c => c.lookup(addr, generation))
    }
    #[inline]
    pub(crate) fn insert(&mut self, addr: u64, page: &Page, generation: u64) -> Insert {
        dispatch!(self, c => c.insert(addr, page, generation))
    }
    pub(crate) fn clear(&mut self) {
        dispatch!(self, c => c.clear())
    }
    pub(crate) fn resize(&mut self, budget_bytes: u64) -> Result<(), CacheError> {
        dispatch!(self, c => c.resize(budget_bytes))
    }

    /// The counters, with the derived ones computed: misses are the lookups
    /// that did not hit (in the same wrapping arithmetic as the counters),
    /// resident pages and bytes are read off the cache.
    pub(crate) fn stats(&self) -> CacheStats {
        let (n, resident) = dispatch!(self, c => (c.counters, c.resident));
        let resident_pages = resident as u64;
        CacheStats {
            lookups: n.lookups,
            hits: n.hits,
            misses: n.lookups.wrapping_sub(n.hits),
            inserts: n.inserts,
            refused_inserts: n.refused_inserts,
            evictions: n.evictions,
            resident_pages,
            bytes: resident_pages.saturating_mul(PAGE_SIZE_U64),
        }
    }

    pub(crate) fn reset_stats(&mut self) {
        dispatch!(self, c => c.counters = Counters::default())
    }
}

/// Slot `i`'s page in a data array (`None` only out of range, which the
/// slot invariants exclude).
#[inline]
fn page_at(data: &[u8], i: usize) -> Option<&Page> {
    let start = i.checked_mul(PAGE_SIZE)?;
    data.get(start..start.checked_add(PAGE_SIZE)?)?
        .try_into()
        .ok()
}

#[inline]
fn page_at_mut(data: &mut [u8], i: usize) -> Option<&mut Page> {
    let start = i.checked_mul(PAGE_SIZE)?;
    data.get_mut(start..start.checked_add(PAGE_SIZE)?)?
        .try_into()
        .ok()
}

/// Page number of an address (low 12 bits ignored); `< 2^52`, so `+ 1`
/// cannot overflow.
#[inline]
fn page_number(addr: u64) -> u64 {
    addr / PAGE_SIZE_U64
}
