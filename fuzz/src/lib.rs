//! Input shapes shared by the fuzz targets and by `seeds/generate.py`.
//!
//! libFuzzer mutates flat byte strings, so each target reads its input with
//! one of the small, total parsers below. Every byte string is a valid
//! input; the shapes are chosen so that a few bytes describe the cases that
//! matter to XBZRLE (runs crossing 64-byte blocks, comb patterns that
//! overflow, dense pages, output lengths around the canonical length).
//!
//! # Page-pair layout (`xbzrle_encode_diff`, `xbzrle_roundtrip`)
//!
//! ```text
//! [seed u8] [out_len u16 LE] op*
//! op = [skip u16 LE] [ctl u8] body
//!   ctl < 0x80 : body = ctl+1 bytes; new[pos+k] ^= body[k]     (pos += ctl+1)
//!   ctl >= 0x80: body = [x u8] [stride u8];
//!                len = ((ctl & 0x7f) + 1) * 32,
//!                new[pos+k] ^= x for k % (stride % 8 + 1) == 0  (pos += len)
//! ```
//! `pos` starts at 0 and each op first advances it by `skip`; positions wrap
//! modulo `PAGE_SIZE`. `old` is [`pattern_page`]`(seed)`. An xor byte of 0
//! leaves the byte unchanged, so literal runs may hold unchanged bytes.
//!
//! `out_len` with bit 15 clear is `out_len % OUT_LEN_MOD`; with bit 15 set
//! it is the canonical delta length plus `(out_len & 0xf) - 8`, clamped at 0,
//! which aims the fuzzer at the overflow boundary.
//!
//! # Zero-buffer layout (`zero_diff`)
//!
//! ```text
//! [len u16 LE] [align u8] ([pos u16 LE] [value u8])*
//! ```
//! A zeroed buffer of `len % (2 * PAGE_SIZE + 1)` bytes starting `align % 64`
//! bytes past a 64-byte boundary, with `value` stored at `pos % len`.

use std::sync::OnceLock;

use xbzrle::{Backend, Codec, PAGE_SIZE, Page};

/// Output lengths without the boundary flag are taken modulo this. The
/// longest canonical delta (every other byte changed) is 6143 bytes, so
/// this covers both fitting and overflowing buffers.
pub const OUT_LEN_MOD: usize = 6400;

/// Bytes of guard pattern placed after every output buffer handed to an
/// encoder; they must come back unchanged.
pub const GUARD: usize = 64;

/// The value guard bytes are filled with.
pub const GUARD_BYTE: u8 = 0xa5;

/// A page derived from one byte: all zero for 0, otherwise a varied
/// pattern (so xor-ed bytes produce every value).
pub fn pattern_page(seed: u8) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    if seed != 0 {
        for (i, b) in p.iter_mut().enumerate() {
            let lo = (i as u8).wrapping_mul(seed | 1).wrapping_add(seed);
            *b = lo.rotate_left((i >> 8) as u32 % 8);
        }
    }
    p
}

/// How the output length of an encode call is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutLen {
    /// A fixed length.
    Fixed(usize),
    /// The canonical delta length plus this (may be negative; clamped at 0).
    AroundCanonical(isize),
}

impl OutLen {
    /// The concrete length, given the canonical delta length.
    pub fn resolve(self, canonical: usize) -> usize {
        match self {
            OutLen::Fixed(n) => n,
            OutLen::AroundCanonical(d) => canonical.saturating_add_signed(d),
        }
    }
}

/// A parsed page-pair input: `old`, `new` and the output length.
pub struct PagePair {
    /// The page the receiver holds.
    pub old: Box<Page>,
    /// The page the sender holds now.
    pub new: Box<Page>,
    /// Output buffer length for the encoders.
    pub out_len: OutLen,
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Some(head)
}

