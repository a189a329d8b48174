//! Arbitrary bytes as the tail of a QEMU stream (from its first device section to the end)
//! into `split_device_state`, and arbitrary streams into `Loader::load_to_end` over a
//! chunked reader: no panic; on success the device state ends at the EOF byte, the
//! sections lie back to back inside it, each starting with a FULL header and ending with
//! its footer, and the VM description (if any) runs exactly to the end of the input.
//!
//! Input: `[chunk u8] bytes...`; reads return at most `chunk * 61 + 1` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::{ChunkedReader, stream_limits};
use precopy_stream::{Loader, StreamReader, split_device_state};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    if let Ok((dev, vmdesc)) = split_device_state(1000, input) {
        assert_eq!(dev.offset, 1000);
        assert_eq!(dev.eof_offset, 1000 + dev.bytes.len() as u64);
        assert_eq!(input[dev.bytes.len()], 0x00, "EOF byte");
        match vmdesc {
            Some(j) => assert_eq!(dev.bytes.len() + 6 + j.len(), input.len()),
            None => assert_eq!(dev.bytes.len() + 1, input.len()),
        }
        let mut at = dev.offset;
        for (i, s) in dev.sections.iter().enumerate() {
            assert_eq!(s.offset, at, "sections back to back");
            let b = dev.section_bytes(i).expect("section inside the bytes");
            assert_eq!(b[0], 0x04);
            assert_eq!(b[b.len() - 5], 0x7e);
            assert_eq!(b[b.len() - 4..], s.section_id.to_be_bytes());
            at += s.len;
        }
        if !dev.sections.is_empty() {
            assert_eq!(at, dev.eof_offset, "sections cover the device state");
        }
    }
    let limits = stream_limits();
    let mut reader = StreamReader::new(
        ChunkedReader {
            rest: input,
            chunk: usize::from(chunk) * 61 + 1,
        },
        limits,
    );
    let mut loader = Loader::new(limits);
    match loader.load_to_end(&mut reader) {
        Ok(()) => {
            let l = loader.finish().expect("a loaded stream finishes");
            if let Some(d) = &l.foreign_device_state {
                assert!(d.eof_offset < input.len() as u64);
                assert_eq!(l.stats.bytes, input.len() as u64, "read to the end");
            }
        }
        Err(e) => assert!(e.offset() <= input.len() as u64, "{e}"),
    }
});
