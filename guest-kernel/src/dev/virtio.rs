//! The machine's virtio block device (`vmm boot --disk`), found at its fixed MMIO window
//! (`nvram::mmio`). Without a disk nothing answers there and the magic register reads as
//! all ones, so probing is always safe.

use nvram::mmio::{VIRTIO_BLK_BASE, VIRTIO_MMIO_MAGIC};

/// virtio-mmio register offsets (virtio 1.2, 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
/// The device-specific configuration: for a block device, its capacity in 512-byte sectors.
const REG_CONFIG: u64 = 0x100;

/// The device ID of a block device.
const DEVICE_BLOCK: u32 = 2;

/// What the probe found.
#[derive(Debug, Clone, Copy)]
pub struct Disk {
    pub base: u64,
    /// The transport's version: 2 for virtio 1.x (modern), 1 for legacy.
    pub version: u32,
    pub sectors: u64,
}

fn read32(offset: u64) -> u32 {
    // SAFETY: the window is identity-mapped by the boot page tables (the first 4 GiB) and
    // is device memory or nothing; a read of these registers has no side effect.
    unsafe { core::ptr::read_volatile((VIRTIO_BLK_BASE + offset) as *const u32) }
}

/// The block device, if the machine has one.
pub fn probe() -> Option<Disk> {
    crate::arch::ring3::privileged(|| {
        if read32(REG_MAGIC) != VIRTIO_MMIO_MAGIC || read32(REG_DEVICE_ID) != DEVICE_BLOCK {
            return None;
        }
        let sectors = u64::from(read32(REG_CONFIG)) | u64::from(read32(REG_CONFIG + 4)) << 32;
        Some(Disk { base: VIRTIO_BLK_BASE, version: read32(REG_VERSION), sectors })
    })
}
