//! `Loader` over a caller's `RamTarget`: records land in the target's own pages, the
//! target's MEM_SIZE errors become the loader's errors at the MEM_SIZE offset.

use precopy_stream::{
    Error, FormatError, Limits, Loader, Page, RamBlockInfo, RamTarget, StreamReader, StreamWriter,
    TargetError, load,
};

/// A target with one fixed-size block in fixed-size pages, as guest memory split in
/// slots: the parts are the pages, and it counts the pages handed out.
#[derive(Default)]
struct Paged {
    name: String,
    pages: Vec<Page>,
    handed_out: usize,
    refuse: bool,
}

impl RamTarget for Paged {
    fn set_blocks(&mut self, blocks: &[RamBlockInfo], max_bytes: u64) -> Result<(), TargetError> {
        if self.refuse {
            return Err(TargetError::Other("no VM today".into()));
        }
        let [b] = blocks else {
            return Err(TargetError::Mismatch { why: "one block" });
        };
        if b.used_length > max_bytes {
            return Err(TargetError::Alloc {
                bytes: b.used_length,
            });
        }
        self.name = b.name.clone();
        self.pages = vec![[0; 4096]; (b.used_length / 4096) as usize];
        Ok(())
    }

    fn block_count(&self) -> usize {
        usize::from(!self.pages.is_empty())
    }

    fn block_info(&self, block: usize) -> Option<(&str, u64)> {
        (block < self.block_count()).then(|| (self.name.as_str(), self.pages.len() as u64 * 4096))
    }

    fn page_mut(&mut self, block: usize, offset: u64) -> Option<&mut Page> {
        if block != 0 || !offset.is_multiple_of(4096) {
            return None;
        }
        self.handed_out += 1;
        self.pages.get_mut((offset / 4096) as usize)
    }

    fn block_parts(&self, block: usize) -> Vec<&[u8]> {
        if block != 0 {
            return Vec::new();
        }
        self.pages.iter().map(|p| &p[..]).collect()
    }
}

fn stream(blocks: &[RamBlockInfo]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.write_header("pc-i440fx-7.2").unwrap();
    w.ram_setup(blocks).unwrap();
    w.begin_ram_iteration().unwrap();
    w.write_page(0, 0, &[7u8; 4096]).unwrap();
    w.write_page(0, 2 * 4096, &[9u8; 4096]).unwrap();
    w.write_zero_page(0, 3 * 4096).unwrap();
    w.end_ram_section().unwrap();
    w.begin_ram_complete().unwrap();
    w.write_page(0, 2 * 4096, &[5u8; 4096]).unwrap();
    w.end_ram_section().unwrap();
    w.write_eof().unwrap();
    w.finish().unwrap()
}

fn load_into(bytes: &[u8], target: Paged) -> Result<precopy_stream::Loaded<Paged>, Error> {
    let mut reader = StreamReader::new(bytes, Limits::default());
    let mut loader = Loader::with_target(Limits::default(), target);
    loader.load_from(&mut reader)?;
    loader.finish()
}

#[test]
fn records_land_in_the_targets_pages_as_in_a_ram_image() {
    let bytes = stream(&[RamBlockInfo::new("pc.ram", 4 * 4096)]);
    let loaded = load_into(&bytes, Paged::default()).unwrap();
    let image = load(&bytes[..], Limits::default()).unwrap();
    assert_eq!(loaded.image.handed_out, 4);
    assert_eq!(loaded.image.total_bytes(), 4 * 4096);
    assert_eq!(loaded.stats, image.stats);
    let parts: Vec<u8> = loaded.image.block_parts(0).concat();
    assert_eq!(&parts[..], image.image.blocks()[0].data());
    assert_eq!(loaded.image.pages[2], [5u8; 4096]);
}

#[test]
fn target_errors_are_reported_at_the_mem_size_record() {
    let bytes = stream(&[RamBlockInfo::new("pc.ram", 4 * 4096)]);
    let mem_size_at = match load_into(
        &bytes,
        Paged {
            refuse: true,
            ..Paged::default()
        },
    ) {
        Err(Error::Target { offset, source }) => {
            assert_eq!(source.to_string(), "no VM today");
            offset
        }
        other => panic!("{:?}", other.map(|l| l.stats)),
    };
    let two = stream(&[
        RamBlockInfo::new("pc.ram", 4 * 4096),
        RamBlockInfo::new("pc.rom", 4096),
    ]);
    let e = load_into(&two, Paged::default())
        .map(|l| l.stats)
        .unwrap_err();
    assert_eq!(e.offset(), mem_size_at);
    assert!(matches!(
        e.format_error(),
        Some(FormatError::BadMemSize { why: "one block" })
    ));
}
