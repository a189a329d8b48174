//! `precopy migrate --page-compression none|xbzrle|zstd|zlib|auto` (our extension) with
//! QEMU's level parameters `--multifd-zstd-level` and `--multifd-zlib-level`, and the
//! per-method lines of the text summary. `precopy incoming` needs no option: it decodes
//! every method the source sends.

use precopy_engine::{Capabilities, MigrationInfo, PageCompression, ParameterUpdate};

use crate::report::kib;

/// The page compression options of `precopy migrate`.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct CompressionArgs {
    /// page-compression (ours): none, xbzrle, zstd, zlib, or auto (per page, the method
    /// with the least estimated time on the measured link and CPU). Given, it decides the
    /// xbzrle capability: on for xbzrle and auto, off for none, zstd and zlib (one method
    /// each); not given, --xbzrle decides and pages go raw.
    #[arg(long)]
    pub(crate) page_compression: Option<PageCompression>,
    /// multifd-zstd-level: zstd level, 0..=20 (default 1).
    #[arg(long)]
    pub(crate) multifd_zstd_level: Option<i32>,
    /// multifd-zlib-level: zlib level, 0..=9 (default 1).
    #[arg(long)]
    pub(crate) multifd_zlib_level: Option<u32>,
}

impl CompressionArgs {
    /// Puts the options into the parameter update and the capabilities.
    pub(crate) fn apply(&self, u: &mut ParameterUpdate, c: &mut Capabilities) {
        u.page_compression = self.page_compression;
        u.multifd_zstd_level = self.multifd_zstd_level;
        u.multifd_zlib_level = self.multifd_zlib_level;
        if let Some(m) = self.page_compression {
            c.xbzrle = m.needs_xbzrle_cache();
        }
    }
}

/// The summary lines of the per-method statistics (`info migrate` style).
pub(crate) fn print_page_compression(info: &MigrationInfo) {
    let Some(p) = &info.page_compression else {
        return;
    };
    // Not asked for: nothing to say (as QEMU's `info migrate` says nothing of it).
    if p.method == "none" && p.zstd.pages + p.zlib.pages == 0 {
        return;
    }
    println!("page compression: {}", p.method);
    for (name, s) in [
        ("none", &p.none),
        ("xbzrle", &p.xbzrle),
        ("zstd", &p.zstd),
        ("zlib", &p.zlib),
    ] {
        println!(
            "page compression {name}: {} pages, {} kbytes, cpu {} ms",
            s.pages,
            kib(s.bytes),
            s.cpu_time_ns / 1_000_000
        );
    }
    if p.link_bandwidth > 0 {
        println!(
            "page compression link estimate: {} mbps",
            p.link_bandwidth * 8 / 1_000_000
        );
    }
}
