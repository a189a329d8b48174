//! The guest program: 32-bit protected-mode, flat segments, no paging,
//! assembled at run time with iced-x86's code assembler.
//!
//! # Guest-physical layout
//!
//! | range | use |
//! |---|---|
//! | `0x0800..0x0818` | GDT: null, flat code (0x08), flat data (0x10) |
//! | `0x1000..0x2000` | mailboxes, one 64-byte record per vCPU ([`mailbox`]) |
//! | `0x10000..` | program code (one copy shared by every vCPU) |
//! | `0x100000..end` | data: split into equal page-aligned regions, one per vCPU |
//!
//! Every vCPU starts at [`CODE_BASE`] with `EBX` = its mailbox address and
//! works only on its own region, so vCPUs never share data.
//!
//! # What one round does (all stores are 32-bit)
//!
//! 1. **Counter sweep** (page-stride stores): for `K` pages, starting at
//!    the sweep cursor and stepping `STRIDE` pages (wrapping at
//!    `SWEEP_LIMIT`, the hot set), increment
//!    word 0 of the page and decrement word 1023 (its last word).
//! 2. **Cache-line rewrite**: one xorshift32-chosen page, one of its lines
//!    1..=32, gets 16 new words; word 1023 absorbs the difference.
//! 3. Every 16th round, a **whole-page rewrite** (1023 fresh words and a
//!    balancing last word) or a **zeroing** (`rep stosd`) of a random page,
//!    alternating.
//! 4. **Verify one page** (rotating): the wrapping sum of its 1024 words
//!    must be 0, else `FAIL = 1`, `FAILED_ADDR`, `FAIL_VALUE` are written.
//! 5. Every `SCAN_INTERVAL` rounds (0 = never) a **full scan**: the sum of
//!    word 0 over every page of the region must equal `TOTAL`, else
//!    `FAIL = 2`; on success `SCANS` is incremented.
//! 6. `PROGRESS += 1`, then `out 0x80, eax` with `EAX` = pages dirtied this
//!    round, which hands control to the host for dirty-rate pacing and
//!    throttling.
//!
//! Invariants the program keeps (and [`check_region`] verifies from the
//! host): every data page's 1024 words sum to 0 (mod 2^32), and the sum of
//! the regions' words 0 equals the mailbox's `TOTAL`. A page lost or torn by
//! a migration breaks one of them.

mod asm;

pub use asm::assemble;

use super::ram::KvmRam;
use super::{ConfigError, KvmError};
use xbzrle::PAGE_SIZE;

/// Guest-physical address of the GDT.
pub const GDT_BASE: u64 = 0x800;
/// Guest-physical address of the first mailbox.
pub const MAILBOX_BASE: u64 = 0x1000;
/// Bytes per mailbox record.
pub const MAILBOX_STRIDE: u64 = 64;
/// Most vCPUs the layout supports (one mailbox page).
pub const MAX_VCPUS: usize = 64;
/// Guest-physical address of the program's first instruction.
pub const CODE_BASE: u64 = 0x10000;
/// Guest-physical address of the first data page.
pub const DATA_BASE: u64 = 0x100000;
/// I/O port the program writes at the end of each round.
pub const PACING_PORT: u16 = 0x80;
/// Smallest data region per vCPU (pages).
pub const MIN_REGION_PAGES: u64 = 64;
/// Most guest RAM the 32-bit program addresses (3 GiB, bytes).
const MAX_GUEST_RAM: u64 = 0xC000_0000;

/// Byte offsets of the `u32` fields of a vCPU's mailbox record.
pub mod mailbox {
    /// Rounds completed (the progress counter).
    pub const PROGRESS: u64 = 0;
    /// 0 while every check passed; 1 = a page's sum was not 0; 2 = the sum
    /// of words 0 did not equal `TOTAL`. Sticky.
    pub const FAIL: u64 = 4;
    /// Expected sum of word 0 over the region.
    pub const TOTAL: u64 = 8;
    /// xorshift32 state (never 0).
    pub const RNG: u64 = 12;
    /// Guest-physical address of the region's first page.
    pub const BASE: u64 = 16;
    /// Region length in pages.
    pub const PAGES: u64 = 20;
    /// Next page index of the counter sweep.
    pub const SWEEP: u64 = 24;
    /// Next page index to verify.
    pub const VERIFY: u64 = 28;
    /// Full scans completed without a mismatch.
    pub const SCANS: u64 = 32;
    /// Address of the page (FAIL = 1) that failed its check.
    pub const FAILED_ADDR: u64 = 36;
    /// Pages incremented per round by the counter sweep (`K`).
    pub const SWEEP_PAGES: u64 = 40;
    /// Sweep stride in pages.
    pub const STRIDE: u64 = 44;
    /// Rounds between full scans (0 = never).
    pub const SCAN_INTERVAL: u64 = 48;
    /// Rounds left before the next full scan.
    pub const SCAN_COUNTDOWN: u64 = 52;
    /// The sum that was found when a check failed.
    pub const FAIL_VALUE: u64 = 56;
    /// Pages the counter sweep cycles over (the hot set: the first
    /// `SWEEP_LIMIT` pages of the region).
    pub const SWEEP_LIMIT: u64 = 60;
}

