//! Arbitrary sparse files (see `precopy_fuzz::SparseFile`) into the
//! mapped-ram reader: no panic, no allocation from an unchecked field, every
//! error offset inside the file; an accepted file has every bitmap and page
//! region inside the file, in order, and its present pages read back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_fuzz::SparseFile;
use precopy_stream::mapped_ram::{MappedRamFile, PAGES_ALIGNMENT, ReadAt, bitmap_bytes};
use precopy_stream::{Error, Limits, PAGE_SIZE};

fuzz_target!(|data: &[u8]| {
    let f = SparseFile::from_input(data);
    match MappedRamFile::parse(&f, &Limits::default()) {
        Err(Error::Format { offset, .. }) => {
            assert!(offset <= f.len, "offset {offset} past {}", f.len)
        }
        Err(e) => panic!("non-format error from an in-memory file: {e}"),
        Ok(m) => {
            let mut prev_end = 0u64;
            for b in &m.blocks {
                let h = b.header;
                assert!(h.bitmap_offset >= prev_end);
                assert!(h.bitmap_offset + bitmap_bytes(b.info.used_length) <= h.pages_offset);
                assert_eq!(h.pages_offset % PAGES_ALIGNMENT, 0);
                prev_end = h.pages_offset + b.info.used_length;
                assert!(prev_end <= f.len);
                // Read up to 16 present pages through the file.
                let mut page = vec![0u8; PAGE_SIZE];
                for p in (0..b.pages()).filter(|&p| b.is_present(p)).take(16) {
                    f.read_exact_at(&mut page, b.page_file_offset(p))
                        .expect("present page inside the file");
                }
            }
            assert_eq!(prev_end, m.ram_end);
        }
    }
});