/// Parses the page-pair layout described in the module docs. Total: any
/// byte string gives a pair (missing fields read as 0).
pub fn page_pair(mut data: &[u8]) -> PagePair {
    let seed = take(&mut data, 1).map_or(0, |b| b[0]);
    let raw = take(&mut data, 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
    let out_len = if raw & 0x8000 != 0 {
        OutLen::AroundCanonical(isize::from((raw & 0xf) as u8) - 8)
    } else {
        OutLen::Fixed(usize::from(raw) % OUT_LEN_MOD)
    };
    let old = Box::new(pattern_page(seed));
    let mut new = old.clone();
    let mut pos = 0usize;
    while let Some(h) = take(&mut data, 3) {
        pos = (pos + usize::from(u16::from_le_bytes([h[0], h[1]]))) % PAGE_SIZE;
        let ctl = h[2];
        if ctl < 0x80 {
            let want = usize::from(ctl) + 1;
            let n = want.min(data.len());
            let body = take(&mut data, n).unwrap_or(&[]);
            for (k, x) in body.iter().enumerate() {
                new[(pos + k) % PAGE_SIZE] ^= x;
            }
            pos = (pos + want) % PAGE_SIZE;
        } else {
            let Some(b) = take(&mut data, 2) else { break };
            let (x, stride) = (b[0], usize::from(b[1] % 8) + 1);
            let len = (usize::from(ctl & 0x7f) + 1) * 32;
            for k in (0..len).step_by(stride) {
                new[(pos + k) % PAGE_SIZE] ^= x;
            }
            pos = (pos + len) % PAGE_SIZE;
        }
    }
    PagePair { old, new, out_len }
}

/// Parses the zero-buffer layout described in the module docs. Returns the
/// backing store, the offset of the buffer in it and its length; the store
/// has at least [`GUARD`] bytes after the buffer.
pub fn zero_buf(mut data: &[u8]) -> (Vec<u8>, usize, usize) {
    let len = take(&mut data, 2).map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])))
        % (2 * PAGE_SIZE + 1);
    let align = take(&mut data, 1).map_or(0, |b| usize::from(b[0] % 64));
    // Over-allocate so a 64-byte boundary exists inside, then place the
    // buffer `align` bytes after it.
    let mut storage = vec![0u8; len + align + 64 + GUARD];
    let base = storage.as_ptr().align_offset(64).min(63);
    let start = base + align;
    while let Some(op) = take(&mut data, 3) {
        if len == 0 {
            break;
        }
        let pos = usize::from(u16::from_le_bytes([op[0], op[1]])) % len;
        storage[start + pos] = op[2];
    }
    (storage, start, len)
}

/// The obviously correct zero test every backend is compared with.
pub fn naive_is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

/// A codec per backend this CPU runs (scalar first), detected once.
///
/// On first use prints the backends to stderr (so the fuzz log shows what
/// ran) and panics if `XBZRLE_REQUIRE_BACKENDS` (comma-separated names such
/// as `avx2,avx512bw`) names one that is not available: a fuzz run that
/// silently skipped the SIMD code must not pass.
pub fn codecs() -> &'static [Codec] {
    static CODECS: OnceLock<Vec<Codec>> = OnceLock::new();
    CODECS.get_or_init(|| {
        let codecs: Vec<Codec> = Backend::available()
            .map(|b| Codec::with_backend(b).expect("available backend"))
            .collect();
        let names: Vec<&str> = codecs.iter().map(|c| c.backend().name()).collect();
        eprintln!("xbzrle backends fuzzed: {}", names.join(","));
        if let Ok(req) = std::env::var("XBZRLE_REQUIRE_BACKENDS") {
            for want in req.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                assert!(
                    names.contains(&want),
                    "XBZRLE_REQUIRE_BACKENDS wants {want:?}; this CPU runs {names:?}"
                );
            }
        }
        codecs
    })
}