/// How the guest program dirties memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmWorkload {
    /// Pages incremented per round by the counter sweep (1..=4096).
    pub sweep_pages: u32,
    /// Sweep stride in pages (≥ 1); raised to the next value coprime with
    /// the hot set's page count, so the sweep visits every page.
    pub stride: u32,
    /// Rounds between full scans of the region (0 = never).
    pub scan_interval: u32,
    /// Share of the region (1..=100 %) the counter sweep cycles over: a hot
    /// set that is re-dirtied every pass (100 = the whole region).
    pub hot_percent: u8,
    /// Seed of the guest's xorshift32 generator, sweep start and prefill.
    pub seed: u64,
    /// Share of data pages (0..=100 %) the host fills with seeded
    /// pseudo-random words before the guest starts (the rest stay zero), so
    /// a new guest does not look like an idle, all-zero one.
    pub prefill_percent: u8,
}

impl Default for KvmWorkload {
    fn default() -> Self {
        Self {
            sweep_pages: 32,
            stride: 7,
            scan_interval: 256,
            hot_percent: 100,
            seed: 0x5eed,
            prefill_percent: 75,
        }
    }
}

/// A vCPU's mailbox as read by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestStatus {
    /// Rounds completed.
    pub progress: u32,
    /// Failure code (0 = none; see [`mailbox::FAIL`]).
    pub fail: u32,
    /// Full scans that passed.
    pub scans: u32,
    /// Failing page address when `fail == 1`.
    pub failed_addr: u32,
    /// Sum found by the failing check.
    pub fail_value: u32,
}

/// Mailbox address of vCPU `index`.
pub fn mailbox_addr(index: usize) -> u64 {
    MAILBOX_BASE + index as u64 * MAILBOX_STRIDE
}

/// Data region `(first page address, pages)` of vCPU `index` of `vcpus` in
/// RAM of `ram_size` bytes.
pub fn region(ram_size: u64, vcpus: usize, index: usize) -> (u64, u64) {
    let pages = (ram_size.saturating_sub(DATA_BASE) / PAGE_SIZE as u64) / vcpus.max(1) as u64;
    (DATA_BASE + index as u64 * pages * PAGE_SIZE as u64, pages)
}

/// Checks that `vcpus` regions fit in `ram_size` bytes.
pub fn check_layout(ram_size: u64, vcpus: usize) -> Result<(), KvmError> {
    if vcpus == 0 {
        return Err(KvmError::Config(ConfigError::NoVcpus { max: MAX_VCPUS }));
    }
    if vcpus > MAX_VCPUS {
        return Err(KvmError::Config(ConfigError::TooManyVcpus {
            requested: vcpus,
            max: MAX_VCPUS,
        }));
    }
    if ram_size > MAX_GUEST_RAM {
        return Err(KvmError::Config(ConfigError::TooMuchRam {
            requested: ram_size,
            limit: MAX_GUEST_RAM,
        }));
    }
    let (_, pages) = region(ram_size, vcpus, 0);
    if pages < MIN_REGION_PAGES {
        return Err(KvmError::Config(ConfigError::TooLittleRam {
            ram_size,
            vcpus,
            pages,
            min_pages: MIN_REGION_PAGES,
        }));
    }
    Ok(())
}

/// Checks that `workload`'s parameters are in range.
fn check_workload(workload: &KvmWorkload) -> Result<(), KvmError> {
    let w = workload;
    let bad: [(&'static str, u64, &'static str, bool); 4] = [
        (
            "sweep_pages",
            w.sweep_pages.into(),
            "1..=4096",
            (1..=4096).contains(&w.sweep_pages),
        ),
        ("stride", w.stride.into(), "≥ 1", w.stride >= 1),
        (
            "prefill_percent",
            w.prefill_percent.into(),
            "≤ 100",
            w.prefill_percent <= 100,
        ),
        (
            "hot_percent",
            w.hot_percent.into(),
            "1..=100",
            (1..=100).contains(&w.hot_percent),
        ),
    ];
    match bad.into_iter().find(|&(.., ok)| !ok) {
        Some((field, value, allowed, _)) => Err(KvmError::Config(ConfigError::Workload {
            workload: *workload,
            field,
            value,
            allowed,
        })),
        None => Ok(()),
    }
}

