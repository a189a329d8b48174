//! The buffered, counted, rate-limited writer and the I/O reader adapter.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use precopy_stream::{
    Error, FormatError, Limits, RATE_LIMIT_SLICE, RamBlockInfo, RateLimiter, StopReason,
    StreamReader, StreamWriter, WriteError, load,
};
use proptest::prelude::*;

/// Counts write calls and bytes.
#[derive(Default)]
struct Counting {
    data: Vec<u8>,
    writes: usize,
    flushes: usize,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writes += 1;
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
}

fn page(seed: u64) -> [u8; 4096] {
    let mut p = [0u8; 4096];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in p.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    p
}

/// Writes a stream of `pages` pages over two blocks through `w`.
fn write_stream<W: Write>(w: &mut StreamWriter<W>, pages: u64) -> Result<(), WriteError> {
    let blocks = [
        RamBlockInfo::new("pc.ram", pages * 4096),
        RamBlockInfo::new("pc.rom", 4 * 4096),
    ];
    w.write_header("pc-i440fx-7.2")?;
    w.ram_setup(&blocks)?;
    w.begin_ram_iteration()?;
    for i in 0..pages {
        if i % 3 == 0 {
            w.write_zero_page(0, i * 4096)?;
        } else {
            w.write_page(0, i * 4096, &page(i))?;
        }
        if i % 50 == 0 {
            w.write_page(1, 0, &page(1000 + i))?;
        }
    }
    w.end_ram_section()?;
    w.begin_ram_complete()?;
    // Change byte 7 of page 1 by XBZRLE: zrun 7, nzrun 1, literal.
    w.write_xbzrle_page(0, 4096, &[7, 1, 0xee])?;
    w.end_ram_section()?;
    w.write_device_state("precopy/vcpu", 0, 1, &[1, 2, 3])?;
    w.write_device_state("precopy/vcpu", 1, 1, &[4, 5])?;
    w.write_eof()?;
    w.write_vm_description(b"{\"ram-sha256\": \"...\"}")
}

#[test]
fn writer_output_reads_back_and_counts_every_byte() {
    let mut w = StreamWriter::new(Counting::default());
    write_stream(&mut w, 300).unwrap();
    let counted = w.bytes_written();
    let sink = w.finish().unwrap();
    assert_eq!(counted, sink.data.len() as u64);
    // Buffered: far fewer write calls than records.
    assert!(
        sink.writes <= 1 + sink.data.len() / precopy_stream::DEFAULT_BUFFER_SIZE + 1,
        "{} writes",
        sink.writes
    );
    assert!(sink.flushes >= 1);

    let l = load(&sink.data[..], Limits::default()).unwrap();
    let ram = l.image.block("pc.ram").unwrap().data();
    for i in 0..300u64 {
        let got = &ram[(i * 4096) as usize..((i + 1) * 4096) as usize];
        let mut want = if i % 3 == 0 { [0; 4096] } else { page(i) };
        if i == 1 {
            want[7] = 0xee;
        }
        assert!(got == want, "page {i}");
    }
    assert_eq!(
        l.image.block("pc.rom").unwrap().data()[..4096],
        page(1000 + 250)[..]
    );
    assert_eq!(l.stats.zero.count, 100);
    assert_eq!(l.stats.page.count, 200 + 6);
    assert_eq!(l.stats.xbzrle.count, 1);
    assert_eq!(l.stats.ram_part, 1);
    assert_eq!(l.device_states.len(), 2);
    assert_eq!(
        (
            l.device_states[1].instance_id,
            &l.device_states[1].payload[..]
        ),
        (1, &[4u8, 5][..])
    );
    assert_ne!(l.device_states[0].section_id, l.device_states[1].section_id);
    assert_eq!(
        l.vm_description.as_deref(),
        Some(&b"{\"ram-sha256\": \"...\"}"[..])
    );
    assert!(matches!(
        l.stop,
        StopReason::EndOfStream {
            vm_description: true,
            ..
        }
    ));
    assert_eq!(l.stats.bytes, counted);
}

