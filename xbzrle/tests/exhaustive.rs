//! Exhaustive sweeps per backend against the reference encoder: every start
//! offset × run lengths that cross every block and word boundary, on a zero
//! and a noisy base page, plus two-run and many-run patterns.

mod common;

use common::{changed, codecs, noise_page, reference_delta};
use xbzrle::{Codec, PAGE_SIZE, Page};

const LENGTHS: &[usize] = &[1, 2, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 128, 129];

fn check(c: &Codec, old: &Page, new: &Page, out: &mut [u8]) {
    let want = reference_delta(old, new);
    let n = c.encode(old, new, out).unwrap();
    assert_eq!(&out[..n], &want[..], "{}", c.backend().name());
    let mut page = *old;
    xbzrle::decode(&out[..n], &mut page).unwrap();
    assert!(page == *new);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "4096 offsets x 15 lengths x backends; minutes under Miri"
)]
fn every_offset_every_boundary_length() {
    let bases = [[0u8; PAGE_SIZE], noise_page(1)];
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    for c in codecs("every_offset_every_boundary_length") {
        for base in &bases {
            for start in 0..PAGE_SIZE {
                for &len in LENGTHS.iter().chain([&(PAGE_SIZE - start)]) {
                    if start + len > PAGE_SIZE {
                        continue;
                    }
                    let new = changed(base, start..start + len);
                    check(&c, base, &new, &mut out);
                }
            }
        }
    }
}

#[test]
#[cfg_attr(miri, ignore = "tens of thousands of encodes; minutes under Miri")]
fn two_runs_every_gap() {
    let base = noise_page(2);
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    for c in codecs("two_runs_every_gap") {
        for start in [0usize, 1, 30, 31, 32, 62, 63, 64, 65, 127, 128, 4000] {
            for &l1 in LENGTHS {
                for gap in [
                    1usize, 2, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200,
                ] {
                    let s2 = start + l1 + gap;
                    if s2 >= PAGE_SIZE {
                        continue;
                    }
                    for &l2 in &[1usize, 9, 64, 200] {
                        let e2 = (s2 + l2).min(PAGE_SIZE);
                        let new = changed(&changed(&base, start..start + l1), s2..e2);
                        check(&c, &base, &new, &mut out);
                    }
                }
            }
        }
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "a hundred page pairs on every backend; minutes under Miri"
)]
fn many_runs_periodic() {
    let base = noise_page(3);
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    for c in codecs("many_runs_periodic") {
        for period in [2usize, 3, 5, 8, 9, 16, 63, 64, 65, 130] {
            for width in 1..period.min(12) {
                let mut new = base;
                for s in (0..PAGE_SIZE).step_by(period) {
                    for b in &mut new[s..(s + width).min(PAGE_SIZE)] {
                        *b = !*b;
                    }
                }
                check(&c, &base, &new, &mut out);
            }
        }
    }
}
