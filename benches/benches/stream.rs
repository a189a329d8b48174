//! Benches for `precopy-stream`.
//!
//! * `stream_read`: the real QEMU 7.2 streams (decompressed once into
//!   memory), throughput in bytes of stream: `decode` walks every item with
//!   the sans-IO decoder; `load` also applies every record onto a fresh RAM
//!   image (allocation and first-touch page faults included) through the
//!   `io::Read` adapter; `apply_warm` decodes and applies from memory onto an
//!   already-mapped image (the destination's RAM); `memcpy` of the same bytes
//!   is the physical reference measured in the same run.
//! * `stream_write`: the pages of the plain stream written again through
//!   `StreamWriter` into `io::sink()`, throughput in bytes of stream.
//! * after criterion: the rate-limit check. The writer runs 2 s at a
//!   configured `max-bandwidth`, then the bandwidth is changed while writing
//!   and it runs 1 s more; measured vs configured is printed (goal: within 5 %).
//!
//! Run: `cargo bench -p precopy-benches --bench stream` (vectors located by
//! `precopy_testsupport`: `PRECOPY_VECTORS`, else `../shared/qemu-vectors`
//! beside the workspace). Without them the two criterion groups are skipped
//! with a `SKIPPED` line (a failure under `PRECOPY_REQUIRE_VECTORS=1`) and
//! only the rate-limit check runs.
// criterion_group!/criterion_main! generate undocumented public functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use precopy_stream::{
    Control, Decoder, Item, Limits, Loader, RamBlockInfo, RamRecord, StreamWriter, load,
};

/// Walks every item up to the first foreign section; returns the item count.
fn decode_all(stream: &[u8]) -> usize {
    let mut dec = Decoder::new(Limits::default());
    let mut input = stream;
    let mut items = 0;
    while let Some((item, n)) = dec.decode(input).expect("valid stream") {
        items += 1;
        input = &input[n..];
        if matches!(item, Item::ForeignSection(_)) {
            break;
        }
    }
    items
}

fn read_benches(c: &mut Criterion, streams: &[(&str, Vec<u8>)]) {
    let mut g = c.benchmark_group("stream_read");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for (name, s) in streams {
        g.throughput(Throughput::Bytes(s.len() as u64));
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| decode_all(black_box(s)))
        });
        g.bench_function(format!("load/{name}"), |b| {
            b.iter(|| {
                load(black_box(&s[..]), Limits::default())
                    .expect("loads")
                    .stats
                    .bytes
            })
        });
        // Decode + apply from the slice onto an already-mapped RAM image (a
        // destination's RAM exists before the stream arrives): the reader's
        // own cost, without page faults of a fresh allocation.
        let mut image = load(&s[..], Limits::default()).expect("loads").image;
        g.bench_function(format!("apply_warm/{name}"), |b| {
            b.iter(|| {
                let mut loader = Loader::with_image(Limits::default(), std::mem::take(&mut image));
                let mut dec = Decoder::new(Limits::default());
                let mut input = &s[..];
                while let Some((item, n)) = dec.decode(input).expect("valid") {
                    let off = dec.position() - n as u64;
                    input = &input[n..];
                    if loader.apply(off, &item, n).expect("applies") == Control::Stop {
                        break;
                    }
                }
                image = loader.take_image();
            })
        });
        let mut dst = vec![0u8; s.len()];
        g.bench_function(format!("memcpy/{name}"), |b| {
            b.iter(|| dst.copy_from_slice(black_box(s)))
        });
    }
    g.finish();
}

/// The pages (block, offset, kind) of a QEMU stream, to write them again.
enum Rec {
    Zero(usize, u64),
    Page(usize, u64, Box<[u8; 4096]>),
    Xbzrle(usize, u64, Vec<u8>),
}

fn records(stream: &[u8]) -> (Vec<RamBlockInfo>, Vec<Rec>) {
    let mut dec = Decoder::new(Limits::default());
    let mut input = stream;
    let mut blocks = vec![];
    let mut recs = vec![];
    while let Some((item, n)) = dec.decode(input).expect("valid stream") {
        input = &input[n..];
        match item {
            Item::Ram(RamRecord::MemSize { blocks: b, .. }) => blocks = b,
            Item::Ram(RamRecord::Zero { block, offset, .. }) => recs.push(Rec::Zero(block, offset)),
            Item::Ram(RamRecord::Page {
                block,
                offset,
                data,
                ..
            }) => recs.push(Rec::Page(block, offset, Box::new(*data))),
            Item::Ram(RamRecord::Xbzrle {
                block,
                offset,
                delta,
                ..
            }) => recs.push(Rec::Xbzrle(block, offset, delta.to_vec())),
            Item::ForeignSection(_) => break,
            _ => {}
        }
    }
    (blocks, recs)
}

