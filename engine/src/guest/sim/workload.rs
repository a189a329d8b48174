//! The simulated guest's workloads: named, seeded patterns of page writes.

use std::fmt;
use std::str::FromStr;

/// A named, seeded pattern in which the simulated vCPUs dirty memory. One "write" dirties one
/// page; the dirty rate counts writes per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SimWorkload {
    /// `sparse`: one random 8-byte word of a uniformly chosen page (XBZRLE-friendly).
    Sparse,
    /// `cacheline`: one random 64-byte cache line of a uniformly chosen page.
    CacheLine,
    /// `fullpage`: the whole page rewritten with random data (XBZRLE overflows).
    FullPage,
    /// `zeroing`: half the writes zero a whole page, half write one word (pages going to zero
    /// and coming back).
    Zeroing,
    /// `hotset`: 90 % of the writes go to a hot set (1/16 of RAM, at most 48 MiB), sparse word
    /// updates; 10 % anywhere.
    HotSet,
    /// `mix`: each write picks one of the above (40 % hotset, 20 % sparse, 20 % cacheline,
    /// 10 % zeroing, 10 % fullpage).
    Mix,
}

impl SimWorkload {
    /// Every workload, in a fixed order.
    pub const ALL: [SimWorkload; 6] = [
        SimWorkload::Sparse,
        SimWorkload::CacheLine,
        SimWorkload::FullPage,
        SimWorkload::Zeroing,
        SimWorkload::HotSet,
        SimWorkload::Mix,
    ];

    /// The workload's name as accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            SimWorkload::Sparse => "sparse",
            SimWorkload::CacheLine => "cacheline",
            SimWorkload::FullPage => "fullpage",
            SimWorkload::Zeroing => "zeroing",
            SimWorkload::HotSet => "hotset",
            SimWorkload::Mix => "mix",
        }
    }
}

impl fmt::Display for SimWorkload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown workload name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown workload {0:?} (expected one of sparse, cacheline, fullpage, zeroing, hotset, mix)"
)]
pub struct UnknownWorkload(pub String);

impl FromStr for SimWorkload {
    type Err = UnknownWorkload;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SimWorkload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| UnknownWorkload(s.to_owned()))
    }
}
