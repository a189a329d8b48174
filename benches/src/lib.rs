//! Shared workload generators for the precopy benches: page pairs for the
//! XBZRLE codec (`unchanged`, `sparse8`, `line64`, `words25`, `random`,
//! and the real pairs QEMU 7.2 encoded, `qemu`), zero / non-zero pages for
//! the zero-page test, a plain word-at-a-time encoder as a baseline, and the
//! fastest-read kernels the `limits` binary measures as the physical limit.
//!
//! Other benches (pagecache, stream, engine) may use these generators.

pub mod corpus;

use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
pub use xbzrle::{PAGE_SIZE, Page};

/// The benches' random generator (fast, seedable, reproducible).
pub type BenchRng = Xoshiro256PlusPlus;

/// A generator seeded with `seed`.
pub fn rng(seed: u64) -> BenchRng {
    Xoshiro256PlusPlus::seed_from_u64(seed)
}

/// What changed between the old and the new page of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// The page was rewritten with the same bytes (encodes to 0 bytes).
    Unchanged,
    /// 1 to 8 scattered bytes changed.
    Sparse8,
    /// One aligned 64-byte cache line changed.
    Line64,
    /// Each 8-byte word replaced by a random value with probability 25 %.
    Words25,
    /// The whole page replaced by random bytes (overflows a 4 KiB buffer).
    Random,
    /// The real (old, new) pairs of `shared/qemu-vectors/xbzrle-vectors.bin.xz`.
    Qemu,
}

impl Workload {
    /// Every encode workload, in report order.
    pub const ALL: [Workload; 6] = [
        Workload::Unchanged,
        Workload::Sparse8,
        Workload::Line64,
        Workload::Words25,
        Workload::Random,
        Workload::Qemu,
    ];

    /// The name used in bench ids and JSON rows.
    pub const fn name(self) -> &'static str {
        match self {
            Workload::Unchanged => "unchanged",
            Workload::Sparse8 => "sparse8",
            Workload::Line64 => "line64",
            Workload::Words25 => "words25",
            Workload::Random => "random",
            Workload::Qemu => "qemu",
        }
    }

    /// True when the pair's delta does not fit a 4 KiB buffer (no decode).
    pub const fn overflows(self) -> bool {
        matches!(self, Workload::Random)
    }
}

/// Fills `page` with random bytes.
pub fn fill_random(rng: &mut BenchRng, page: &mut [u8]) {
    rng.fill_bytes(page);
}

