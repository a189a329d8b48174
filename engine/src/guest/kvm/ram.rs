//! Guest RAM registered with KVM as memory slots that log dirty pages, and
//! the dirty-log sync (`KVM_GET_DIRTY_LOG`, then `KVM_CLEAR_DIRTY_LOG` under
//! manual dirty-log protection when the kernel offers it).
//!
//! Semantics follow QEMU's `accel/kvm/kvm-all.c` memory listener: one RAM
//! block ("pc.ram") backed by one or more KVM slots, each registered with
//! `KVM_MEM_LOG_DIRTY_PAGES`; a bitmap sync fetches every slot's log and
//! re-arms write protection for the pages it reported.

use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES, kvm_clear_dirty_log,
    kvm_enable_cap, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use xbzrle::PAGE_SIZE;

use super::{ConfigError, KvmError, MemoryError};

/// Default largest KVM memory slot (bytes). Larger RAM is split into
/// several slots; every slot but the last has the slot size, a multiple of
/// 64 pages so the per-slot bitmaps concatenate on `u64` boundaries.
pub const MAX_SLOT_SIZE: u64 = 1 << 30;

/// Largest guest RAM [`KvmRam::new`] maps (64 TiB, bytes).
const MAX_MAPPED_RAM: u64 = 1 << 46;

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` (linux/kvm.h): with it,
/// `KVM_GET_DIRTY_LOG` does not re-protect pages; `KVM_CLEAR_DIRTY_LOG` does.
const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;

/// `KVM_CLEAR_DIRTY_LOG` = `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`
/// (linux/kvm.h); kvm-ioctls has no wrapper for it.
#[allow(missing_docs, unreachable_pub)]
mod nr {
    use kvm_bindings::kvm_clear_dirty_log;
    vmm_sys_util::ioctl_iowr_nr!(
        KVM_CLEAR_DIRTY_LOG,
        kvm_bindings::KVMIO,
        0xc0,
        kvm_clear_dirty_log
    );
}
use nr::KVM_CLEAR_DIRTY_LOG;

/// One KVM memory slot of guest RAM.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// KVM slot number.
    id: u32,
    /// Guest-physical address of the slot's first byte (= offset in RAM).
    gpa: u64,
    /// Size in bytes (a multiple of [`PAGE_SIZE`]).
    size: u64,
}

/// Timing of one dirty-log sync over all slots.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncTiming {
    /// Wall time of the whole sync (GET + CLEAR for every slot).
    pub elapsed: Duration,
    /// Bytes of guest RAM the sync covered.
    pub bytes: u64,
    /// Pages reported dirty.
    pub dirty_pages: u64,
}

impl SyncTiming {
    /// Sync time scaled to one GiB of guest RAM (`elapsed × 2^30 / bytes`).
    pub fn per_gib(&self) -> Duration {
        if self.bytes == 0 {
            return Duration::ZERO;
        }
        let nanos = self.elapsed.as_nanos() * (1u128 << 30) / u128::from(self.bytes);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Guest RAM of one KVM VM: a flat range `[0, size)` of guest-physical
/// memory, mmap'ed anonymously and registered as dirty-logging KVM slots.
///
/// Pages are read and written only through vm-memory's volatile copies, so
/// no `&[u8]` ever covers memory a vCPU may be writing.
#[derive(Debug)]
pub struct KvmRam {
    mem: GuestMemoryMmap,
    slots: Vec<Slot>,
    size: u64,
    manual_protect: bool,
}

impl KvmRam {
    /// Allocates `size` bytes (a positive multiple of [`PAGE_SIZE`]) and
    /// registers them with `vm` as slots 0.. of at most `slot_size` bytes
    /// (a positive multiple of 64 pages) with `KVM_MEM_LOG_DIRTY_PAGES`.
    /// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` first when the kernel
    /// offers it (see [`KvmRam::manual_protect`]).
    ///
    /// Errors: [`KvmError::Config`] for a bad size, [`KvmError::Memory`]
    /// when the mmap fails, [`KvmError::Ioctl`] when KVM refuses a slot.
    pub fn new(vm: &VmFd, size: u64, slot_size: u64) -> Result<Self, KvmError> {
        if slot_size == 0 || !slot_size.is_multiple_of(64 * PAGE_SIZE as u64) {
            return Err(KvmError::Config(ConfigError::SlotSize {
                size: slot_size,
                granule: 64 * PAGE_SIZE,
            }));
        }
        if size == 0 || !size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(KvmError::Config(ConfigError::RamNotPageMultiple {
                size,
                page_size: PAGE_SIZE,
            }));
        }
        if size > MAX_MAPPED_RAM {
            return Err(KvmError::Config(ConfigError::RamTooLarge {
                requested: size,
                limit: MAX_MAPPED_RAM,
            }));
        }
        let supported = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        let mut manual_protect = false;
        if supported > 0 && (supported as u64) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
            vm.enable_cap(&cap).map_err(|source| KvmError::Ioctl {
                op: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
                source,
            })?;
            manual_protect = true;
        }
        let mut slots = Vec::new();
        let mut gpa = 0u64;
        while gpa < size {
            let len = (size - gpa).min(slot_size);
            slots.push(Slot {
                id: u32::try_from(slots.len()).unwrap_or(u32::MAX),
                gpa,
                size: len,
            });
            gpa += len;
        }
        let ranges: Vec<(GuestAddress, usize)> = slots
            .iter()
            .map(|s| (GuestAddress(s.gpa), s.size as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| {
            KvmError::Memory(MemoryError::Mmap {
                bytes: size,
                source,
            })
        })?;
        for slot in &slots {
            let host = mem
                .get_host_address(GuestAddress(slot.gpa))
                .map_err(|source| {
                    KvmError::Memory(MemoryError::SlotAddress {
                        gpa: slot.gpa,
                        source,
                    })
                })?;
            let region = kvm_userspace_memory_region {
                slot: slot.id,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: slot.gpa,
                memory_size: slot.size,
                userspace_addr: host as u64,
            };
            // SAFETY: `host` starts a live anonymous mapping of `slot.size` bytes owned by `mem`,
            // which this struct keeps alive as long as the VM can use the slot (`KvmVm` drops
            // the VM fd before or together with it).
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| KvmError::Ioctl {
                op: "KVM_SET_USER_MEMORY_REGION",
                source,
            })?;
        }
        Ok(Self {
            mem,
            slots,
            size,
            manual_protect,
        })
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of pages ([`PAGE_SIZE`] each).
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }

    /// Number of `u64` words of a bitmap with one bit per page.
    pub fn bitmap_words(&self) -> usize {
        (self.pages() as usize).div_ceil(64)
    }

    /// Number of KVM slots backing the RAM.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Whether the dirty log runs under `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
    /// (GET does not re-protect; we re-protect with `KVM_CLEAR_DIRTY_LOG`).
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// The vm-memory view of the RAM (guest-physical address = offset).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host address and length of each slot's mapping, in guest-physical order (the
    /// RAM is their concatenation).
    pub(super) fn host_parts(&self) -> Vec<(*mut u8, usize)> {
        self.slots
            .iter()
            .filter_map(|s| {
                let host = self.mem.get_host_address(GuestAddress(s.gpa)).ok()?;
                Some((host, s.size as usize))
            })
            .collect()
    }

    /// Copies `buf.len()` bytes at guest-physical `offset` into `buf`
    /// (volatile copy; the guest may be running).
    ///
    /// Errors: [`KvmError::Memory`] when the range leaves RAM.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), KvmError> {
        self.check_range(offset, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(offset))
            .map_err(|source| KvmError::Memory(MemoryError::Read { offset, source }))
    }

    /// Copies `data` into guest RAM at guest-physical `offset`.
    ///
    /// Errors: [`KvmError::Memory`] when the range leaves RAM.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), KvmError> {
        self.check_range(offset, data.len())?;
        self.mem
            .write_slice(data, GuestAddress(offset))
            .map_err(|source| KvmError::Memory(MemoryError::Write { offset, source }))
    }

    /// Fills `len` bytes at `offset` with `byte`.
    ///
    /// Errors: [`KvmError::Memory`] when the range leaves RAM.
    pub fn fill(&self, offset: u64, len: usize, byte: u8) -> Result<(), KvmError> {
        const CHUNK: usize = 64 * 1024;
        let chunk = [byte; CHUNK];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write(offset + done as u64, &chunk[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Reads a little-endian `u32` at guest-physical `offset`.
    pub fn read_u32(&self, offset: u64) -> Result<u32, KvmError> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian `u32` at guest-physical `offset`.
    pub fn write_u32(&self, offset: u64, value: u32) -> Result<(), KvmError> {
        self.write(offset, &value.to_le_bytes())
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), KvmError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(KvmError::Memory(MemoryError::OutOfRange {
                offset,
                len,
                size: self.size,
            })),
        }
    }

    /// Bitmap sync: fetches and clears KVM's dirty log of every slot into
    /// `bitmap` (one bit per page, bit `p % 64` of word `p / 64` for page
    /// `p`; must hold [`KvmRam::bitmap_words`] words). Bits are OR-ed in,
    /// so a caller may accumulate several syncs.
    ///
    /// With manual protection the reported pages are re-protected by
    /// `KVM_CLEAR_DIRTY_LOG` before this returns, so a write that lands
    /// after the sync is reported by the next one.
    ///
    /// Errors: [`KvmError::Memory`] for a short bitmap, [`KvmError::Ioctl`].
    pub fn sync_dirty_log(&self, vm: &VmFd, bitmap: &mut [u64]) -> Result<SyncTiming, KvmError> {
        if bitmap.len() < self.bitmap_words() {
            return Err(KvmError::Memory(MemoryError::ShortBitmap {
                words: bitmap.len(),
                needed: self.bitmap_words(),
            }));
        }
        let start = Instant::now();
        let mut dirty_pages = 0u64;
        for slot in &self.slots {
            let log = vm
                .get_dirty_log(slot.id, slot.size as usize)
                .map_err(|source| KvmError::Ioctl {
                    op: "KVM_GET_DIRTY_LOG",
                    source,
                })?;
            let first_word = (slot.gpa / PAGE_SIZE as u64 / 64) as usize;
            let slot_words = (slot.size / PAGE_SIZE as u64).div_ceil(64) as usize;
            for (dst, src) in bitmap[first_word..first_word + slot_words]
                .iter_mut()
                .zip(&log)
            {
                *dst |= *src;
                dirty_pages += u64::from(src.count_ones());
            }
            if self.manual_protect && log.iter().any(|w| *w != 0) {
                let mut clear = kvm_clear_dirty_log {
                    slot: slot.id,
                    num_pages: u32::try_from(slot.size / PAGE_SIZE as u64).unwrap_or(u32::MAX),
                    first_page: 0,
                    ..Default::default()
                };
                clear.__bindgen_anon_1.dirty_bitmap = log.as_ptr() as *mut libc::c_void;
                // SAFETY: KVM_CLEAR_DIRTY_LOG reads `num_pages` bits from `dirty_bitmap` = `log`,
                // a live buffer of ceil(num_pages / 64) u64 words; `clear` is a valid
                // `kvm_clear_dirty_log` for the whole call.
                let ret = unsafe {
                    vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear)
                };
                if ret < 0 {
                    return Err(KvmError::Ioctl {
                        op: "KVM_CLEAR_DIRTY_LOG",
                        source: vmm_sys_util::errno::Error::last(),
                    });
                }
            }
        }
        Ok(SyncTiming {
            elapsed: start.elapsed(),
            bytes: self.size,
            dirty_pages,
        })
    }
}
