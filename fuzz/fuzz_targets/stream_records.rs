//! Arbitrary bytes into the sans-IO stream `Decoder`: no panic; every item
//! consumes at least one byte and no more than it was given; `position()`
//! advances by exactly what was consumed; errors carry the offset of the
//! refused item (inside the input) and the decoder stays stopped after one;
//! and feeding the same bytes in small pieces (`Ok(None)` = "need more",
//! state unchanged) gives exactly the items and the outcome of feeding them
//! whole.
//!
//! Input: `[step u8] stream...`; the pieces are `step + 1` bytes long.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::stream_limits;
use precopy_stream::{Decoder, Item, Limits};

/// How decoding ended: Ok, or the error's offset and text.
type Outcome = Result<(), (u64, String)>;

fn run(input: &[u8], step: usize) -> (Vec<(u64, Item<'_>, usize)>, Outcome) {
    // The decoder allocates nothing from MEM_SIZE, so real block lists
    // (128 MiB of RAM) pass; every other limit stays small.
    let limits = Limits {
        max_ram_bytes: Limits::default().max_ram_bytes,
        ..stream_limits()
    };
    let mut dec = Decoder::new(limits);
    let mut items = Vec::new();
    let mut start = 0usize;
    let mut end = step.min(input.len());
    let outcome = loop {
        let pos = dec.position();
        assert_eq!(pos, start as u64, "position() is not the bytes consumed");
        match dec.decode(&input[start..end]) {
            Ok(Some((item, n))) => {
                assert!(
                    n >= 1 && n <= end - start,
                    "item consumed {n} of {} bytes",
                    end - start
                );
                assert_eq!(dec.position(), pos + n as u64);
                assert!(dec.blocks().len() <= limits.max_blocks);
                let stop = matches!(item, Item::ForeignSection(_));
                items.push((pos, item, n));
                start += n;
                if stop {
                    assert!(dec.is_stopped());
                    assert!(
                        dec.decode(&input[start..end]).is_err(),
                        "decoder goes on after a foreign section"
                    );
                    break Ok(());
                }
            }
            Ok(None) => {
                if end < input.len() {
                    end = (end + step).min(input.len());
                    continue;
                }
                break match dec.finish(&input[start..]) {
                    Ok(()) => {
                        assert!(
                            dec.is_complete() || dec.is_stopped(),
                            "finish accepted an unfinished stream"
                        );
                        Ok(())
                    }
                    Err(e) => {
                        assert!(
                            e.offset() <= input.len() as u64,
                            "finish error offset {} past input",
                            e.offset()
                        );
                        Err((e.offset(), e.to_string()))
                    }
                };
            }
            Err(e) => {
                assert_eq!(
                    e.offset(),
                    pos,
                    "error offset is not the refused item's start"
                );
                assert!(
                    e.format_error().is_some(),
                    "sans-IO decoder returned a non-format error: {e}"
                );
                assert!(
                    dec.decode(&input[start..end]).is_err(),
                    "decoder goes on after an error"
                );
                break Err((e.offset(), e.to_string()));
            }
        }
    };
    (items, outcome)
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let (whole, whole_end) = run(input, input.len().max(1));
    let (pieces, pieces_end) = run(input, usize::from(step) + 1);
    assert_eq!(
        whole.len(),
        pieces.len(),
        "item count differs when fed in pieces of {}",
        step as usize + 1
    );
    for (a, b) in whole.iter().zip(&pieces) {
        assert!(a == b, "item differs when fed in pieces: {a:?} vs {b:?}");
    }
    assert_eq!(whole_end, pieces_end, "outcome differs when fed in pieces");
});
