//! The set-associative policy (the default): a page may live in any slot of
//! the set its page number hashes to; per-set LRU by generation, QEMU's
//! protection of fresh pages, and an admission filter ([`Door`]).

use super::{Geometry, Placement, Slots, try_filled};
use crate::Policy;

/// Tags keep the low `GEN_BITS` bits of the generation of the last use
/// below the key.
const GEN_BITS: u32 = 11;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;

/// Set-index hash. Fixed (independent of the set count), so that with
/// `set = hash & (sets - 1)` doubling the set count splits every set in two:
/// the basis of "growing keeps every page".
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

/// How many generations before `generation` a tag was used (modulo 2048).
#[inline]
fn distance(tag: u64, generation: u64) -> u64 {
    generation.wrapping_sub(tag) & GEN_MASK
}

/// Slot metadata of the set-associative policy: per slot a tag word, plus
/// the admission filter (one more word per slot, not tied to any slot).
#[derive(Clone)]
pub(crate) struct SetAssociative {
    /// Way count asked for (the policy's parameter; `geom.ways` may be more).
    ways: u16,
    geom: Geometry,
    /// Per slot, 0 = empty: `(page number + 1) << 11 | generation mod 2048`
    /// of the last lookup hit or insert.
    tags: Vec<u64>,
    door: Door,
    /// Generation of the most recent lookup or insert: the "now" that slot
    /// recency is measured from when resizing.
    last_generation: u64,
}

/// The admission filter ("doorkeeper"): two Bloom filters of
/// `32 * capacity` bits with 2 hash functions, interleaved in `bits` (the
/// low and high 32 bits of each word). One records the pages that missed
/// and were not admitted in the current generation; the other holds the
/// previous generation's.
#[derive(Clone)]
struct Door {
    /// `capacity` words of two 32-bit filter halves.
    bits: Vec<u64>,
    /// Which half of each word is the current generation's filter.
    current_high: bool,
    /// The generation the current filter belongs to.
    generation: Option<u64>,
}

impl Door {
    fn new(words: usize) -> Option<Door> {
        Some(Door {
            bits: try_filled(words, 0u64)?,
            current_high: false,
            generation: None,
        })
    }

    /// Empties both filters.
    fn clear(&mut self) {
        self.bits.fill(0);
        self.current_high = false;
        self.generation = None;
    }

    /// Starts a new current filter when the generation moves on: the
    /// current one becomes the previous one if the generation advanced by
    /// one; otherwise (a jump or going back) both are emptied.
    fn rotate(&mut self, generation: u64) {
        if self.generation == Some(generation) {
            return;
        }
        let follows = self.generation.map(|g| g.wrapping_add(1)) == Some(generation);
        if follows {
            self.current_high = !self.current_high;
            let keep = if self.current_high {
                0x0000_0000_ffff_ffff
            } else {
                0xffff_ffff_0000_0000
            };
            for w in &mut self.bits {
                *w &= keep;
            }
        } else {
            self.bits.fill(0);
        }
        self.generation = Some(generation);
    }

    /// The two filter bit positions (of `32 * capacity`) of a page.
    #[inline]
    fn positions(&self, pn: u64) -> [usize; 2] {
        let h = mix64(pn);
        let m = (self.bits.len() as u128) * 32;
        let a = ((u128::from(h & 0xffff_ffff) * m) >> 32) as usize;
        let b = ((u128::from(h >> 32) * m) >> 32) as usize;
        [a, b]
    }

    /// Word index and mask of filter bit `bit` in the `high` or low half.
    #[inline]
    fn word_and_mask(bit: usize, high: bool) -> (usize, u64) {
        let shift = (bit & 31) + if high { 32 } else { 0 };
        (bit >> 5, 1u64 << shift)
    }

    /// Whether `pn` missed (and was noted) in the previous generation.
    fn seen_before(&self, pn: u64) -> bool {
        let previous_high = !self.current_high;
        self.positions(pn).iter().all(|&b| {
            let (w, m) = Self::word_and_mask(b, previous_high);
            self.bits[w] & m != 0
        })
    }

    /// Notes that `pn` missed and was not admitted in this generation.
    fn note(&mut self, pn: u64) {
        let high = self.current_high;
        for b in self.positions(pn) {
            let (w, m) = Self::word_and_mask(b, high);
            self.bits[w] |= m;
        }
    }
}

impl SetAssociative {
    /// Empty slots and filters for `geom`; `None` when they cannot be
    /// allocated.
    pub(crate) fn new(ways: u16, geom: Geometry) -> Option<Self> {
        let n = geom.capacity();
        Some(SetAssociative {
            ways,
            geom,
            tags: try_filled(n, 0u64)?,
            door: Door::new(n)?,
            last_generation: 0,
        })
    }

