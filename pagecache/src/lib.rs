//! The XBZRLE page cache: copies of the pages last sent, keyed by guest page
//! address, so the next send of a page can be an XBZRLE delta against the
//! copy the destination already holds.
//!
//! QEMU keeps this cache in `migration/page_cache.c` and sizes it with the
//! `xbzrle-cache-size` parameter. This crate offers QEMU's policy exactly,
//! and a set-associative policy with a better hit rate at the same byte
//! budget (the default). The cache is single-owner (`&mut self`, no locks):
//! the sending thread owns it.
//!
//! ```
//! use precopy_pagecache::{Insert, PageCache, Policy};
//! use xbzrle::{PAGE_SIZE, Page};
//!
//! let mut cache = PageCache::new(64 << 20, Policy::default())?; // 64 MiB
//! let page: Page = [7; PAGE_SIZE];
//! let generation = 2; // dirty-bitmap sync count
//! // A cache miss: send the page whole, then remember it.
//! assert!(cache.lookup(0x1000, generation).is_none());
//! assert_eq!(cache.insert(0x1000, &page, generation), Insert::Inserted);
//! // Next pass: a cache hit; encode against the copy, then update it in place.
//! let mut new = page;
//! new[10] = 8;
//! let old = cache.lookup(0x1000, generation + 1).expect("cached");
//! let mut delta = [0u8; PAGE_SIZE];
//! let n = xbzrle::encode(old, &new, &mut delta).expect("fits");
//! assert_eq!(n, 3);
//! *old = new;
//! assert_eq!(cache.stats().hits, 1);
//! # Ok::<(), precopy_pagecache::CacheError>(())
//! ```
//!
//! # Keys, generations, pages
//!
//! * **Key**: `addr`, the page's byte address in a flat guest address space
//!   (the engine maps a RAMBlock and offset to it, as QEMU's
//!   `block->offset + offset`). The key is `addr / PAGE_SIZE`: the low 12
//!   bits are ignored, so `0x1234` and `0x1000` name the same page. Every
//!   `u64` is a valid address.
//! * **Generation**: the dirty-bitmap sync count (QEMU's
//!   `dirty_sync_count`), passed to every lookup and insert. Each entry
//!   remembers the generation of its last use, its *age* (QEMU's `it_age`).
//!   Generations are expected to grow; if they go backwards nothing breaks,
//!   only replacement decisions get worse.
//! * **Values**: copies of [`xbzrle::Page`] (4 KiB). [`PageCache::lookup`]
//!   hands out the copy mutably, so the engine can update it in place after
//!   encoding (QEMU's `get_cached_data`).
//!
//! # Policies
//!
//! * [`Policy::DirectMapped`], QEMU's policy, exactly. The budget must hold a
//!   power-of-two number of pages (`budget / PAGE_SIZE`; remainder bytes are
//!   unused), else [`CacheError::NotPowerOfTwo`] (QEMU refuses too; there is
//!   no silent rounding). Slot = page number mod slot count. A lookup is a
//!   hit only if the slot holds this page, and a hit sets the age to the
//!   current generation. An insert fills the slot unless it holds *another*
//!   page that is still fresh, `age + 2 > generation` in `u64` arithmetic
//!   that wraps as C's does (used in this generation or the previous one);
//!   then it is refused. Re-inserting the page a slot already holds always
//!   succeeds. Two hot pages that share a slot keep refusing or evicting
//!   each other: that is where QEMU misses.
//! * [`Policy::SetAssociative`] (the default, with [`DEFAULT_WAYS`] = 2):
//!   pages map to a *set* of slots by a hash of the page number and may live
//!   in any slot of it, so hot pages that collide share a set instead of
//!   fighting over a slot. Replacement, in a full set:
//!   1. the victim is the least recently used page of the set (by the
//!      generation of its last hit or insert);
//!   2. **QEMU's protection**: if the victim was used in this generation or
//!      the previous one, the insert is refused, as QEMU refuses over a
//!      fresh slot. A pass over RAM larger than the cache therefore cannot
//!      flush the pages being re-dirtied (plain LRU would lose every page of
//!      a cyclic scan; this keeps a cache-sized part of it hitting);
//!   3. **admission**: a page is admitted over a stale victim only if it also
//!      missed in the previous generation. A page dirtied in one pass only
//!      is likely not dirtied again soon, while one dirtied in consecutive
//!      passes is; without this, stale slots go to whichever pages come
//!      first in the pass (the lowest addresses). The record of recent
//!      misses is a pair of Bloom filters (this generation's and the
//!      previous one's, 2 hash functions, `32 * capacity` bits each) kept in
//!      the metadata words; a false positive only admits a page early.
//!
//!   Free slots always accept. Generations are kept modulo 2048 in this
//!   policy: a page unused for 2048 generations or more may look recent
//!   (only a replacement choice; never wrong data), and a generation that
//!   goes backwards makes pages look stale. The set count is a power of two
//!   and each set has between `ways` and `2 * ways - 1` slots, so all of the
//!   budget but less than one slot per set is used. The set hash is a
//!   bijection on each aligned 256 MiB run of pages, so contiguous memory
//!   spreads over the sets as evenly as QEMU's modulo, while higher address
//!   bits folded in break power-of-two strides.
//!
//! The `cache-hits` bench binary (`cargo run --release -p precopy-benches
//! --bin cache-hits`) replays the page sequence of a real QEMU 7.2
//! migration and synthetic traces (see [`replay`]) through every policy;
//! the default was chosen from it: 2 ways never lost to direct-mapped on any
//! trace and budget there, and gained up to 9 % (relative) on the real
//! sequence. Wider sets (8, 16 ways) hit more on the real sequence and on a
//! skewed hot set, but lose to direct-mapped on a hot set mixed with a scan.
//!
//! # Memory
//!
//! One contiguous array of `capacity_pages()` pages for the data, and two
//! `u64` words of metadata per slot: **16 bytes of metadata per slot**,
//! resident or not (0.4 % of the page data). Direct-mapped: the page number
//! and the age (QEMU keeps the same two, plus a data pointer). Set-
//! associative: the page number with the generation of its last use in the
//! low 11 bits, and 64 bits of the admission filters. Everything is
//! allocated when the cache is built or resized, never by a lookup or an
//! insert. The size is checked with checked arithmetic and probed with a
//! fallible reservation, so a budget the allocator refuses is
//! [`CacheError::BudgetTooLarge`], not an abort. The arrays are requested
//! zeroed (`calloc`), which the OS typically provides lazily: building even
//! a multi-GiB cache takes microseconds, and page memory is committed as
//! pages are inserted (as QEMU's cache, which allocates each page on its
//! first insert). Like any lazily committed memory, an overcommitting OS may
//! fail to back it later.
//!
//! # Resize (QEMU's `xbzrle-cache-size` changed during a migration)
//!
//! [`PageCache::resize`] allocates the new arrays, moves the resident pages
//! over, then frees the old ones (so both exist for a moment). It is
//! all-or-nothing: on error the cache is unchanged.
//!
//! * **Growing keeps every resident page.** Direct-mapped: slot counts are
//!   powers of two, so pages in distinct old slots land in distinct new
//!   slots. Set-associative: the set index is `hash & (sets - 1)` with a fixed
//!   hash, so doubling the sets splits each set in two; the new shape is the
//!   canonical one for the new budget if every page fits there, otherwise
//!   the old set count with wider sets (a later resize returns to the
//!   canonical shape).
//! * **Shrinking keeps the most recently used pages that fit**: pages are
//!   placed most recent first; a page whose new slot (direct-mapped) or set
//!   is already full is dropped and counted as an eviction. Direct-mapped
//!   and set-associative pages know their recency only to the generation,
//!   so among pages of the same generation the lower slot wins.
//! * **Same page count: no-op** (only [`PageCache::budget_bytes`] changes).
//! * A budget smaller than one page, or (direct-mapped) not a power of two
//!   pages, is an error.
//!
//! Ages and statistics survive a resize; the admission filter starts empty. The cache never returns another
//! page's data, before or after a resize: every slot carries its page
//! number, and a page's data moves together with it.
//!
//! QEMU itself (7.2) builds a new, empty cache on resize; keeping the pages
//! is this crate's improvement.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod cache;
mod error;
pub mod replay;

