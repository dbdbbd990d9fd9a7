//! A virtio block device on the virtio-mmio transport, for checkpoints written to an
//! external disk file instead of NVM.
//!
//! The layers, from the guest inwards:
//! - [`crate::bus`]: the MMIO bus ([`crate::MmioBus`]) routing guest physical addresses to devices;
//! - [`mmio`]: the virtio-mmio register file (magic, features, queue setup, status,
//!   interrupts), which owns the split virtqueue (`virtio_queue::Queue`);
//! - [`block`]: virtio-blk request parsing and execution on the queue's descriptor chains;
//! - [`disk`]: the backing file, created at a size, locked against a second VMM.
//!
//! The guest is not trusted: every descriptor, length and address it hands over is checked,
//! a request that cannot be served gets `VIRTIO_BLK_S_IOERR`, and a queue too broken to
//! answer on makes the device set `DEVICE_NEEDS_RESET` and stop until the driver resets it.
//! Nothing a guest does makes the device allocate: its buffers are sized once at creation.
//!
//! # Wiring it into a VMM
//!
//! 1. `Disk::open(path, size)` (holds the disk's `flock` for the VMM's life), then
//!    `BlockBackend::new(disk, serial).with_write_hook(..)`: the hook is told of every range
//!    the device stores into guest RAM, which KVM's dirty log does not see; the VMM marks them
//!    in its `DirtyTracker` (and, under ADR, in the persistence domain), as it does for the
//!    copy engine's stores.
//! 2. An `EventFd`, registered with `VmFd::register_irqfd(&evt, gsi)`; its clone is the
//!    device's [`Interrupt`]. The driver acknowledges through InterruptACK.
//! 3. `MmioBlock::new(MmioVersion::Modern, guest_memory.clone(), backend, Box::new(evt))`,
//!    registered on an [`crate::MmioBus`] at a base outside guest RAM (below the IOAPIC and LAPIC
//!    windows), `MMIO_WINDOW` bytes long.
//! 4. The vCPU loop hands `VcpuExit::MmioRead(addr, data)` / `MmioWrite(addr, data)` to
//!    [`crate::Bus::read`] / [`crate::Bus::write`]. Requests run synchronously in that exit.
//! 5. The guest is told the base, the window size and the GSI (a fixed constant shared with
//!    the guest kernel, or `virtio_mmio.device=512@0xBASE:GSI` on a Linux command line).

pub mod block;
pub mod disk;
pub mod mmio;

#[cfg(test)]
mod drivers;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

pub use block::BlockBackend;
pub use disk::{Disk, DiskError};
pub use mmio::{MmioBlock, MmioVersion};

use std::io;
use tracing::{warn, Level};
use vmm_sys_util::eventfd::EventFd;

use crate::LogLimit;

/// Guest memory as the VMM maps it.
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;

/// Bytes of MMIO space one virtio-mmio device decodes: 0x100 of registers, then the
/// device config space. The VMM reserves this much at the device's base address.
pub const MMIO_WINDOW: u64 = nvram::mmio::VIRTIO_BLK_LEN;

/// The largest queue the device offers (QueueNumMax); virtio-drivers uses 16, Linux up to 256.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// What answers at a virtio-mmio window with no device behind it: the magic, version 2 and
/// device ID 0, the spec's placeholder "with no function" (virtio 1.2, 4.2.2), which a
/// driver ignores. A machine without a disk puts one at the disk's window, so that the
/// guest's probe finds "no disk" by the book instead of poking an address nobody owns
/// (which the bus would log at every boot).
#[derive(Debug, Default)]
pub struct Placeholder;

impl crate::BusDevice<u64> for Placeholder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value: u32 = match offset {
            0x000 => nvram::mmio::VIRTIO_MMIO_MAGIC,
            0x004 => 2,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// How the device raises its interrupt line. The VMM passes an `EventFd` registered as an
/// irqfd; tests pass a counter.
pub trait Interrupt: Send {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

impl Interrupt for EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// Counts guest errors and logs only a few a second, so that a guest looping on a bad
/// request cannot flood the VMM's log; the count stays readable for tests and statistics.
#[derive(Debug)]
pub struct ErrorLog {
    count: u64,
    log: LogLimit,
}

impl Default for ErrorLog {
    fn default() -> Self {
        Self { count: 0, log: LogLimit::per_second("virtio-blk guest error", Level::WARN, 8) }
    }
}

impl ErrorLog {
    /// Records one guest error, logging it while under the limit.
    pub fn note(&mut self, what: &str, detail: std::fmt::Arguments<'_>) {
        self.count = self.count.saturating_add(1);
        if self.log.allow_now() {
            warn!(detail = %detail, "virtio-blk: {what}");
        }
    }

    /// How many guest errors were seen.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// How many of them were logged.
    pub fn logged(&self) -> u64 {
        self.log.allowed()
    }
}