/// Reader limits for the stream targets: small, so a hostile MEM_SIZE or
/// length field is refused instead of allocating (the fuzz run also caps
/// any single allocation with `-malloc_limit_mb`).
pub fn stream_limits() -> precopy_stream::Limits {
    precopy_stream::Limits {
        max_ram_bytes: 2 << 20,
        max_blocks: 16,
        max_device_state_bytes: 64 << 10,
        max_vm_description_bytes: 64 << 10,
    }
}

/// An `io::Read` that hands out at most `chunk` bytes per call, so the
/// stream reader's refill path sees records split at every position.
pub struct ChunkedReader<'a> {
    /// Bytes not yet read.
    pub rest: &'a [u8],
    /// Largest read.
    pub chunk: usize,
}

impl std::io::Read for ChunkedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.chunk.min(buf.len()).min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

/// A virtual file for the mapped-ram target: pieces of bytes at offsets,
/// zeros between them, so a 64 KiB input can describe a file with 1 MiB-aligned
/// page regions. Input: repeated `[be32 gap][be16 len][len bytes]`; each
/// piece starts `gap` zero bytes after the previous one
/// ended. A cut-off last piece keeps the bytes present.
pub struct SparseFile {
    /// (offset, bytes), in increasing offset order, not overlapping.
    pub pieces: Vec<(u64, Vec<u8>)>,
    /// File length: end of the last piece.
    pub len: u64,
}