#[test]
fn writer_refuses_calls_out_of_order_and_bad_pages() {
    let mut w = StreamWriter::new(Vec::new());
    assert!(matches!(
        w.write_page(0, 0, &[0; 4096]),
        Err(WriteError::Order { .. })
    ));
    w.write_header("m").unwrap();
    assert!(matches!(w.write_header("m"), Err(WriteError::Order { .. })));
    assert!(matches!(
        w.begin_ram_iteration(),
        Err(WriteError::Order { .. })
    ));
    assert!(matches!(
        w.ram_setup(&[RamBlockInfo::new("a", 100)]),
        Err(WriteError::BadBlocks { .. })
    ));
    assert!(matches!(
        w.ram_setup(&[RamBlockInfo::new("a", 4096), RamBlockInfo::new("a", 4096)]),
        Err(WriteError::BadBlocks { .. })
    ));
    w.ram_setup(&[RamBlockInfo::new("a", 8192)]).unwrap();
    assert!(matches!(
        w.write_zero_page(0, 0),
        Err(WriteError::Order { .. })
    ));
    w.begin_ram_iteration().unwrap();
    assert!(matches!(
        w.write_zero_page(1, 0),
        Err(WriteError::NoSuchBlock { block: 1 })
    ));
    assert!(matches!(
        w.write_zero_page(0, 8192),
        Err(WriteError::BadOffset { .. })
    ));
    assert!(matches!(
        w.write_zero_page(0, 100),
        Err(WriteError::BadOffset { .. })
    ));
    assert!(matches!(
        w.write_xbzrle_page(0, 0, &[0; 4097]),
        Err(WriteError::TooLong { len: 4097, .. })
    ));
    assert!(matches!(
        w.write_device_state("precopy/x", 0, 0, &[]),
        Err(WriteError::Order { .. })
    ));
    assert!(matches!(w.write_eof(), Err(WriteError::Order { .. })));
    let before = w.bytes_written();
    assert!(matches!(
        w.write_device_state("vcpu", 0, 0, &[]),
        Err(WriteError::Order { .. } | WriteError::BadName { .. })
    ));
    assert_eq!(w.bytes_written(), before, "nothing written on error");
    w.end_ram_section().unwrap();
    assert!(matches!(
        w.write_device_state("vcpu", 0, 0, &[]),
        Err(WriteError::BadName { .. })
    ));
    assert!(
        matches!(w.write_eof(), Err(WriteError::Order { .. })),
        "EOF before ram END"
    );
    w.begin_ram_complete().unwrap();
    w.end_ram_section().unwrap();
    assert!(matches!(
        w.begin_ram_iteration(),
        Err(WriteError::Order { .. })
    ));
    assert!(matches!(
        w.write_vm_description(b"{}"),
        Err(WriteError::Order { .. })
    ));
    w.write_eof().unwrap();
    w.write_vm_description(b"{}").unwrap();
    load(&w.finish().unwrap()[..], Limits::default()).unwrap();
}

struct FailingWriter;
impl Write for FailingWriter {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn writer_io_errors_are_reported() {
    let mut w = StreamWriter::new(FailingWriter);
    w.set_buffer_size(1);
    assert!(matches!(
        w.write_header("m"),
        Err(WriteError::Io { written: 0, .. })
    ));
}

#[test]
fn rate_limiter_budget_per_100ms_slice() {
    let mut r = RateLimiter::new(1_000_000); // 100 000 bytes per slice
    let t0 = Instant::now();
    assert_eq!(r.slice_budget(), Some(100_000));
    // The limiter's slice started at construction, just before t0.
    r.record(99_999);
    assert!(!r.exceeded_at(t0));
    r.record(1);
    assert!(r.exceeded_at(t0));
    let d = r.delay_at(t0 + Duration::from_millis(30));
    assert!(
        d > Duration::ZERO && d <= Duration::from_millis(70),
        "{d:?}"
    );
    // A new slice starts with a fresh budget (the overshoot is not carried).
    r.record(1_000_000);
    assert!(!r.exceeded_at(t0 + RATE_LIMIT_SLICE + Duration::from_millis(1)));
    assert_eq!(r.slice_bytes(), 0);
    // Changing max-bandwidth acts within the current slice.
    r.record(50_000);
    let now = t0 + RATE_LIMIT_SLICE + Duration::from_millis(2);
    assert!(!r.exceeded_at(now));
    r.set_max_bandwidth(400_000);
    assert!(r.exceeded_at(now));
    // 0 is unlimited.
    r.set_max_bandwidth(0);
    r.record(u64::MAX);
    assert!(!r.exceeded_at(now));
    assert_eq!(r.slice_budget(), None);
    assert_eq!(r.delay_at(now), Duration::ZERO);
}

#[test]
fn writer_waits_for_the_next_slice() {
    let mut w = StreamWriter::new(Vec::new());
    w.set_max_bandwidth(10 * 4096 * 10); // 10 pages per slice
    w.write_header("m").unwrap();
    w.ram_setup(&[RamBlockInfo::new("a", 64 * 4096)]).unwrap();
    w.begin_ram_iteration().unwrap();
    let start = Instant::now();
    let mut sent = 0;
    let mut waits = 0;
    while sent < 25 {
        if w.rate_limit_exceeded() {
            w.wait_for_rate_limit().unwrap();
            waits += 1;
            continue;
        }
        w.write_page(0, sent * 4096, &[1; 4096]).unwrap();
        sent += 1;
    }
    // 25 pages at 10 per slice: two full slices waited out.
    assert_eq!(waits, 2);
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "{:?}",
        start.elapsed()
    );
    // Flushed before sleeping: the bytes are in the underlying writer.
    assert!(w.get_ref().len() as u64 >= 20 * 4096);
}