fn write_all(blocks: &[RamBlockInfo], recs: &[Rec]) -> u64 {
    let mut w = StreamWriter::new(std::io::sink());
    w.write_header("pc-i440fx-7.2").unwrap();
    w.ram_setup(blocks).unwrap();
    w.begin_ram_iteration().unwrap();
    for r in recs {
        match r {
            Rec::Zero(b, o) => w.write_zero_page(*b, *o).unwrap(),
            Rec::Page(b, o, p) => w.write_page(*b, *o, p).unwrap(),
            Rec::Xbzrle(b, o, d) => w.write_xbzrle_page(*b, *o, d).unwrap(),
        }
    }
    w.end_ram_section().unwrap();
    w.begin_ram_complete().unwrap();
    w.end_ram_section().unwrap();
    w.write_eof().unwrap();
    let n = w.bytes_written();
    w.finish().unwrap();
    n
}

fn write_benches(c: &mut Criterion, streams: &[(&str, Vec<u8>)]) {
    let mut g = c.benchmark_group("stream_write");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for (name, s) in streams {
        let (blocks, recs) = records(s);
        let bytes = write_all(&blocks, &recs);
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(format!("writer/{name}"), |b| {
            b.iter(|| write_all(&blocks, &recs))
        });
    }
    g.finish();
}

/// Writes pages under the rate limit for `secs`; returns measured bytes/s.
fn rate_phase<W: std::io::Write>(w: &mut StreamWriter<W>, secs: f64, page: &[u8; 4096]) -> f64 {
    let start = Instant::now();
    let b0 = w.bytes_written();
    let pages = w.encoder().blocks()[0].used_length / 4096;
    let mut i = 0u64;
    loop {
        if start.elapsed().as_secs_f64() >= secs {
            break;
        }
        if w.rate_limit_exceeded() {
            w.wait_for_rate_limit().unwrap();
            continue;
        }
        w.write_page(0, (i % pages) * 4096, page).unwrap();
        i += 1;
    }
    (w.bytes_written() - b0) as f64 / start.elapsed().as_secs_f64()
}

fn rate_limit_check(quick: bool) {
    let scale = if quick { 0.15 } else { 1.0 };
    let mut w = StreamWriter::new(std::io::sink());
    w.write_header("pc-i440fx-7.2").unwrap();
    w.ram_setup(&[RamBlockInfo::new("pc.ram", 1 << 30)])
        .unwrap();
    w.begin_ram_iteration().unwrap();
    let page = [0x5au8; 4096];
    println!("rate limit (QEMU budget per 100 ms slice), writer into io::sink():");
    let mut worst: f64 = 0.0;
    for (bw, secs, label) in [
        (32u64 << 20, 2.0, "max-bandwidth 32 MiB/s for 2 s"),
        (8 << 20, 1.0, "then set to 8 MiB/s while writing, 1 s"),
    ] {
        w.set_max_bandwidth(bw);
        let measured = rate_phase(&mut w, secs * scale, &page);
        let ratio = measured / bw as f64;
        worst = worst.max((ratio - 1.0).abs());
        println!("  {label}: configured {bw} B/s, measured {measured:.0} B/s, ratio {ratio:.4}");
    }
    println!(
        "  worst deviation {:.2} % ({})",
        worst * 100.0,
        if worst <= 0.05 {
            "within 5 %"
        } else {
            "OUTSIDE 5 %"
        }
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    if let Some(v) =
        precopy_testsupport::vectors_or_skip("stream bench, stream_read and stream_write")
    {
        let unxz = |name: &str| v.read(name).unwrap_or_else(|e| panic!("{e}"));
        let streams = vec![
            ("xbzrle-stream", unxz("xbzrle-stream.bin.xz")),
            ("plain-stream", unxz("plain-stream.bin.xz")),
        ];
        let mut c = Criterion::default().configure_from_args();
        read_benches(&mut c, &streams);
        write_benches(&mut c, &streams);
        c.final_summary();
    }
    rate_limit_check(quick);
}
