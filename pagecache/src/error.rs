//! Typed errors of the cache. Every variant carries the values that were
//! wrong, so a VMM can pass the message straight to its operator.

use core::fmt;

/// Why a [`PageCache`](crate::PageCache) could not be built or resized.
///
/// On error the cache is left exactly as it was (resize is all-or-nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheError {
    /// The budget holds less than one page (QEMU: "is smaller than one
    /// target page size").
    BudgetTooSmall {
        /// The budget asked for, in bytes.
        budget_bytes: u64,
        /// The page size, in bytes ([`xbzrle::PAGE_SIZE`]).
        page_size: u64,
    },
    /// [`Policy::DirectMapped`](crate::Policy::DirectMapped) needs a
    /// power-of-two number of pages (QEMU: "is not a power of two number of
    /// pages"); the cache does not round silently.
    NotPowerOfTwo {
        /// The budget asked for, in bytes.
        budget_bytes: u64,
        /// `budget_bytes / page_size`, the page count that is not a power of two.
        pages: u64,
    },
    /// The budget cannot be addressed or allocated on this machine: the page
    /// data and metadata sizes overflow `usize`/`isize`, or the allocator
    /// refused the request.
    BudgetTooLarge {
        /// The budget asked for, in bytes.
        budget_bytes: u64,
        /// Bytes the cache tried to allocate (page data + metadata), or
        /// `None` when even that size overflowed.
        alloc_bytes: Option<u64>,
    },
    /// [`Policy::SetAssociative`](crate::Policy::SetAssociative) with a way
    /// count outside `1..=MAX_WAYS`.
    InvalidWays {
        /// The way count asked for.
        ways: u16,
        /// The largest accepted way count ([`MAX_WAYS`](crate::MAX_WAYS)).
        max: u16,
    },
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CacheError::BudgetTooSmall {
                budget_bytes,
                page_size,
            } => write!(
                f,
                "XBZRLE cache size {budget_bytes} bytes is smaller than one page ({page_size} bytes)"
            ),
            CacheError::NotPowerOfTwo {
                budget_bytes,
                pages,
            } => write!(
                f,
                "XBZRLE cache size {budget_bytes} bytes gives {pages} pages, \
                 not a power of two (required by the direct-mapped policy)"
            ),
            CacheError::BudgetTooLarge {
                budget_bytes,
                alloc_bytes: Some(alloc),
            } => write!(
                f,
                "XBZRLE cache size {budget_bytes} bytes: allocating {alloc} bytes \
                 (pages + metadata) failed"
            ),
            CacheError::BudgetTooLarge {
                budget_bytes,
                alloc_bytes: None,
            } => write!(
                f,
                "XBZRLE cache size {budget_bytes} bytes exceeds the address space"
            ),
            CacheError::InvalidWays { ways, max } => write!(
                f,
                "set-associative cache with {ways} ways: the way count must be 1..={max}"
            ),
        }
    }
}

impl std::error::Error for CacheError {}