use core::fmt;
use core::str::FromStr;

pub use error::CacheError;
pub use xbzrle::{PAGE_SIZE, Page};

/// Largest way count accepted by [`Policy::SetAssociative`]: a lookup scans
/// at most `2 * MAX_WAYS` slot records.
pub const MAX_WAYS: u16 = 256;

/// Way count of [`Policy::default`], chosen by measurement (`cache-hits`).
pub const DEFAULT_WAYS: u16 = 2;

/// Replacement policy, chosen when the cache is built. See the
/// [crate docs](crate#policies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Policy {
    /// QEMU's direct-mapped cache (`migration/page_cache.c`), exactly.
    DirectMapped,
    /// Set-associative with per-set LRU, QEMU's generation protection and an
    /// admission filter (see [Policies](crate#policies)).
    SetAssociative {
        /// Minimum slots per set, `1..=MAX_WAYS`.
        ways: u16,
    },
}

impl Default for Policy {
    /// The policy with the best measured hit rate:
    /// `SetAssociative { ways: DEFAULT_WAYS }`.
    fn default() -> Self {
        Policy::SetAssociative { ways: DEFAULT_WAYS }
    }
}

impl Policy {
    /// Short name of the policy family: `"direct-mapped"` (QEMU's) or
    /// `"set-associative"`. [`fmt::Display`] adds the way count
    /// (`"set-associative-16"`), and [`FromStr`] parses either form.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::DirectMapped => "direct-mapped",
            Policy::SetAssociative { .. } => "set-associative",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::DirectMapped => f.write_str("direct-mapped"),
            Policy::SetAssociative { ways } => write!(f, "set-associative-{ways}"),
        }
    }
}

