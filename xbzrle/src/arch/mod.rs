//! Per-ISA kernels. Each file holds the block kernels of one backend and its
//! `#[target_feature]` entry points, which inline the shared safe walkers
//! ([`crate::encode`], [`crate::zero`]). The only `unsafe` here is the
//! vector loads from references (always in bounds: the arguments are
//! fixed-size blocks).

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub(crate) mod aarch64;
