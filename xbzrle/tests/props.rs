//! Property tests with structured page pairs (sparse, clustered and dense
//! changes over zero or noisy pages): every backend equals the reference on
//! bytes and on the overflow decision for buffer sizes around the canonical
//! length; deltas round-trip; arbitrary and mutated deltas decode exactly as
//! the reference decoder does, never partially. Case counts follow
//! `PROPTEST_CASES` (CI raises it).

mod common;

use common::{check_pair, codecs, noise_page, reference_delta};
use proptest::prelude::*;
use xbzrle::{PAGE_SIZE, Page};

/// One edit of the new page: `len` bytes from `at`, in a pattern.
#[derive(Clone, Debug)]
struct Edit {
    at: usize,
    len: usize,
    pattern: u8,
    value: u8,
}

fn edit() -> impl Strategy<Value = Edit> {
    (
        0..PAGE_SIZE,
        prop_oneof![4 => 1usize..10, 3 => 1usize..80, 1 => 1usize..4096],
        0u8..4,
        1u8..=255,
    )
        .prop_map(|(at, len, pattern, value)| Edit {
            at,
            len,
            pattern,
            value,
        })
}

/// (old, new): a zero or noisy base and 0..40 edits.
fn page_pair() -> impl Strategy<Value = (Box<Page>, Box<Page>)> {
    (
        any::<bool>(),
        any::<u64>(),
        prop::collection::vec(edit(), 0..40),
    )
        .prop_map(|(zero, seed, edits)| {
            let old = if zero {
                [0u8; PAGE_SIZE]
            } else {
                noise_page(seed)
            };
            let mut new = old;
            for e in edits {
                let end = (e.at + e.len).min(PAGE_SIZE);
                for (k, b) in new[e.at..end].iter_mut().enumerate() {
                    match e.pattern {
                        0 => *b ^= e.value,                             // every byte changed
                        1 if k % 2 == 0 => *b ^= e.value,               // comb
                        2 if k % 8 < 4 => *b = b.wrapping_add(e.value), // half words
                        3 => *b = e.value,                              // fill (may equal old)
                        _ => {}
                    }
                }
            }
            (Box::new(old), Box::new(new))
        })
}

/// `PROPTEST_CASES` (default 256) normally; a handful under Miri, which
/// interprets every byte of every page.
fn config() -> ProptestConfig {
    if cfg!(miri) {
        ProptestConfig {
            cases: 4,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    } else {
        ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn backends_equal_reference((old, new) in page_pair(), slack in -4isize..4, any_cap in 0usize..5000) {
        let canon = reference_delta(&old, &new).len();
        let near = canon.saturating_add_signed(slack);
        for c in codecs("backends_equal_reference") {
            for cap in [near, any_cap, PAGE_SIZE] {
                check_pair(&c, &old, &new, cap).ok();
            }
            if let Ok(n) = check_pair(&c, &old, &new, 2 * PAGE_SIZE) {
                let mut out = vec![0u8; n];
                c.encode(&old, &new, &mut out).unwrap();
                let mut page = *old;
                xbzrle::decode(&out, &mut page).unwrap();
                prop_assert!(page == *new);
            }
        }
    }

    #[test]
    fn arbitrary_deltas_decode_like_reference(delta in prop::collection::vec(any::<u8>(), 0..64), seed in any::<u64>()) {
        let base = noise_page(seed);
        let (mut a, mut b) = (base, base);
        let ra = xbzrle::decode(&delta, &mut a);
        let rb = xbzrle::reference::decode(&delta, &mut b);
        prop_assert_eq!(ra, rb);
        prop_assert!(a == b);
        if ra.is_err() {
            prop_assert!(a == base);
        }
    }

    #[test]
    fn mutated_deltas_decode_like_reference((old, new) in page_pair(), pos in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let delta = reference_delta(&old, &new);
        let mut variants = vec![delta.clone()];
        if !delta.is_empty() {
            let mut flipped = delta.clone();
            flipped[pos.index(delta.len())] = byte;
            variants.push(flipped);
            variants.push(delta[..cut.index(delta.len())].to_vec());
        }
        for d in variants {
            let (mut a, mut b) = (*old, *old);
            let ra = xbzrle::decode(&d, &mut a);
            let rb = xbzrle::reference::decode(&d, &mut b);
            prop_assert_eq!(ra, rb);
            prop_assert!(a == b);
            if ra.is_err() {
                prop_assert!(a == *old);
            }
        }
    }

    #[test]
    fn is_zero_agrees(len in 0usize..9000, align in 0usize..64, hit in prop::option::of(any::<prop::sample::Index>())) {
        let mut buf = vec![0u8; len + align];
        if let Some(h) = hit && len > 0 {
            buf[align + h.index(len)] = 1;
        }
        let s = &buf[align..];
        let want = s.iter().all(|&b| b == 0);
        for c in codecs("is_zero_agrees") {
            prop_assert_eq!(c.is_zero(s), want, "{}", c.backend().name());
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Short deltas of a few pairs with lengths around the one- and
    /// two-byte forms (0, 1, 126..=130, ...), literals cut anywhere: the
    /// decoder's one-step path for short pairs and its hand-over to the
    /// exact rules at every position near the end of the input agree with
    /// the reference.
    #[test]
    fn short_pair_sequences_decode_like_reference(
        lead in prop_oneof![Just(None), (3700usize..=4094).prop_map(Some), (4070usize..=4094).prop_map(Some)],
        pairs in prop::collection::vec((len_near_forms(), len_near_forms()), 1..6),
        cut in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        // `lead`: a first pair that brings the rest near the end of the page.
        let mut delta = Vec::new();
        for (z, n) in lead.map(|z| (z, 1)).into_iter().chain(pairs) {
            for v in [z, n] {
                if v < 0x80 {
                    delta.push(v as u8);
                } else {
                    delta.extend([(v as u8 & 0x7f) | 0x80, (v >> 7) as u8]);
                }
            }
            delta.extend((0..n).map(|k| k as u8 ^ 0x5a));
        }
        let base = noise_page(seed);
        for d in [&delta[..], &delta[..cut.index(delta.len() + 1)]] {
            let (mut a, mut b) = (base, base);
            let ra = xbzrle::decode(d, &mut a);
            let rb = xbzrle::reference::decode(d, &mut b);
            prop_assert_eq!(ra, rb);
            prop_assert!(a == b);
            if ra.is_err() {
                prop_assert!(a == base);
            }
        }
    }
}

/// Run lengths near the edges of the format: 0, small, around 0x80 (one
/// to two bytes), and large ones that pass the end of the page.
fn len_near_forms() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(0usize),
        4 => 1usize..=9,
        2 => 120usize..=136,
        1 => 1usize..=600,
        1 => 4000usize..=4097,
    ]
}
