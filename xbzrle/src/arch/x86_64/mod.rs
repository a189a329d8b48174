//! x86_64 backends: SSE2 (baseline), AVX2, AVX-512BW.

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod sse2;