/// Writes the GDT, every vCPU's mailbox with `workload`'s parameters, the
/// prefilled data pages and the program. The data region must be zero
/// before (fresh RAM is).
pub fn init_guest(ram: &KvmRam, vcpus: usize, workload: &KvmWorkload) -> Result<(), KvmError> {
    check_layout(ram.size(), vcpus)?;
    check_workload(workload)?;
    let gdt: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        ram.write(GDT_BASE + 8 * i as u64, &d.to_le_bytes())?;
    }
    for index in 0..vcpus {
        let (base, pages) = region(ram.size(), vcpus, index);
        // A stride sharing a factor with the region's length would confine
        // the sweep to a fraction of the pages: take the next coprime one.
        let hot = (pages * u64::from(workload.hot_percent) / 100).max(1);
        let mut stride = (u64::from(workload.stride) % hot).max(1);
        while gcd(stride, hot) != 1 {
            stride += 1;
        }
        let mut rng = splitmix(workload.seed ^ (index as u64).wrapping_mul(0x9e37_79b9));
        let mb = mailbox_addr(index);
        let mut rng32 = (rng >> 32) as u32;
        if rng32 == 0 {
            rng32 = 0x1234_5678;
        }
        rng = splitmix(rng);
        let fields = [
            (mailbox::PROGRESS, 0),
            (mailbox::FAIL, 0),
            (mailbox::TOTAL, 0),
            (mailbox::RNG, rng32),
            (mailbox::BASE, base as u32),
            (mailbox::PAGES, pages as u32),
            (mailbox::SWEEP, (rng % hot) as u32),
            (mailbox::VERIFY, 0),
            (mailbox::SCANS, 0),
            (mailbox::FAILED_ADDR, 0),
            (mailbox::SWEEP_PAGES, workload.sweep_pages),
            (mailbox::STRIDE, stride as u32),
            (mailbox::SCAN_INTERVAL, workload.scan_interval),
            (mailbox::SCAN_COUNTDOWN, workload.scan_interval.max(1)),
            (mailbox::FAIL_VALUE, 0),
            (mailbox::SWEEP_LIMIT, hot as u32),
        ];
        for (off, v) in fields {
            ram.write_u32(mb + off, v)?;
        }
        let total = prefill(ram, base, pages, workload, index)?;
        ram.write_u32(mb + mailbox::TOTAL, total)?;
    }
    let code = assemble()?;
    ram.write(CODE_BASE, &code)
}

/// Fills `prefill_percent` % of the region's pages (chosen by a seeded
/// hash) with pseudo-random words, each page's last word balancing its sum
/// to 0. Returns the sum of the pages' words 0 (the mailbox's `TOTAL`).
fn prefill(
    ram: &KvmRam,
    base: u64,
    pages: u64,
    workload: &KvmWorkload,
    index: usize,
) -> Result<u32, KvmError> {
    let mut total = 0u32;
    let mut page = [0u8; PAGE_SIZE];
    let salt = splitmix(workload.seed ^ 0x7072_6566_696c_6c00 ^ index as u64);
    for p in 0..pages {
        let mut x = splitmix(salt ^ p);
        if x % 100 >= u64::from(workload.prefill_percent) {
            continue;
        }
        let mut sum = 0u32;
        for w in page[..PAGE_SIZE - 4].chunks_exact_mut(4) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x >> 32) as u32;
            w.copy_from_slice(&v.to_le_bytes());
            sum = sum.wrapping_add(v);
        }
        page[PAGE_SIZE - 4..].copy_from_slice(&sum.wrapping_neg().to_le_bytes());
        total = total.wrapping_add(u32::from_le_bytes([page[0], page[1], page[2], page[3]]));
        ram.write(base + p * PAGE_SIZE as u64, &page)?;
    }
    Ok(total)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Reads vCPU `index`'s mailbox.
pub fn status(ram: &KvmRam, index: usize) -> Result<GuestStatus, KvmError> {
    let mb = mailbox_addr(index);
    Ok(GuestStatus {
        progress: ram.read_u32(mb + mailbox::PROGRESS)?,
        fail: ram.read_u32(mb + mailbox::FAIL)?,
        scans: ram.read_u32(mb + mailbox::SCANS)?,
        failed_addr: ram.read_u32(mb + mailbox::FAILED_ADDR)?,
        fail_value: ram.read_u32(mb + mailbox::FAIL_VALUE)?,
    })
}

/// Host-side check of vCPU `index`'s region (call with the vCPUs stopped):
/// every page sums to 0 and the words 0 sum to the mailbox's `TOTAL`.
/// Returns a description of the first violation, or `None`.
pub fn check_region(ram: &KvmRam, vcpus: usize, index: usize) -> Result<Option<String>, KvmError> {
    let (base, pages) = region(ram.size(), vcpus, index);
    let total = ram.read_u32(mailbox_addr(index) + mailbox::TOTAL)?;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut words0 = 0u32;
    for p in 0..pages {
        let addr = base + p * PAGE_SIZE as u64;
        ram.read(addr, &mut page)?;
        let mut sum = 0u32;
        for w in page.chunks_exact(4) {
            sum = sum.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
        if sum != 0 {
            return Ok(Some(format!(
                "page {addr:#x} of vCPU {index} sums to {sum:#x}, not 0"
            )));
        }
        words0 = words0.wrapping_add(u32::from_le_bytes([page[0], page[1], page[2], page[3]]));
    }
    if words0 != total {
        return Ok(Some(format!(
            "vCPU {index}: words 0 sum to {words0:#x}, mailbox TOTAL is {total:#x}"
        )));
    }
    Ok(None)
}
