//! Replay a page-send trace through a [`PageCache`] the way QEMU's RAM
//! sender drives its XBZRLE cache, to measure hit rates offline.
//!
//! # Trace format
//!
//! The `page-trace.txt` format of the project's QEMU 7.2 vectors: one line
//! per page record of a migration stream, `<kind> <hex address>`, with kind
//! `z` (ZERO record), `p` (PAGE record) or `x` (XBZRLE record), and a line
//! `sync` where a new pass over RAM begins (a dirty-bitmap sync happened).
//! Lines starting with `#` and blank lines are ignored. Addresses are hex,
//! with or without `0x`.
//!
//! # What the replay does (QEMU 7.2 `migration/ram.c`)
//!
//! * The generation (dirty-bitmap sync count) starts at 1, as QEMU's setup
//!   sync makes it, and each `sync` line adds one.
//! * The first pass sends every page whole and does not touch the cache:
//!   QEMU enables XBZRLE for a RAM pass only after the first complete pass.
//! * After it, every `p` and every `x` is a *lookup* (QEMU's
//!   `cache_is_cached` in `save_xbzrle_page`). A miss inserts the page for
//!   the current generation (the engine sends it whole and caches it). A hit
//!   is what the engine would XBZRLE-encode against the cached copy.
//! * After the first pass, a `z` inserts a zero page for the current
//!   generation without a lookup (QEMU's `xbzrle_cache_zero_page`: a zero
//!   page that is sent replaces the cached copy with zeros, and may take a
//!   slot whose page is no longer fresh).
//! * Hit rate = hits / lookups.
//!
//! A real trace (from the stream) lacks the pages QEMU found unchanged in
//! its cache and skipped without a record; those lookups were hits, so the
//! replay slightly under-counts both hits and age refreshes against QEMU's
//! own counters.

use std::fmt;

use crate::PageCache;

/// Kind of a page record in a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `z`: a ZERO record (page all zero).
    Zero,
    /// `p`: a PAGE record (page sent whole).
    Page,
    /// `x`: an XBZRLE record (delta against the cached copy).
    Xbzrle,
}

/// One trace event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// A dirty-bitmap sync: the next pass over RAM begins.
    Sync,
    /// A page record for the page at `addr` (bytes, global address).
    Send {
        /// Record kind.
        kind: Kind,
        /// Page address in bytes.
        addr: u64,
    },
}

/// A parsed page trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageTrace {
    events: Vec<Event>,
}

/// Why a trace line could not be parsed. `line` is 1-based.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// The offending line, cut to 80 characters.
    pub text: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "page trace line {}: expected `sync` or `<z|p|x> <hex address>`, found {:?}",
            self.line, self.text
        )
    }
}

impl std::error::Error for TraceError {}

impl PageTrace {
    /// Parses the text format above.
    ///
    /// # Errors
    /// [`TraceError`] naming the first line that is neither a comment, blank,
    /// `sync`, nor `<z|p|x> <hex address>`.
    pub fn parse(text: &str) -> Result<PageTrace, TraceError> {
        let mut events = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line == "sync" {
                events.push(Event::Sync);
                continue;
            }
            let bad = || TraceError {
                line: i + 1,
                text: line.chars().take(80).collect(),
            };
            let mut parts = line.split_ascii_whitespace();
            let kind = match parts.next() {
                Some("z") => Kind::Zero,
                Some("p") => Kind::Page,
                Some("x") => Kind::Xbzrle,
                _ => return Err(bad()),
            };
            let hex = parts.next().ok_or_else(bad)?;
            let hex = hex
                .strip_prefix("0x")
                .or_else(|| hex.strip_prefix("0X"))
                .unwrap_or(hex);
            let addr = u64::from_str_radix(hex, 16).map_err(|_| bad())?;
            if parts.next().is_some() {
                return Err(bad());
            }
            events.push(Event::Send { kind, addr });
        }
        Ok(PageTrace { events })
    }

    /// A trace from events (for synthetic workloads).
    pub fn from_events(events: Vec<Event>) -> PageTrace {
        PageTrace { events }
    }

    /// The events, in order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Number of `sync` events.
    pub fn syncs(&self) -> usize {
        self.events.iter().filter(|e| **e == Event::Sync).count()
    }

    /// The lookups a replay makes (every `p`/`x` after the first pass), in order.
    pub fn lookup_addrs(&self) -> impl Iterator<Item = u64> + '_ {
        let mut enabled = false;
        self.events.iter().filter_map(move |e| match *e {
            Event::Sync => {
                enabled = true;
                None
            }
            Event::Send { kind, addr } if enabled && kind != Kind::Zero => Some(addr),
            Event::Send { .. } => None,
        })
    }

    /// Working set: distinct pages (`addr / PAGE_SIZE`) among the lookups.
    pub fn working_set_pages(&self) -> usize {
        let mut pages: Vec<u64> = self
            .lookup_addrs()
            .map(|a| a / crate::PAGE_SIZE as u64)
            .collect();
        pages.sort_unstable();
        pages.dedup();
        pages.len()
    }
}

/// Counts from [`replay`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Lookups (`p`/`x` after the first pass).
    pub lookups: u64,
    /// Lookups that hit.
    pub hits: u64,
    /// Misses whose insert was refused.
    pub refused_inserts: u64,
    /// Zero pages written into the cache after the first pass.
    pub zero_inserts: u64,
    /// Generation at the end (1 + number of syncs).
    pub generation: u64,
}

impl ReplayStats {
    /// `hits / lookups` (0 without lookups).
    pub fn hit_rate(&self) -> f64 {
        crate::ratio(self.hits, self.lookups)
    }

    /// `lookups - hits`.
    pub fn misses(&self) -> u64 {
        self.lookups - self.hits
    }
}

/// Replays `trace` through `cache` as described in the [module docs](self).
/// The cache's own counters advance too. Page contents are not modelled:
/// inserted pages are zero pages.
pub fn replay(trace: &PageTrace, cache: &mut PageCache) -> ReplayStats {
    let zero = [0u8; crate::PAGE_SIZE];
    let mut s = ReplayStats {
        generation: 1,
        ..ReplayStats::default()
    };
    let mut enabled = false;
    for e in &trace.events {
        match *e {
            Event::Sync => {
                s.generation += 1;
                enabled = true;
            }
            Event::Send { .. } if !enabled => {}
            Event::Send {
                kind: Kind::Zero,
                addr,
            } => {
                s.zero_inserts += 1;
                let _ = cache.insert(addr, &zero, s.generation);
            }
            Event::Send { addr, .. } => {
                s.lookups += 1;
                if cache.lookup(addr, s.generation).is_some() {
                    s.hits += 1;
                } else if cache.insert(addr, &zero, s.generation).is_refused() {
                    s.refused_inserts += 1;
                }
            }
        }
    }
    s
}
