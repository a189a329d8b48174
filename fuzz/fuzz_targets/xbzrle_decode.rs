//! Arbitrary delta onto a page: `xbzrle::decode` never panics, is
//! all-or-nothing, and agrees with `xbzrle::reference::decode` on the
//! result, the error kind and the error offset.
//!
//! Input: `[page seed u8] delta...` (the page is `pattern_page(seed)`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::pattern_page;

fuzz_target!(|data: &[u8]| {
    let (seed, delta) = match data.split_first() {
        Some((s, d)) => (*s, d),
        None => (0, data),
    };
    let old = Box::new(pattern_page(seed));

    let mut page = old.clone();
    let got = xbzrle::decode(delta, &mut page);
    let mut ref_page = old.clone();
    let want = xbzrle::reference::decode(delta, &mut ref_page);

    assert_eq!(got, want, "decode and reference::decode disagree");
    assert!(
        page[..] == ref_page[..],
        "decoded pages differ from the reference"
    );
    if let Err(e) = got {
        assert!(
            page[..] == old[..],
            "page changed although decode failed: {e}"
        );
        assert!(
            e.offset() <= delta.len(),
            "error offset {} past the end of a delta of {}",
            e.offset(),
            delta.len()
        );
    } else {
        // A delta that decodes is re-encoded canonically; that delta must
        // bring `old` to the same page.
        let mut out = vec![0u8; 2 * xbzrle::PAGE_SIZE];
        let n = xbzrle::reference::encode(&old, &page, &mut out).expect("2 pages always fit");
        let mut again = old.clone();
        xbzrle::decode(&out[..n], &mut again).expect("canonical delta decodes");
        assert!(
            again[..] == page[..],
            "canonical re-encoding decodes differently"
        );
    }
});
