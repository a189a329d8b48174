//! The cache itself: a tag array and an auxiliary word array (metadata, 8 +
//! 8 bytes per slot) and one page array (data), allocated once per geometry
//! and indexed by the same slot number.

use crate::{CacheError, Insert, MAX_WAYS, Policy};
use xbzrle::{PAGE_SIZE, Page};

/// Page size as `u64`, for address arithmetic.
const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// Metadata bytes per slot: one tag word and one auxiliary word.
pub(crate) const META_BYTES_PER_SLOT: usize = 16;

/// Set-associative tags keep the low `GEN_BITS` bits of the generation of
/// the last use below the page number.
const GEN_BITS: u32 = 11;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;

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

/// 64-bit mixer (splitmix64 finalizer) for the admission filter.
#[inline]
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Internal cache state. Public API lives on [`crate::PageCache`].
#[derive(Clone)]
pub(crate) struct Inner {
    policy: Policy,
    budget_bytes: u64,
    geom: Geometry,
    /// `sets - 1`.
    set_mask: u64,
    /// Per slot, 0 = empty. Direct-mapped: page number + 1.
    /// Set-associative: `(page number + 1) << 11 | generation mod 2048`.
    tags: Vec<u64>,
    /// Per slot. Direct-mapped: the age (generation of the last use, QEMU's
    /// `it_age`). Set-associative: 64 bits of the admission filter (see
    /// [`Door`]), not tied to the slot's page.
    aux: Vec<u64>,
    /// Page data: `capacity * PAGE_SIZE` bytes, slot `i` at `i * PAGE_SIZE`.
    /// Bytes rather than `Page`s so that the allocation is a zeroed one
    /// (`calloc`, lazily backed), see [`try_filled`].
    data: Vec<u8>,
    resident: usize,
    /// Set-associative admission filter state.
    door: Door,
    /// Generation of the most recent lookup or insert.
    last_generation: u64,
    pub(crate) stats: crate::CacheStats,
}

/// The admission filter ("doorkeeper") of the set-associative policy: two
/// Bloom filters of `32 * capacity` bits, interleaved in the `aux` words
/// (low and high 32 bits), with 2 hash functions. One records the pages
/// that missed and were not admitted in the current generation; the other
/// holds the previous generation's.
#[derive(Clone, Copy, Debug, Default)]
struct Door {
    /// Which half of each `aux` word is the current generation's filter.
    current_high: bool,
    /// The generation the current filter belongs to.
    generation: Option<u64>,
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

type Arrays = (Vec<u64>, Vec<u64>, Vec<u8>);

impl Inner {
    pub(crate) fn new(budget_bytes: u64, policy: Policy) -> Result<Inner, CacheError> {
        let geom = Geometry::for_budget(policy, budget_bytes)?;
        let (tags, aux, data) = Self::alloc(budget_bytes, geom)?;
        Ok(Inner {
            policy,
            budget_bytes,
            geom,
            set_mask: geom.sets as u64 - 1,
            tags,
            aux,
            data,
            resident: 0,
            door: Door::default(),
            last_generation: 0,
            stats: crate::CacheStats::default(),
        })
    }

