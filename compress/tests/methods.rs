//! Every method round-trips; bad frames are refused with typed errors and
//! leave the page untouched.

use precopy_compress::{
    CompressError, DecompressError, Levels, Method, PAGE_SIZE, Page, PageCompressor,
    PageDecompressor,
};
use proptest::prelude::*;

/// A page built from a few runs of bytes (compressible) or noise.
fn page_strategy() -> impl Strategy<Value = Box<Page>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), PAGE_SIZE),
        proptest::collection::vec((any::<u8>(), 1usize..600), 1..40).prop_map(|runs| {
            runs.into_iter()
                .flat_map(|(b, n)| std::iter::repeat_n(b, n))
                .chain(std::iter::repeat(7))
                .take(PAGE_SIZE)
                .collect()
        }),
    ]
    .prop_map(|v| Box::new(<Page>::try_from(&v[..]).unwrap()))
}

fn round_trip(c: &mut PageCompressor, d: &mut PageDecompressor, m: Method, old: &Page, new: &Page) {
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    let n = c.compress(m, new, Some(old), &mut out).unwrap();
    let mut page = Box::new(*old);
    d.decompress(m, &out[..n], &mut page).unwrap();
    assert_eq!(&page[..], &new[..], "{m}");
}

proptest! {
    #[test]
    fn every_method_round_trips(old in page_strategy(), new in page_strategy(),
                                zstd in 0i32..=5, zlib in 0u32..=9) {
        let mut c = PageCompressor::new(Levels { zstd, zlib }).unwrap();
        let mut d = PageDecompressor::new();
        for m in Method::ALL {
            round_trip(&mut c, &mut d, m, &old, &new);
        }
    }

    #[test]
    fn arbitrary_frames_never_touch_the_page_unless_whole(frame in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut d = PageDecompressor::new();
        for m in [Method::Zstd, Method::Zlib] {
            let mut page = Box::new([0x5au8; PAGE_SIZE]);
            if d.decompress(m, &frame, &mut page).is_err() {
                prop_assert!(page.iter().all(|&b| b == 0x5a));
            }
        }
    }
}

#[test]
fn a_small_buffer_is_does_not_fit() {
    let mut c = PageCompressor::new(Levels::default()).unwrap();
    let mut noise = [0u8; PAGE_SIZE];
    let mut x = 0x1234_5678u32;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let mut out = [0u8; PAGE_SIZE - 1];
    for m in [Method::None, Method::Zstd, Method::Zlib] {
        assert_eq!(
            c.compress(m, &noise, None, &mut out),
            Err(CompressError::DoesNotFit {
                method: m,
                capacity: PAGE_SIZE - 1
            })
        );
    }
    assert_eq!(
        c.compress(Method::Xbzrle, &noise, None, &mut out),
        Err(CompressError::NoReference)
    );
}

#[test]
fn levels_outside_qemus_ranges_are_refused() {
    assert!(matches!(
        PageCompressor::new(Levels { zstd: 21, zlib: 1 }),
        Err(CompressError::BadLevel {
            method: Method::Zstd,
            level: 21,
            max: 20
        })
    ));
    assert!(matches!(
        PageCompressor::new(Levels { zstd: 1, zlib: 10 }),
        Err(CompressError::BadLevel {
            method: Method::Zlib,
            level: 10,
            max: 9
        })
    ));
}

#[test]
fn names_and_wire_ids() {
    for m in Method::ALL {
        assert_eq!(m.name().parse::<Method>().unwrap(), m);
    }
    assert!("lz4".parse::<Method>().is_err());
    assert_eq!(Method::from_wire_id(1), Ok(Method::Zstd));
    assert_eq!(Method::from_wire_id(2), Ok(Method::Zlib));
    assert_eq!(
        Method::from_wire_id(3),
        Err(DecompressError::UnknownMethod { byte: 3 })
    );
    assert_eq!(Method::None.wire_id(), None);
    assert_eq!(Method::Xbzrle.wire_id(), None);
}

fn assert_refused(m: Method, frame: &[u8], want: impl Fn(&DecompressError) -> bool) {
    let mut d = PageDecompressor::new();
    let mut page = Box::new([0xa5u8; PAGE_SIZE]);
    let e = d.decompress(m, frame, &mut page).unwrap_err();
    assert!(want(&e), "{m}: unexpected {e:?}");
    assert!(page.iter().all(|&b| b == 0xa5), "{m}: page touched");
}

#[test]
fn frames_that_inflate_past_a_page_are_refused() {
    let big = vec![0u8; 1 << 20];
    // zstd with the content size in the header: refused before decoding.
    let z = zstd::bulk::compress(&big, 1).unwrap();
    assert_refused(Method::Zstd, &z, |e| {
        matches!(
            e,
            DecompressError::TooLarge {
                method: Method::Zstd
            }
        )
    });
    // zstd without a declared size: refused when the 4096-byte bound is hit.
    let mut c = zstd::bulk::Compressor::new(1).unwrap();
    c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
        .unwrap();
    let z = c.compress(&big[..PAGE_SIZE + 1]).unwrap();
    assert_refused(Method::Zstd, &z, |e| {
        matches!(
            e,
            DecompressError::TooLarge {
                method: Method::Zstd
            }
        )
    });
    // zlib: 1 MiB of zeros.
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(1));
    std::io::Write::write_all(&mut e, &big).unwrap();
    let z = e.finish().unwrap();
    assert_refused(Method::Zlib, &z, |e| {
        matches!(
            e,
            DecompressError::TooLarge {
                method: Method::Zlib
            }
        )
    });
}

#[test]
fn short_corrupt_and_trailing_frames_are_refused() {
    let short = zstd::bulk::compress(&[1u8; 100], 1).unwrap();
    assert_refused(Method::Zstd, &short, |e| {
        matches!(
            e,
            DecompressError::TooShort {
                method: Method::Zstd,
                len: 100
            }
        )
    });
    let mut c = PageCompressor::new(Levels::default()).unwrap();
    let page = [3u8; PAGE_SIZE];
    let mut out = [0u8; PAGE_SIZE];
    for m in [Method::Zstd, Method::Zlib] {
        let n = c.compress(m, &page, None, &mut out).unwrap();
        // Cut short.
        assert_refused(m, &out[..n - 1], |e| {
            matches!(e, DecompressError::Corrupt { .. })
        });
        // Bad magic / header.
        let mut bad = out[..n].to_vec();
        bad[0] ^= 0xff;
        assert_refused(m, &bad, |e| matches!(e, DecompressError::Corrupt { .. }));
    }
    // zlib with garbage after the stream end.
    let n = c.compress(Method::Zlib, &page, None, &mut out).unwrap();
    let mut trailing = out[..n].to_vec();
    trailing.extend_from_slice(&[0, 1, 2]);
    assert_refused(Method::Zlib, &trailing, |e| {
        *e == DecompressError::TrailingBytes {
            method: Method::Zlib,
            extra: 3,
        }
    });
    // zlib with a damaged checksum (last byte).
    let mut sum = out[..n].to_vec();
    *sum.last_mut().unwrap() ^= 1;
    assert_refused(Method::Zlib, &sum, |e| {
        matches!(e, DecompressError::Corrupt { .. })
    });
    // A raw page of the wrong length, a bad xbzrle delta.
    assert_refused(Method::None, &[0; 10], |e| {
        *e == DecompressError::BadRawLength { len: 10 }
    });
    assert_refused(Method::Xbzrle, &[0, 0], |e| {
        matches!(e, DecompressError::Xbzrle(_))
    });
}