/// A reader that hands out at most `n` bytes per call.
struct Trickle<'a> {
    data: &'a [u8],
    n: usize,
}
impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.n.min(buf.len()).min(self.data.len());
        buf[..k].copy_from_slice(&self.data[..k]);
        self.data = &self.data[k..];
        Ok(k)
    }
}

fn small_stream() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    write_stream(&mut w, 20).unwrap();
    w.finish().unwrap()
}

#[test]
fn reader_gives_the_same_result_for_any_chunking() {
    let s = small_stream();
    let whole = load(&s[..], Limits::default()).unwrap();
    for n in [1, 2, 7, 4095, 4097, 100_000] {
        let l = load(Trickle { data: &s, n }, Limits::default()).unwrap();
        assert_eq!(l.image, whole.image, "chunk {n}");
        assert_eq!(l.stats, whole.stats, "chunk {n}");
        assert_eq!(l.device_states, whole.device_states);
    }
}

#[test]
fn reader_reports_io_errors_and_items() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
    }
    assert!(matches!(
        load(Broken, Limits::default()),
        Err(Error::Io { offset: 0, .. })
    ));
    let s = small_stream();
    let mut r = StreamReader::new(&s[..], Limits::default());
    let mut kinds = 0;
    while let Some(()) = r.next_with(|_, _, _| kinds += 1).unwrap() {}
    assert!(kinds > 20);
    assert_eq!(r.decoder().position(), s.len() as u64);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any corruption of a valid stream gives a typed error or a valid load, never a panic.
    #[test]
    fn corrupted_streams_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut s = small_stream();
        for (at, v) in flips {
            let i = at % s.len();
            s[i] = v;
        }
        let cut = cut % (s.len() + 1);
        match load(&s[..cut], Limits { max_ram_bytes: 1 << 24, ..Limits::default() }) {
            Ok(_) => {}
            Err(Error::Format { offset, kind }) => {
                prop_assert!(offset <= cut as u64);
                prop_assert!(!matches!(kind, FormatError::Stopped));
            }
            Err(e) => prop_assert!(matches!(e, Error::Alloc { .. }), "{e}"),
        }
    }

    /// Random bytes after a valid header never panic.
    #[test]
    fn random_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut s = small_stream()[..200].to_vec();
        s.extend_from_slice(&tail);
        let _ = load(&s[..], Limits { max_ram_bytes: 1 << 24, ..Limits::default() });
    }
}