    fn alloc(budget_bytes: u64, geom: Geometry) -> Result<Arrays, CacheError> {
        let cap = geom.capacity();
        let err = || alloc_error(budget_bytes, geom);
        let tags = try_filled(cap, 0u64).ok_or_else(err)?;
        let aux = try_filled(cap, 0u64).ok_or_else(err)?;
        // cap * PAGE_SIZE fits: checked in Geometry::for_budget.
        let data = try_filled(cap * PAGE_SIZE, 0u8).ok_or_else(err)?;
        Ok((tags, aux, data))
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

    fn is_direct(&self) -> bool {
        matches!(self.policy, Policy::DirectMapped)
    }

    /// Set of a page number under a set mask.
    #[inline]
    fn set_with(&self, page_number: u64, mask: u64) -> usize {
        let h = if self.is_direct() {
            page_number
        } else {
            set_hash(page_number)
        };
        // Masked to < sets, which is a usize.
        (h & mask) as usize
    }

    /// Slot range of the set that page number `pn` maps to.
    #[inline]
    fn set_range(&self, pn: u64) -> core::ops::Range<usize> {
        let base = self.set_with(pn, self.set_mask) * self.geom.ways;
        base..base + self.geom.ways
    }

    /// Page number + 1 held by a tag word (0 = empty).
    #[inline]
    fn key_of(&self, tag: u64) -> u64 {
        if self.is_direct() {
            tag
        } else {
            tag >> GEN_BITS
        }
    }

    #[inline]
    fn find(&self, pn: u64) -> Option<usize> {
        let range = self.set_range(pn);
        let start = range.start;
        let key = pn + 1;
        let set = &self.tags[range];
        let i = if self.is_direct() {
            set.iter().position(|&t| t == key)
        } else {
            set.iter().position(|&t| t >> GEN_BITS == key)
        };
        i.map(|i| start + i)
    }

    /// Records a use of slot `i` at `generation`.
    #[inline]
    fn touch(&mut self, i: usize, key: u64, generation: u64) {
        if self.is_direct() {
            self.tags[i] = key;
            self.aux[i] = generation;
        } else {
            self.tags[i] = (key << GEN_BITS) | (generation & GEN_MASK);
        }
    }

    /// How many generations ago slot `i` was used, for the set-associative
    /// policy (modulo 2048).
    #[inline]
    fn sa_distance(tag: u64, generation: u64) -> u64 {
        generation.wrapping_sub(tag) & GEN_MASK
    }

    pub(crate) fn contains(&self, addr: u64) -> bool {
        self.find(page_number(addr)).is_some()
    }

    pub(crate) fn peek(&self, addr: u64) -> Option<&Page> {
        self.find(page_number(addr))
            .and_then(|i| page_at(&self.data, i))
    }

    pub(crate) fn lookup(&mut self, addr: u64, generation: u64) -> Option<&mut Page> {
        self.stats.lookups = self.stats.lookups.wrapping_add(1);
        self.last_generation = generation;
        let pn = page_number(addr);
        match self.find(pn) {
            Some(i) => {
                self.stats.hits = self.stats.hits.wrapping_add(1);
                self.touch(i, pn + 1, generation);
                page_at_mut(&mut self.data, i)
            }
            None => {
                self.stats.misses = self.stats.misses.wrapping_add(1);
                None
            }
        }
    }

    pub(crate) fn insert(&mut self, addr: u64, page: &Page, generation: u64) -> Insert {
        self.last_generation = generation;
        let pn = page_number(addr);
        let key = pn + 1;
        let range = self.set_range(pn);
        let start = range.start;
        if self.is_direct() {
            // QEMU `cache_insert`: refuse only over another, fresh page.
            let i = start;
            let t = self.tags[i];
            if t == key {
                self.store(i, key, page, generation);
                return Insert::Replaced;
            }
            if t != 0 && self.aux[i].wrapping_add(2) > generation {
                return self.refuse();
            }
            if t == 0 {
                self.resident += 1;
            } else {
                self.stats.evictions = self.stats.evictions.wrapping_add(1);
            }
            self.store(i, key, page, generation);
            return Insert::Inserted;
        }

        let mut empty = None;
        let mut victim = start;
        let mut victim_distance = 0;
        for (j, &t) in self.tags[range].iter().enumerate() {
            if t >> GEN_BITS == key {
                self.store(start + j, key, page, generation);
                return Insert::Replaced;
            }
            if t == 0 {
                if empty.is_none() {
                    empty = Some(start + j);
                }
            } else {
                let d = Self::sa_distance(t, generation);
                if d > victim_distance {
                    victim = start + j;
                    victim_distance = d;
                }
            }
        }
        if let Some(i) = empty {
            self.resident += 1;
            self.store(i, key, page, generation);
            return Insert::Inserted;
        }
        self.door_rotate(generation);
        // QEMU's protection: the least recently used page of the set was
        // used in this or the previous generation.
        if victim_distance < 2 || !self.door_seen(pn) {
            self.door_note(pn);
            return self.refuse();
        }
        self.stats.evictions = self.stats.evictions.wrapping_add(1);
        self.store(victim, key, page, generation);
        Insert::Inserted
    }

    fn refuse(&mut self) -> Insert {
        self.stats.refused_inserts = self.stats.refused_inserts.wrapping_add(1);
        Insert::Refused
    }

    fn store(&mut self, i: usize, key: u64, page: &Page, generation: u64) {
        self.stats.inserts = self.stats.inserts.wrapping_add(1);
        self.touch(i, key, generation);
        if let Some(p) = page_at_mut(&mut self.data, i) {
            p.copy_from_slice(page);
        }
    }

    /// Starts a new current filter when the generation moves on: the
    /// current one becomes the previous one if the generation advanced by
    /// one; otherwise (a jump or going back) both are emptied.
    fn door_rotate(&mut self, generation: u64) {
        if self.door.generation == Some(generation) {
            return;
        }
        let follows = self.door.generation.map(|g| g.wrapping_add(1)) == Some(generation);
        if follows {
            self.door.current_high = !self.door.current_high;
            let keep = if self.door.current_high {
                0x0000_0000_ffff_ffff
            } else {
                0xffff_ffff_0000_0000
            };
            for w in &mut self.aux {
                *w &= keep;
            }
        } else {
            self.aux.fill(0);
        }
        self.door.generation = Some(generation);
    }

    /// The two filter bit positions (of `32 * capacity`) of a page.
    #[inline]
    fn door_bits(&self, pn: u64) -> [usize; 2] {
        let h = mix64(pn);
        let m = (self.aux.len() as u128) * 32;
        let a = ((u128::from(h & 0xffff_ffff) * m) >> 32) as usize;
        let b = ((u128::from(h >> 32) * m) >> 32) as usize;
        [a, b]
    }

    #[inline]
    fn door_bit(&self, bit: usize, high: bool) -> (usize, u64) {
        let shift = (bit & 31) + if high { 32 } else { 0 };
        (bit >> 5, 1u64 << shift)
    }

    fn door_seen(&self, pn: u64) -> bool {
        let previous_high = !self.door.current_high;
        self.door_bits(pn).iter().all(|&b| {
            let (w, m) = self.door_bit(b, previous_high);
            self.aux[w] & m != 0
        })
    }

    fn door_note(&mut self, pn: u64) {
        let high = self.door.current_high;
        for b in self.door_bits(pn) {
            let (w, m) = self.door_bit(b, high);
            self.aux[w] |= m;
        }
    }

    pub(crate) fn clear(&mut self) {
        self.tags.fill(0);
        if !self.is_direct() {
            self.aux.fill(0);
            self.door = Door::default();
        }
        self.resident = 0;
    }

    /// Recency key of an occupied slot: smaller = more recently used.
    fn age_rank(&self, i: usize) -> u64 {
        if self.is_direct() {
            u64::MAX - self.aux[i]
        } else {
            Self::sa_distance(self.tags[i], self.last_generation)
        }
    }

    pub(crate) fn resize(&mut self, budget_bytes: u64) -> Result<(), CacheError> {
        let canonical = Geometry::for_budget(self.policy, budget_bytes)?;
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
            (0..self.tags.len())
                .filter(|&i| self.tags[i] != 0)
                .map(|i| (self.age_rank(i), i)),
        );
        order.sort_by_key(|o| o.0);

        let geom = if new_pages > old_pages {
            self.grow_geometry(canonical, new_pages, &order)
                .ok_or_else(|| alloc_error(budget_bytes, canonical))?
        } else {
            canonical
        };
        let (mut tags, mut aux, mut data) = Self::alloc(budget_bytes, geom)?;
        let mask = geom.sets as u64 - 1;
        let mut kept = 0usize;
        for &(_, old) in &order {
            let pn = self.key_of(self.tags[old]) - 1;
            let base = self.set_with(pn, mask) * geom.ways;
            if let Some(free) = tags[base..base + geom.ways].iter().position(|&t| t == 0) {
                let new = base + free;
                tags[new] = self.tags[old];
                if self.is_direct() {
                    aux[new] = self.aux[old];
                }
                if let (Some(dst), Some(src)) =
                    (page_at_mut(&mut data, new), page_at(&self.data, old))
                {
                    dst.copy_from_slice(src);
                }
                kept += 1;
            }
        }
        let dropped = self.resident - kept;
        self.stats.evictions = self.stats.evictions.wrapping_add(dropped as u64);
        self.tags = tags;
        self.aux = aux;
        self.data = data;
        self.door = Door::default();
        self.geom = geom;
        self.set_mask = mask;
        self.resident = kept;
        self.budget_bytes = budget_bytes;
        Ok(())
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
        if self.is_direct() {
            // Slot = page number mod a power of two: pages in distinct old
            // slots stay in distinct new slots.
            return Some(canonical);
        }
        let current_sets = self.geom.sets;
        let mut sets = canonical.sets;
        if sets > current_sets {
            let mut counts: Vec<u32> = try_filled(sets, 0u32)?;
            while sets > current_sets {
                let ways = new_pages / sets;
                counts[..sets].fill(0);
                let mask = sets as u64 - 1;
                let fits = order.iter().all(|&(_, i)| {
                    let pn = self.key_of(self.tags[i]) - 1;
                    let c = &mut counts[self.set_with(pn, mask)];
                    *c += 1;
                    (*c as usize) <= ways
                });
                if fits {
                    return Some(Geometry { sets, ways });
                }
                sets /= 2;
            }
        }
        Some(Geometry {
            sets: current_sets,
            ways: new_pages / current_sets,
        })
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