/// Makes `new` from `old` for a synthetic workload (`Qemu` pairs come from
/// [`QemuPairs`]; asking for it here copies `old`).
pub fn make_new(w: Workload, rng: &mut BenchRng, old: &Page, new: &mut Page) {
    match w {
        Workload::Random => {
            rng.fill_bytes(new);
            return;
        }
        _ => new.copy_from_slice(old),
    }
    match w {
        Workload::Unchanged | Workload::Random | Workload::Qemu => {}
        Workload::Sparse8 => {
            for _ in 0..rng.gen_range(1..=8) {
                let i = rng.gen_range(0..PAGE_SIZE);
                new[i] ^= rng.gen_range(1..=255u8);
            }
        }
        Workload::Line64 => {
            let line = rng.gen_range(0..PAGE_SIZE / 64) * 64;
            for b in &mut new[line..line + 64] {
                *b ^= rng.gen_range(1..=255u8);
            }
        }
        Workload::Words25 => {
            for w in new.chunks_exact_mut(8) {
                if rng.gen_ratio(1, 4) {
                    w.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
            }
        }
    }
}

/// A boxed page pair for a synthetic workload, old page random.
pub fn pair(w: Workload, rng: &mut BenchRng) -> (Box<Page>, Box<Page>) {
    let mut old = Box::new([0u8; PAGE_SIZE]);
    let mut new = Box::new([0u8; PAGE_SIZE]);
    fill_random(rng, &mut old[..]);
    make_new(w, rng, &old, &mut new);
    (old, new)
}

/// One record of the QEMU vectors file: the page before (`old`), QEMU's
/// delta (`delta`), the page after (`new`).
pub use precopy_testsupport::XbzrleRecord as QemuPair;

/// The real pairs of `xbzrle-vectors.bin.xz`.
pub struct QemuPairs;

impl QemuPairs {
    /// Loads every record (9349 in the shared file), the vectors located by
    /// `precopy_testsupport` (`$PRECOPY_VECTORS`, else `../shared/qemu-vectors`
    /// beside the workspace). Without the vectors: `None` after one
    /// `SKIPPED {what}: ...` line on stderr saying how to get them, or a
    /// panic under `PRECOPY_REQUIRE_VECTORS=1`.
    ///
    /// # Panics
    /// When the vectors folder exists but the file cannot be read or parsed
    /// (the message names the file and the record).
    pub fn load_or_skip(what: &str) -> Option<Vec<QemuPair>> {
        let v = precopy_testsupport::vectors_or_skip(what)?;
        Some(v.xbzrle_records().unwrap_or_else(|e| panic!("{what}: {e}")))
    }
}

/// Plain 8-bytes-at-a-time encoder: the baseline the portable backend is
/// measured against. Skips equal 8-byte words, then steps bytes to the run
/// boundary; skips 8-byte words whose bytes all differ inside literal runs.
/// Same output and overflow rule as `xbzrle::encode`.
///
/// # Errors
/// `Overflow` when the canonical delta is longer than `out`.
pub fn word_loop_encode(
    old: &Page,
    new: &Page,
    out: &mut [u8],
) -> Result<usize, xbzrle::EncodeError> {
    use xbzrle::format::uleb128_encode_small;
    let word = |p: &Page, i: usize| u64::from_ne_bytes(p[i..i + 8].try_into().unwrap_or([0; 8]));
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    let mut d = 0;
    while i < PAGE_SIZE {
        let zstart = i;
        while i + 8 <= PAGE_SIZE && word(old, i) == word(new, i) {
            i += 8;
        }
        while i < PAGE_SIZE && old[i] == new[i] {
            i += 1;
        }
        if i == PAGE_SIZE {
            break;
        }
        let s = i;
        // words with no equal byte (xor has no zero byte)
        while i + 8 <= PAGE_SIZE && {
            let x = word(old, i) ^ word(new, i);
            x.wrapping_sub(LO) & !x & HI == 0
        } {
            i += 8;
        }
        while i < PAGE_SIZE && old[i] != new[i] {
            i += 1;
        }
        let tail = out.get_mut(d..).unwrap_or_default();
        d += uleb128_encode_small(s - zstart, tail).ok_or(xbzrle::EncodeError::Overflow)?;
        let tail = out.get_mut(d..).unwrap_or_default();
        d += uleb128_encode_small(i - s, tail).ok_or(xbzrle::EncodeError::Overflow)?;
        let lit = out
            .get_mut(d..d + (i - s))
            .ok_or(xbzrle::EncodeError::Overflow)?;
        lit.copy_from_slice(&new[s..i]);
        d += i - s;
    }
    Ok(d)
}

/// The fastest read of `bufs` this machine has (AVX-512, else AVX2, else
/// 64-bit words), returning an OR-fold so the loads cannot be dropped. Each
/// buffer's length must be a multiple of 256 bytes (pages are).
pub fn read_fold(bufs: &[&[u8]]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reports AVX-512F.
            return bufs
                .iter()
                .fold(0, |acc, b| acc | unsafe { x86::read_avx512(b) });
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU reports AVX2.
            return bufs
                .iter()
                .fold(0, |acc, b| acc | unsafe { x86::read_avx2(b) });
        }
    }
    bufs.iter().fold(0, |acc, b| {
        acc | b.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]))
        })
    })
}