#[test]
fn loader_onto_an_existing_image_checks_the_block_list() {
    use precopy_stream::{Decoder, Loader, RamImage};
    let s = small_stream();
    let first = load(&s[..], Limits::default()).unwrap();
    // Same blocks: loads onto it; a page not in the stream keeps its bytes.
    let image = first.image.clone();
    let mut reader = StreamReader::new(&s[..], Limits::default());
    let mut loader = Loader::with_image(Limits::default(), image);
    loader.load_from(&mut reader).unwrap();
    assert_eq!(loader.image(), &first.image);
    // Different blocks: refused at MEM_SIZE.
    let other = RamImage::new(&[RamBlockInfo::new("pc.ram", 4096)], 1 << 20).unwrap();
    let mut loader = Loader::with_image(Limits::default(), other);
    let mut dec = Decoder::default();
    let mut input = &s[..];
    let err = loop {
        let off = dec.position();
        let (item, n) = dec.decode(input).unwrap().unwrap();
        input = &input[n..];
        if let Err(e) = loader.apply(off, &item, n) {
            break e;
        }
    };
    assert!(
        matches!(
            err,
            Error::Format {
                kind: FormatError::BadMemSize { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(loader.take_image().total_bytes(), 4096);
}

/// One random operation on a page of a 3-block guest.
#[derive(Clone, Debug)]
enum Op {
    Zero(usize, u64),
    Page(usize, u64, u8),
    /// Change `len` bytes at `at` to `val`, sent as XBZRLE against the model.
    Delta(usize, u64, u16, u16, u8),
    /// Close the ram PART and open another.
    NewPart,
}

fn op() -> impl Strategy<Value = Op> {
    let block = 0usize..3;
    let page = 0u64..4;
    prop_oneof![
        (block.clone(), page.clone()).prop_map(|(b, p)| Op::Zero(b, p)),
        (block.clone(), page.clone(), any::<u8>()).prop_map(|(b, p, v)| Op::Page(b, p, v)),
        (block, page, 0u16..4096, 1u16..300, any::<u8>())
            .prop_map(|(b, p, at, len, v)| Op::Delta(b, p, at, len, v)),
        Just(Op::NewPart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever page sequence the writer is given, the reader rebuilds the
    /// same RAM as a model that applies the pages directly, and the counts match.
    #[test]
    fn writer_then_reader_rebuilds_the_model(ops in proptest::collection::vec(op(), 0..60)) {
        let infos = [
            RamBlockInfo::new("pc.ram", 4 * 4096),
            RamBlockInfo::new("/rom@etc/acpi/tables", 4 * 4096),
            RamBlockInfo::new("pc.bios", 4 * 4096),
        ];
        let mut model = vec![vec![0u8; 4 * 4096]; 3];
        let mut w = StreamWriter::new(Vec::new());
        w.set_buffer_size(1000);
        w.write_header("pc-i440fx-7.2").unwrap();
        w.ram_setup(&infos).unwrap();
        w.begin_ram_iteration().unwrap();
        let (mut zero, mut pages, mut deltas) = (0, 0, 0);
        for op in &ops {
            match *op {
                Op::Zero(b, p) => {
                    model[b][(p * 4096) as usize..][..4096].fill(0);
                    w.write_zero_page(b, p * 4096).unwrap();
                    zero += 1;
                }
                Op::Page(b, p, v) => {
                    model[b][(p * 4096) as usize..][..4096].fill(v);
                    w.write_page(b, p * 4096, &[v; 4096]).unwrap();
                    pages += 1;
                }
                Op::Delta(b, p, at, len, v) => {
                    let old: [u8; 4096] = model[b][(p * 4096) as usize..][..4096].try_into().unwrap();
                    let mut new = old;
                    let end = (at as usize + len as usize).min(4096);
                    new[at as usize..end].fill(v);
                    let mut out = [0u8; 4096];
                    if let Ok(n) = xbzrle::encode(&old, &new, &mut out) {
                        w.write_xbzrle_page(b, p * 4096, &out[..n]).unwrap();
                        model[b][(p * 4096) as usize..][..4096].copy_from_slice(&new);
                        deltas += 1;
                    }
                }
                Op::NewPart => {
                    w.end_ram_section().unwrap();
                    w.begin_ram_iteration().unwrap();
                }
            }
        }
        w.end_ram_section().unwrap();
        w.begin_ram_complete().unwrap();
        w.end_ram_section().unwrap();
        w.write_eof().unwrap();
        let n = w.bytes_written();
        let bytes = w.finish().unwrap();
        prop_assert_eq!(n, bytes.len() as u64);
        let l = load(&bytes[..], Limits::default()).unwrap();
        for (b, m) in l.image.blocks().iter().zip(&model) {
            prop_assert!(b.data() == &m[..], "block {}", b.name());
        }
        prop_assert_eq!((l.stats.zero.count, l.stats.page.count, l.stats.xbzrle.count), (zero, pages, deltas));
        prop_assert_eq!(l.stats.bytes, n);
    }
}
