//! Devices of the machine at MMIO addresses, as seen by the guest.
//!
//! | address                   | device                                                  |
//! |---------------------------|---------------------------------------------------------|
//! | `0xd000_0000..0xd000_0200`| virtio-blk over virtio-mmio (with `vmm boot --disk`)    |
//!
//! The window sits above every RAM size the image format allows ([`crate::layout::MAX_RAM`],
//! 3 GiB) and below the IOAPIC (`0xfec0_0000`) and LAPIC (`0xfee0_0000`) windows, inside the
//! 4 GiB the guest's boot page tables map. Without a disk the window holds virtio-mmio's
//! placeholder (device ID 0, "no function"), which is how the guest finds that there is no
//! disk; under another VMM (QEMU) nothing may answer, and the magic reads as something else.

/// Base of the virtio-blk device's register window.
pub const VIRTIO_BLK_BASE: u64 = 0xd000_0000;
/// Bytes the device decodes: 0x100 of virtio-mmio registers, then its config space.
pub const VIRTIO_BLK_LEN: u64 = 0x200;
/// The device's interrupt line: a PIC/IOAPIC input nothing else of the machine uses (COM1
/// has 4, the machine-control device's request interrupt 5). The guest's driver polls its
/// queue and leaves the line masked.
pub const VIRTIO_BLK_IRQ: u32 = 11;
/// What the magic register reads when a virtio-mmio device is there ("virt").
pub const VIRTIO_MMIO_MAGIC: u32 = 0x7472_6976;

const _: () = assert!(VIRTIO_BLK_BASE >= crate::layout::MAX_RAM);
const _: () = assert!(VIRTIO_BLK_BASE + VIRTIO_BLK_LEN <= 0xfec0_0000);