/// Error of [`Policy::from_str`]: the text that is not a policy name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsePolicyError(pub String);

impl fmt::Display for ParsePolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown XBZRLE cache policy {:?}: expected \"direct-mapped\", \
             \"set-associative\" or \"set-associative-N\" (N = 1..={MAX_WAYS})",
            self.0
        )
    }
}

impl std::error::Error for ParsePolicyError {}

impl FromStr for Policy {
    type Err = ParsePolicyError;

    /// Parses `"direct-mapped"`, `"set-associative"` (default ways) or
    /// `"set-associative-N"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePolicyError(s.to_owned());
        match s {
            "direct-mapped" => Ok(Policy::DirectMapped),
            "set-associative" => Ok(Policy::SetAssociative { ways: DEFAULT_WAYS }),
            _ => {
                let ways = s
                    .strip_prefix("set-associative-")
                    .and_then(|n| n.parse::<u16>().ok())
                    .ok_or_else(err)?;
                cache::check_ways(ways).map_err(|_| err())?;
                Ok(Policy::SetAssociative { ways })
            }
        }
    }
}

/// Outcome of [`PageCache::insert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use]
pub enum Insert {
    /// The page was not resident and now is (into a free slot, or by
    /// evicting a page that was no longer fresh).
    Inserted,
    /// The page was resident; its copy was overwritten.
    Replaced,
    /// The page was not resident and could not be placed without evicting a
    /// page used in this or the previous generation (QEMU's `cache_insert`
    /// returning -1), or not admitted by the set-associative filter. The
    /// cache is unchanged apart from the counter (and the filter).
    Refused,
}

impl Insert {
    /// `true` for [`Insert::Refused`].
    pub fn is_refused(self) -> bool {
        matches!(self, Insert::Refused)
    }

    /// `true` if the page is resident after the insert.
    pub fn is_resident(self) -> bool {
        !self.is_refused()
    }
}

/// Counters since the cache was built (or [`PageCache::reset_stats`]).
/// They survive [`PageCache::clear`] and [`PageCache::resize`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CacheStats {
    /// Calls to [`PageCache::lookup`] (`hits + misses`).
    pub lookups: u64,
    /// Lookups that found the page (QEMU's `xbzrle-cache.pages` counts these).
    pub hits: u64,
    /// Lookups that did not (QEMU's `xbzrle-cache.cache-miss`).
    pub misses: u64,
    /// Accepted inserts: [`Insert::Inserted`] plus [`Insert::Replaced`].
    pub inserts: u64,
    /// Inserts answered [`Insert::Refused`].
    pub refused_inserts: u64,
    /// Resident pages displaced by an insert of another page, plus pages
    /// dropped by a shrinking resize.
    pub evictions: u64,
    /// Pages resident now.
    pub resident_pages: u64,
    /// Bytes of page data resident now (`resident_pages * PAGE_SIZE`).
    pub bytes: u64,
}

/// `part / whole` as a rate, 0 when `whole` is 0.
pub(crate) fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl CacheStats {
    /// `misses / lookups`, or 0 when there were no lookups (QEMU's
    /// `cache-miss-rate` over the whole run).
    pub fn miss_rate(&self) -> f64 {
        ratio(self.misses, self.lookups)
    }

    /// `hits / lookups`, or 0 when there were no lookups.
    pub fn hit_rate(&self) -> f64 {
        ratio(self.hits, self.lookups)
    }
}

/// The XBZRLE page cache. See the [crate docs](crate) for the policies,
/// memory layout and resize semantics.
#[derive(Clone)]
pub struct PageCache {
    inner: cache::Inner,
}