/// Name of the read kernel [`read_fold`] uses here.
pub fn read_kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "u64"
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// OR of every 64-byte vector of `b` (4 independent accumulators).
    #[target_feature(enable = "avx512f")]
    pub(crate) fn read_avx512(b: &[u8]) -> u64 {
        let mut acc = [_mm512_setzero_si512(); 4];
        for chunk in b.chunks_exact(256) {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: chunk holds 256 bytes, so bytes 64k..64k+64 are
                // readable; loadu needs no alignment.
                let v = unsafe { _mm512_loadu_si512(chunk.as_ptr().add(64 * k).cast()) };
                *a = _mm512_or_si512(*a, v);
            }
        }
        let v = _mm512_or_si512(
            _mm512_or_si512(acc[0], acc[1]),
            _mm512_or_si512(acc[2], acc[3]),
        );
        _mm512_reduce_or_epi64(v) as u64
    }

    /// OR of every 32-byte vector of `b` (4 independent accumulators).
    #[target_feature(enable = "avx2")]
    pub(crate) fn read_avx2(b: &[u8]) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 4];
        for chunk in b.chunks_exact(128) {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: chunk holds 128 bytes, so bytes 32k..32k+32 are
                // readable; loadu needs no alignment.
                let v = unsafe { _mm256_loadu_si256(chunk.as_ptr().add(32 * k).cast()) };
                *a = _mm256_or_si256(*a, v);
            }
        }
        let v = _mm256_or_si256(
            _mm256_or_si256(acc[0], acc[1]),
            _mm256_or_si256(acc[2], acc[3]),
        );
        (_mm256_extract_epi64::<0>(v)
            | _mm256_extract_epi64::<1>(v)
            | _mm256_extract_epi64::<2>(v)
            | _mm256_extract_epi64::<3>(v)) as u64
    }
}

/// A page-aligned-enough block of `n` pages, every page written once (so
/// the memory is really mapped, not the shared zero page).
pub fn page_arena(n: usize, rng: &mut BenchRng) -> Vec<Page> {
    let mut v = vec![[0u8; PAGE_SIZE]; n];
    for p in &mut v {
        fill_random(rng, &mut p[..]);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_loop_matches_reference() {
        let mut r = rng(1);
        for w in Workload::ALL {
            for _ in 0..50 {
                let (old, new) = pair(w, &mut r);
                let mut a = [0u8; PAGE_SIZE];
                let mut b = [0u8; PAGE_SIZE];
                let ra = word_loop_encode(&old, &new, &mut a);
                let rb = xbzrle::reference::encode(&old, &new, &mut b);
                assert_eq!(ra, rb, "{}", w.name());
                if let Ok(n) = ra {
                    assert_eq!(a[..n], b[..n]);
                }
            }
        }
    }

    #[test]
    fn workloads_have_their_shape() {
        let mut r = rng(2);
        let mut out = [0u8; PAGE_SIZE];
        let (o, n) = pair(Workload::Unchanged, &mut r);
        assert_eq!(xbzrle::encode(&o, &n, &mut out), Ok(0));
        let (o, n) = pair(Workload::Random, &mut r);
        assert!(xbzrle::encode(&o, &n, &mut out).is_err());
        let (o, n) = pair(Workload::Line64, &mut r);
        let diff = o.iter().zip(n.iter()).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 64);
        let (o, n) = pair(Workload::Sparse8, &mut r);
        let diff = o.iter().zip(n.iter()).filter(|(a, b)| a != b).count();
        assert!((1..=8).contains(&diff));
    }

    #[test]
    fn read_fold_sees_every_byte() {
        let mut buf = vec![0u8; 8192];
        assert_eq!(read_fold(&[&buf]), 0);
        for i in [0, 63, 64, 4095, 8191] {
            buf[i] = 1;
            assert_ne!(read_fold(&[&buf[..4096], &buf[4096..]]), 0, "{i}");
            buf[i] = 0;
        }
    }
}