    /// First slot of the set of page number `pn` in a geometry.
    #[inline]
    fn set_start(pn: u64, geom: Geometry) -> usize {
        // Masked to < sets, which is a usize.
        (set_hash(pn) & geom.set_mask()) as usize * geom.ways
    }

    /// Slot range of the set of page number `pn`.
    #[inline]
    fn set_range(&self, pn: u64) -> core::ops::Range<usize> {
        let start = Self::set_start(pn, self.geom);
        start..start + self.geom.ways
    }

    #[inline]
    fn record_use(&mut self, slot: usize, key: u64, generation: u64) {
        self.tags[slot] = (key << GEN_BITS) | (generation & GEN_MASK);
    }
}

impl Slots for SetAssociative {
    fn policy(&self) -> Policy {
        Policy::SetAssociative { ways: self.ways }
    }

    fn geometry(&self) -> Geometry {
        self.geom
    }

    fn empty_like(&self, geom: Geometry) -> Option<Self> {
        let mut slots = SetAssociative::new(self.ways, geom)?;
        slots.last_generation = self.last_generation;
        Some(slots)
    }

    #[inline]
    fn find(&self, pn: u64) -> Option<usize> {
        let range = self.set_range(pn);
        let start = range.start;
        let key = pn + 1;
        self.tags[range]
            .iter()
            .position(|&t| t >> GEN_BITS == key)
            .map(|i| start + i)
    }

    #[inline]
    fn lookup(&mut self, pn: u64, generation: u64) -> Option<usize> {
        self.last_generation = generation;
        let range = self.set_range(pn);
        let start = range.start;
        let key = pn + 1;
        // Scans and updates through one borrow of the set: one bounds check,
        // and a scan loop as tight as `find`'s.
        let set = &mut self.tags[range];
        let j = set.iter().position(|&t| t >> GEN_BITS == key)?;
        set[j] = (key << GEN_BITS) | (generation & GEN_MASK);
        Some(start + j)
    }

    #[inline]
    fn place(&mut self, pn: u64, generation: u64) -> Placement {
        self.last_generation = generation;
        let key = pn + 1;
        let range = self.set_range(pn);
        let start = range.start;
        let mut empty = None;
        let mut victim = start;
        let mut victim_distance = 0;
        for (j, &t) in self.tags[range].iter().enumerate() {
            if t >> GEN_BITS == key {
                self.record_use(start + j, key, generation);
                return Placement::Replaced(start + j);
            }
            if t == 0 {
                if empty.is_none() {
                    empty = Some(start + j);
                }
            } else {
                let d = distance(t, generation);
                if d > victim_distance {
                    victim = start + j;
                    victim_distance = d;
                }
            }
        }
        if let Some(i) = empty {
            self.record_use(i, key, generation);
            return Placement::Free(i);
        }
        self.door.rotate(generation);
        // QEMU's protection: the least recently used page of the set was
        // used in this or the previous generation.
        if victim_distance < 2 || !self.door.seen_before(pn) {
            self.door.note(pn);
            return Placement::Refused;
        }
        self.record_use(victim, key, generation);
        Placement::Evicted(victim)
    }

    fn clear(&mut self) {
        self.tags.fill(0);
        self.door.clear();
    }

    fn page_number(&self, slot: usize) -> Option<u64> {
        (self.tags[slot] >> GEN_BITS).checked_sub(1)
    }

    fn recency_rank(&self, slot: usize) -> u64 {
        distance(self.tags[slot], self.last_generation)
    }

    /// The canonical geometry if every resident page fits in it, else the
    /// largest set count between the current and the canonical one where
    /// they all fit. The current set count always qualifies (each set gets
    /// at least as many ways), so growing never drops a page.
    fn grow_geometry(
        &self,
        canonical: Geometry,
        new_pages: u64,
        order: &[(u64, usize)],
    ) -> Option<Geometry> {
        let new_pages = usize::try_from(new_pages).ok()?;
        let current_sets = self.geom.sets;
        let mut sets = canonical.sets;
        if sets > current_sets {
            let mut counts: Vec<u32> = try_filled(sets, 0u32)?;
            while sets > current_sets {
                let ways = new_pages / sets;
                counts[..sets].fill(0);
                let mask = sets as u64 - 1;
                let fits = order.iter().all(|&(_, i)| {
                    let pn = (self.tags[i] >> GEN_BITS) - 1;
                    // Masked to < sets, which is a usize.
                    let c = &mut counts[(set_hash(pn) & mask) as usize];
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

    fn adopt(&mut self, from: &Self, old: usize) -> Option<usize> {
        let tag = from.tags[old];
        let start = Self::set_start((tag >> GEN_BITS) - 1, self.geom);
        let free = self.tags[start..start + self.geom.ways]
            .iter()
            .position(|&t| t == 0)?;
        self.tags[start + free] = tag;
        Some(start + free)
    }
}