impl fmt::Debug for PageCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageCache")
            .field("policy", &self.policy())
            .field("budget_bytes", &self.budget_bytes())
            .field("sets", &self.sets())
            .field("ways", &self.ways())
            .field("len", &self.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl PageCache {
    /// Builds an empty cache of `budget_bytes` (QEMU's `xbzrle-cache-size`)
    /// with `policy`. It holds `capacity_pages()` pages, at most
    /// `budget_bytes / PAGE_SIZE`; page data and metadata are allocated here.
    ///
    /// # Errors
    /// [`CacheError::BudgetTooSmall`] below one page;
    /// [`CacheError::NotPowerOfTwo`] for [`Policy::DirectMapped`] when
    /// `budget_bytes / PAGE_SIZE` is not a power of two;
    /// [`CacheError::InvalidWays`] for a way count outside `1..=MAX_WAYS`;
    /// [`CacheError::BudgetTooLarge`] when the memory cannot be addressed or
    /// allocated.
    pub fn new(budget_bytes: u64, policy: Policy) -> Result<PageCache, CacheError> {
        Ok(PageCache {
            inner: cache::Inner::new(budget_bytes, policy)?,
        })
    }

    /// Looks `addr` up for `generation` (the dirty-bitmap sync count).
    ///
    /// A hit refreshes the entry's age to `generation` (and its recency),
    /// counts a hit and returns the cached copy, mutable so the caller can
    /// bring it up to date after encoding. A miss counts a miss and returns
    /// `None`. QEMU: `cache_is_cached` + `get_cached_data`.
    pub fn lookup(&mut self, addr: u64, generation: u64) -> Option<&mut Page> {
        self.inner.lookup(addr, generation)
    }

    /// Whether `addr` is resident. Changes no age and no counter.
    pub fn contains(&self, addr: u64) -> bool {
        self.inner.contains(addr)
    }

    /// The cached copy of `addr`, if resident. Changes no age and no counter.
    pub fn peek(&self, addr: u64) -> Option<&Page> {
        self.inner.peek(addr)
    }

    /// Stores a copy of `page` as the cached copy of `addr`, used at
    /// `generation`. QEMU: `cache_insert`.
    ///
    /// Returns [`Insert::Replaced`] if `addr` was resident (always accepted),
    /// [`Insert::Inserted`] if it was placed in a free slot or over a page
    /// that is no longer fresh, and [`Insert::Refused`] if placing it would
    /// evict a page used in this or the previous generation, or (set-
    /// associative) if the page did not also miss in the previous generation
    /// (see [Policies](crate#policies)). Never allocates.
    ///
    /// The engine calls this after a cache miss (the page went out whole)
    /// and for a zero page that was sent (QEMU's `xbzrle_cache_zero_page`
    /// inserts a zero page, so a later small change encodes as a delta).
    pub fn insert(&mut self, addr: u64, page: &Page, generation: u64) -> Insert {
        self.inner.insert(addr, page, generation)
    }

    /// Changes the budget, keeping pages as described in
    /// [Resize](crate#resize-qemus-xbzrle-cache-size-changed-during-a-migration):
    /// growing keeps all, shrinking keeps the most recently used that fit,
    /// the same page count is a no-op.
    ///
    /// # Errors
    /// As [`PageCache::new`]; on error the cache is unchanged.
    pub fn resize(&mut self, budget_bytes: u64) -> Result<(), CacheError> {
        self.inner.resize(budget_bytes)
    }

    /// Drops every page (QEMU flushes the cache when a migration restarts)
    /// and empties the admission filter. Keeps the budget, the allocation
    /// and the counters.
    pub fn clear(&mut self) {
        self.inner.clear();
    }

    /// Counters, plus the resident pages and bytes now.
    pub fn stats(&self) -> CacheStats {
        self.inner.stats()
    }

    /// Sets every counter to zero (resident pages are kept).
    pub fn reset_stats(&mut self) {
        self.inner.reset_stats();
    }

    /// The budget last given to [`new`](PageCache::new) or
    /// [`resize`](PageCache::resize), in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.inner.budget_bytes()
    }

    /// Slots for pages: `sets() * ways()`, at most `budget_bytes / PAGE_SIZE`.
    pub fn capacity_pages(&self) -> usize {
        self.inner.geometry().capacity()
    }

    /// Number of sets (a power of two; the slot count for direct-mapped).
    pub fn sets(&self) -> usize {
        self.inner.geometry().sets
    }

    /// Slots per set (1 for direct-mapped).
    pub fn ways(&self) -> usize {
        self.inner.geometry().ways
    }

    /// Bytes allocated for page data and metadata
    /// (`capacity_pages() * (PAGE_SIZE + 16)`).
    pub fn allocated_bytes(&self) -> u64 {
        (self.capacity_pages() as u64)
            .saturating_mul((PAGE_SIZE + cache::META_BYTES_PER_SLOT) as u64)
    }

    /// Resident pages.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// `true` when no page is resident.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The policy the cache was built with.
    pub fn policy(&self) -> Policy {
        self.inner.policy()
    }
}
