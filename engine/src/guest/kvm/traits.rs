//! The engine's guest traits ([`crate::guest`]) for a [`KvmVm`].
//!
//! The VM's RAM is one RAM block, [`RAM_BLOCK_NAME`] (QEMU's name for a PC's
//! main RAM), whatever number of KVM slots back it. One
//! [`DirtyLog::fetch_and_clear`] of that block is one bitmap sync over every
//! slot.

use xbzrle::Page;

use xbzrle::PAGE_SIZE;

use super::{KvmError, KvmVm};
use crate::guest::{
    DeviceStateEntry, DirtyLog, GuestError, GuestRam, RamBlockInfo, Throttle, VcpuControl,
};

/// Name of the VM's single RAM block.
pub const RAM_BLOCK_NAME: &str = "pc.ram";

impl From<KvmError> for GuestError {
    fn from(e: KvmError) -> Self {
        GuestError::Other(Box::new(e))
    }
}

impl KvmVm {
    fn check_page(&self, block: usize, page: u64) -> Result<(), GuestError> {
        if block != 0 {
            return Err(GuestError::NoSuchBlock { block });
        }
        let pages = self.ram().pages();
        if page >= pages {
            return Err(GuestError::PageOutOfRange { block, page, pages });
        }
        Ok(())
    }
}

impl GuestRam for KvmVm {
    fn blocks(&self) -> Vec<RamBlockInfo> {
        vec![RamBlockInfo::new(RAM_BLOCK_NAME, self.ram().size())]
    }

    fn read_page(&self, block: usize, page: u64, out: &mut Page) -> Result<(), GuestError> {
        self.check_page(block, page)?;
        self.ram().read(page * PAGE_SIZE as u64, out)?;
        Ok(())
    }

    /// The vCPU state as the `precopy/vcpu` section (see [`super::migration`]).
    fn device_states(&self) -> Result<Vec<DeviceStateEntry>, GuestError> {
        let s = self.vcpu_section()?;
        Ok(vec![(s.name, s.instance_id, s.version_id, s.payload)])
    }
}

impl DirtyLog for KvmVm {
    /// Slots log from creation on; starting discards what was logged so far.
    fn log_start(&self) -> Result<(), GuestError> {
        let mut scratch = vec![0u64; self.ram().bitmap_words()];
        self.sync_dirty_log(&mut scratch)?;
        Ok(())
    }

    fn fetch_and_clear(&self, block: usize, bitmap: &mut [u64]) -> Result<(), GuestError> {
        if block != 0 {
            return Err(GuestError::NoSuchBlock { block });
        }
        let expected = self.ram().bitmap_words();
        if bitmap.len() != expected {
            return Err(GuestError::BitmapSize {
                block,
                got: bitmap.len(),
                expected,
            });
        }
        self.sync_dirty_log(bitmap)?;
        Ok(())
    }

    /// The slots keep logging (cheap while nobody syncs); nothing to do.
    fn log_stop(&self) -> Result<(), GuestError> {
        Ok(())
    }
}

impl VcpuControl for KvmVm {
    fn stop(&self) -> Result<(), GuestError> {
        KvmVm::stop(self)?;
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        KvmVm::resume(self)?;
        Ok(())
    }

    fn is_running(&self) -> bool {
        !self.vcpus().is_stopped()
    }
}

impl Throttle for KvmVm {
    fn set_throttle(&self, percent: u8) -> Result<(), GuestError> {
        KvmVm::set_throttle(self, u32::from(percent.min(99)));
        Ok(())
    }

    fn throttle(&self) -> u8 {
        self.vcpus().throttle().min(99) as u8
    }
}