impl SparseFile {
    /// Parses the input layout above.
    pub fn from_input(mut data: &[u8]) -> SparseFile {
        let mut pieces = Vec::new();
        let mut end = 0u64;
        while data.len() >= 6 {
            let gap = u64::from(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
            let n = usize::from(u16::from_be_bytes([data[4], data[5]])).min(data.len() - 6);
            let off = end + gap;
            pieces.push((off, data[6..6 + n].to_vec()));
            end = off + n as u64;
            data = &data[6 + n..];
        }
        SparseFile { pieces, len: end }
    }

    /// The inverse of [`SparseFile::from_input`] (for seeds and tests).
    pub fn to_input(pieces: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut end = 0u64;
        for (off, b) in pieces {
            out.extend_from_slice(&((off - end) as u32).to_be_bytes());
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(b);
            end = off + b.len() as u64;
        }
        out
    }
}

impl precopy_stream::mapped_ram::ReadAt for SparseFile {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.fill(0);
        for (po, pb) in &self.pieces {
            let pe = po + pb.len() as u64;
            let (a, z) = (offset.max(*po), end.min(pe));
            if a < z {
                buf[(a - offset) as usize..(z - offset) as usize]
                    .copy_from_slice(&pb[(a - po) as usize..(z - po) as usize]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The committed seeds still mean what `seeds/generate.py` says, so a
    //! format change that makes them useless is noticed.
    use super::*;
    use precopy_stream::{StopReason, load};

    fn seed(target: &str, name: &str) -> Vec<u8> {
        let path = format!("{}/seeds/{target}/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn compressed_seeds_inflate_to_their_page_or_are_refused() {
        use precopy_compress::{Method, PageDecompressor};
        let mut d = PageDecompressor::new();
        let text: Vec<u8> = b"precopy migrates guest memory; "
            .iter()
            .copied()
            .cycle()
            .take(4096)
            .collect();
        for (name, ok) in [
            ("zstd-text", true),
            ("zlib-text", true),
            ("zstd-text-cut", false),
            ("zlib-past-page", false),
        ] {
            let data = seed("stream_compressed", name);
            let m = Method::from_wire_id(data[0]).unwrap();
            let mut page = [0u8; 4096];
            let r = d.decompress(m, &data[2..], &mut page);
            assert_eq!(r.is_ok(), ok, "{name}: {r:?}");
            if ok && name.ends_with("text") {
                assert_eq!(page[..], text[..], "{name}");
            }
        }
        assert!(Method::from_wire_id(seed("stream_compressed", "unknown-method")[0]).is_err());
    }

    #[test]
    fn multifd_channel_seed_is_a_complete_channel_with_two_sync_points() {
        use precopy_stream::multifd::{HELLO_LEN, Hello};
        use precopy_stream::{Decoder, Item, RamBlockInfo, RamRecord};
        let data = seed("multifd_channel", "hand-channel");
        let h = Hello::parse(&data).unwrap();
        assert_eq!((h.index, h.channels), (1, 2));
        let mut dec = Decoder::multifd_channel(
            stream_limits(),
            vec![
                RamBlockInfo::new("pc.ram", 8 * 4096),
                RamBlockInfo::new("vga", 2 * 4096),
            ],
        );
        let mut rest = &data[HELLO_LEN..];
        let (mut syncs, mut pages) = (Vec::new(), 0);
        while let Some((item, n)) = dec.decode(rest).unwrap() {
            match item {
                Item::Ram(RamRecord::MultifdFlush { seq }) => syncs.push(seq),
                Item::Ram(RamRecord::Eos) => {}
                _ => pages += 1,
            }
            rest = &rest[n..];
        }
        assert!(dec.is_complete() && rest.is_empty());
        assert_eq!(syncs, [1, 2]);
        assert_eq!(pages, 4);
    }

    #[test]
    fn small_ram_stream_seed_loads_every_real_xbzrle_record() {
        let s = seed("stream_load", "qemu-small-ram-xbzrle");
        let l = load(&s[1..], stream_limits()).expect("seed loads");
        assert_eq!(l.stats.xbzrle.count, 41);
        assert_eq!(l.stats.page.count + l.stats.zero.count, 16);
        assert_eq!(l.machine_type.as_deref(), Some("pc-i440fx-7.2"));
        assert!(matches!(
            l.stop,
            StopReason::EndOfStream {
                vm_description: true,
                ..
            }
        ));
    }

    #[test]
    fn foreign_section_seed_stops_at_qemu_timer_section() {
        let s = seed("stream_load", "qemu-foreign-section");
        let l = load(&s[1..], stream_limits()).expect("seed loads");
        assert_eq!(l.stats.xbzrle.count, 8);
        match l.stop {
            StopReason::ForeignSection { name, .. } => assert_eq!(name, "timer"),
            other => panic!("stopped with {other:?}"),
        }
    }

    #[test]
    fn page_pair_seeds_keep_real_overflow_decisions() {
        // qemu-0045 is a 4048-byte delta: fits a page, but not 4040 bytes.
        let pp = page_pair(&seed("xbzrle_encode_diff", "qemu-0045-len4048"));
        let mut out = vec![0u8; 2 * PAGE_SIZE];
        assert_eq!(
            xbzrle::reference::encode(&pp.old, &pp.new, &mut out),
            Ok(4048)
        );
        assert_eq!(pp.out_len, OutLen::Fixed(PAGE_SIZE));
        let edge = page_pair(&seed("xbzrle_encode_diff", "qemu-0045-len4048-edge"));
        assert_eq!(edge.out_len.resolve(4048), 4047);
    }

    #[test]
    fn zero_buf_places_bytes_and_alignment() {
        let (store, start, len) = zero_buf(&[0x00, 0x10, 7, 0xff, 0x0f, 1]);
        assert_eq!((len, (store.as_ptr() as usize + start) % 64), (4096, 7));
        assert!(store[start..start + len - 1].iter().all(|&b| b == 0));
        assert_eq!(store[start + len - 1], 1);
    }

    #[test]
    fn mapped_ram_seeds_parse() {
        use precopy_stream::mapped_ram::MappedRamFile;
        for name in ["qemu10-firmware", "precopy-two-blocks"] {
            let f = SparseFile::from_input(&seed("mapped_ram_parse", name));
            let m = MappedRamFile::parse(&f, &precopy_stream::Limits::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!m.blocks.is_empty(), "{name}");
            assert!(m.blocks.iter().any(|b| b.present_pages() > 0), "{name}");
        }
    }
}
