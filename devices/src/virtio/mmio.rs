//! The virtio-mmio transport (virtio 1.x, 4.2) of the block device: the register file a
//! driver probes and configures, owning the one request queue and the interrupt.
//!
//! The modern layout (Version 2) is the default. The legacy layout (Version 1:
//! GuestPageSize, QueueAlign, QueuePFN) is there because virtio-drivers' `MmioTransport`
//! speaks it too; a device presents exactly one of the two, chosen at creation.
//!
//! Registers are 32-bit: any other access size to 0x000..0x100 is ignored (reads as zero)
//! and counted. The config space at 0x100 may be read at any size and offset.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::block::{BlockBackend, Broken, SEG_MAX};
use super::disk::SECTOR_SIZE;
use super::{ErrorLog, GuestMem, Interrupt, QUEUE_MAX_SIZE};
use crate::BusDevice;

/// `MagicValue`: "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// `VendorID`: "NVMM" in little endian; drivers match on the device ID, not on this.
pub const VENDOR_ID: u32 = 0x4d4d_564e;

/// Which register layout the device presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioVersion {
    /// Version 1: the queue is placed by a page frame number, features have no VERSION_1.
    Legacy,
    /// Version 2: the queue's three areas are placed by 64-bit addresses.
    Modern,
}

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Queue fields that can hold a refused value (`MmioBlock::queue_bad`).
const BAD_SIZE: u8 = 1;
const BAD_DESC: u8 = 2;
const BAD_AVAIL: u8 = 4;
const BAD_USED: u8 = 8;

/// Config-space layout (`struct virtio_blk_config`): the fields this device fills.
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_BLK_SIZE: usize = 20;
/// Up to and including `topology`; the rest of the structure reads as zero.
const CONFIG_LEN: usize = 0x3c;

/// A virtio-mmio block device; put it on an [`crate::MmioBus`] at a window of
/// [`super::MMIO_WINDOW`] bytes.
pub struct MmioBlock {
    version: MmioVersion,
    mem: GuestMem,
    backend: BlockBackend,
    irq: Box<dyn Interrupt>,
    queue: Queue,
    config: [u8; CONFIG_LEN],
    status: u32,
    interrupt_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// Queue fields (`BAD_*`) whose latest value `Queue` refused: readying fails while any is.
    queue_bad: u8,
    /// The descriptor, driver and device area addresses as last written (modern).
    queue_addrs: [u64; 3],
    /// Legacy QueueNum, applied at the QueuePFN write.
    legacy_num: u32,
    legacy_page_size: u32,
    legacy_align: u32,
    legacy_pfn: u32,
    errors: ErrorLog,
    /// Why the device set DEVICE_NEEDS_RESET, until the reset.
    broken: Option<Broken>,
}

impl MmioBlock {
    /// A block device serving `backend` to a guest whose RAM is `mem`, raising `irq` for
    /// used buffers and configuration changes.
    pub fn new(version: MmioVersion, mem: GuestMem, backend: BlockBackend, irq: Box<dyn Interrupt>) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[CONFIG_CAPACITY..CONFIG_CAPACITY + 8].copy_from_slice(&backend.disk().sectors().to_le_bytes());
        config[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[CONFIG_BLK_SIZE..CONFIG_BLK_SIZE + 4].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let queue = match Queue::new(QUEUE_MAX_SIZE) {
            Ok(q) => q,
            Err(_) => unreachable!("QUEUE_MAX_SIZE is a power of two"),
        };
        Self {
            version,
            mem,
            backend,
            irq,
            queue,
            config,
            status: 0,
            interrupt_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queue_bad: 0,
            queue_addrs: [0; 3],
            legacy_num: 0,
            legacy_page_size: 4096,
            legacy_align: 4096,
            legacy_pfn: 0,
            errors: ErrorLog::default(),
            broken: None,
        }
    }

    /// The features offered: flush, block size and segment limit, and, on the modern
    /// layout, VIRTIO_F_VERSION_1 (which a modern driver must accept).
    pub fn device_features(&self) -> u64 {
        let blk = bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_SEG_MAX);
        match self.version {
            MmioVersion::Modern => blk | bit(VIRTIO_F_VERSION_1),
            MmioVersion::Legacy => blk,
        }
    }

    /// The features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The Status register, DEVICE_NEEDS_RESET included.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device stopped on a broken queue and waits for a reset.
    pub fn needs_reset(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    /// Why the device stopped, while it waits for a reset.
    pub fn broken(&self) -> Option<Broken> {
        self.broken
    }

    /// The request side, for its counters.
    pub fn backend(&self) -> &BlockBackend {
        &self.backend
    }

    /// Guest errors the transport saw (bad register accesses, bad queue setup).
    pub fn transport_errors(&self) -> u64 {
        self.errors.count()
    }

    /// How many of the transport's errors were logged (the rest were only counted).
    pub fn transport_errors_logged(&self) -> u64 {
        self.errors.logged()
    }

    /// Status 0: forget features, queue and interrupts; the disk and counters stay.
    fn reset(&mut self) {
        self.status = 0;
        self.broken = None;
        self.interrupt_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queue_bad = 0;
        self.queue_addrs = [0; 3];
        self.legacy_num = 0;
        self.legacy_page_size = 4096;
        self.legacy_align = 4096;
        self.legacy_pfn = 0;
        self.queue.reset();
    }

    /// Stops the device until reset (virtio 1.x, 2.1.2) and tells a running driver through
    /// a configuration-change interrupt.
    fn mark_broken(&mut self, why: Broken) {
        if self.needs_reset() {
            return;
        }
        self.errors.note("device needs reset", format_args!("{why:?}"));
        self.broken = Some(why);
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.interrupt(reg::VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn interrupt(&mut self, why: u32) {
        self.interrupt_status |= why;
        if let Err(e) = self.irq.trigger() {
            self.errors.note("cannot raise the interrupt", format_args!("{e}"));
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        let legacy = self.version == MmioVersion::Legacy;
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => {
                if legacy {
                    1
                } else {
                    2
                }
            }
            reg::VIRTIO_MMIO_DEVICE_ID => VIRTIO_ID_BLOCK,
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX if self.queue_sel == 0 => u32::from(QUEUE_MAX_SIZE),
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => 0,
            reg::VIRTIO_MMIO_QUEUE_READY if !legacy => u32::from(self.queue_sel == 0 && self.queue.ready()),
            reg::VIRTIO_MMIO_QUEUE_PFN if legacy => {
                if self.queue_sel == 0 {
                    self.legacy_pfn
                } else {
                    0
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            reg::VIRTIO_MMIO_STATUS => self.status,
            // The config space never changes after creation.
            reg::VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                self.errors.note("read of an unknown register", format_args!("{offset:#x}"));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        let legacy = self.version == MmioVersion::Legacy;
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            reg::VIRTIO_MMIO_GUEST_PAGE_SIZE if legacy => self.legacy_page_size = value,
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_ALIGN
            | reg::VIRTIO_MMIO_QUEUE_PFN
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            _ => self.errors.note("write of an unknown register", format_args!("{offset:#x} = {value:#x}")),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if !negotiating {
            self.errors.note("features written outside negotiation", format_args!("status {:#x}", self.status));
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            // Words the device has no features in: only zero is acceptable there.
            _ if value == 0 => {}
            sel => {
                self.errors.note("features beyond word 1", format_args!("word {sel} = {value:#x}"));
                self.driver_features |= 1 << 63; // never offered: FEATURES_OK will be refused
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let setting_features_ok =
            value & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if setting_features_ok {
            let offered = self.device_features();
            let unoffered = self.driver_features & !offered;
            let modern_without_v1 =
                self.version == MmioVersion::Modern && self.driver_features & bit(VIRTIO_F_VERSION_1) == 0;
            if unoffered != 0 || modern_without_v1 {
                // The driver reads Status back and gives up (virtio 1.x, 3.1.1).
                self.errors.note("features refused", format_args!("{:#x}, offered {offered:#x}", self.driver_features));
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        // Bits are only ever added by the driver; NEEDS_RESET survives until a reset.
        self.status = value | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
    }

    fn write_queue_register(&mut self, offset: u32, value: u32) {
        if self.queue_sel != 0 {
            self.errors.note("queue register of a queue that does not exist", format_args!("queue {}", self.queue_sel));
            return;
        }
        match self.version {
            MmioVersion::Modern => self.write_modern_queue_register(offset, value),
            MmioVersion::Legacy => match offset {
                // Both only take effect at the next QueuePFN write, so virtio-drivers' unset
                // sequence (QueueNum 0, QueueAlign 0, QueuePFN 0) is harmless to a live queue.
                reg::VIRTIO_MMIO_QUEUE_NUM => self.legacy_num = value,
                reg::VIRTIO_MMIO_QUEUE_ALIGN => self.legacy_align = value,
                reg::VIRTIO_MMIO_QUEUE_PFN => self.write_legacy_pfn(value),
                _ => self.errors.note("modern queue register on a legacy device", format_args!("{offset:#x}")),
            },
        }
    }

    fn write_modern_queue_register(&mut self, offset: u32, value: u32) {
        if self.queue.ready() && offset != reg::VIRTIO_MMIO_QUEUE_READY {
            self.errors.note("queue register written while the queue is live", format_args!("{offset:#x}"));
            return;
        }
        let q = &mut self.queue;
        // The driver writes each address in two halves: keep the raw value, so that a half
        // refused for alignment is not lost when the other half is written.
        let (which, set_high) = match offset {
            // A size of 0 on a queue that is not live is a driver clearing it (virtio-drivers
            // does, when it lets the device go): not a guest error, but the queue cannot be
            // made ready until a real size is written.
            reg::VIRTIO_MMIO_QUEUE_NUM if value == 0 => {
                self.queue_bad |= BAD_SIZE;
                return;
            }
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                let ok = u16::try_from(value).is_ok_and(|n| q.try_set_size(n).is_ok());
                self.set_field_validity(BAD_SIZE, ok, offset, value);
                return;
            }
            reg::VIRTIO_MMIO_QUEUE_READY => {
                if value == 0 {
                    q.set_ready(false);
                } else if !q.ready() {
                    self.ready_queue();
                }
                return;
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => (0, false),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => (0, true),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => (1, false),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (1, true),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => (2, false),
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => (2, true),
            _ => {
                self.errors.note("legacy queue register on a modern device", format_args!("{offset:#x}"));
                return;
            }
        };
        let raw = &mut self.queue_addrs[which];
        *raw = if set_high { high(*raw, value) } else { low(*raw, value) };
        let addr = GuestAddress(*raw);
        let (field, ok) = match which {
            0 => (BAD_DESC, q.try_set_desc_table_address(addr).is_ok()),
            1 => (BAD_AVAIL, q.try_set_avail_ring_address(addr).is_ok()),
            _ => (BAD_USED, q.try_set_used_ring_address(addr).is_ok()),
        };
        self.set_field_validity(field, ok, offset, value);
    }

    /// Records whether the latest write to a queue field was acceptable: a field refused
    /// once and then rewritten with a good value (virtio-drivers zeroes QueueNum when it
    /// unsets a queue) no longer stands in the way of readying.
    fn set_field_validity(&mut self, field: u8, ok: bool, offset: u32, value: u32) {
        if ok {
            self.queue_bad &= !field;
        } else {
            self.queue_bad |= field;
            self.errors.note("invalid queue setting", format_args!("{offset:#x} = {value:#x}"));
        }
    }

    /// Legacy queue placement: the descriptor table at `pfn * GuestPageSize`, the available
    /// ring right after it, the used ring at the next `QueueAlign` boundary (virtio 1.x, 2.7.2).
    fn write_legacy_pfn(&mut self, pfn: u32) {
        if pfn == 0 {
            self.legacy_pfn = 0;
            self.queue.set_ready(false);
            return;
        }
        if self.legacy_pfn != 0 {
            self.errors.note("QueuePFN rewritten while the queue is live", format_args!("{pfn:#x}"));
            return;
        }
        let size_ok = u16::try_from(self.legacy_num).is_ok_and(|n| self.queue.try_set_size(n).is_ok());
        self.set_field_validity(BAD_SIZE, size_ok, reg::VIRTIO_MMIO_QUEUE_NUM, self.legacy_num);
        let size = u64::from(self.queue.size());
        let page = u64::from(self.legacy_page_size);
        let align = u64::from(self.legacy_align);
        let placed = (|| {
            if !page.is_power_of_two() || !align.is_power_of_two() {
                return None;
            }
            let desc = u64::from(pfn).checked_mul(page)?;
            let avail = desc.checked_add(16 * size)?;
            let used = avail.checked_add(6 + 2 * size)?.checked_next_multiple_of(align)?;
            Some((desc, avail, used))
        })();
        let q = &mut self.queue;
        let ok = placed.is_some_and(|(desc, avail, used)| {
            q.try_set_desc_table_address(GuestAddress(desc)).is_ok()
                && q.try_set_avail_ring_address(GuestAddress(avail)).is_ok()
                && q.try_set_used_ring_address(GuestAddress(used)).is_ok()
        });
        self.set_field_validity(BAD_DESC | BAD_AVAIL | BAD_USED, ok, reg::VIRTIO_MMIO_QUEUE_PFN, pfn);
        self.legacy_pfn = pfn;
        self.ready_queue();
    }

    /// QueueReady = 1: the queue must be of a valid size, and its three areas inside guest
    /// RAM; otherwise the device needs a reset.
    fn ready_queue(&mut self) {
        let n = u64::from(self.queue.size());
        let in_ram = |addr: u64, len: u64| self.mem.check_range(GuestAddress(addr), len as usize);
        let valid = self.queue_bad == 0
            && in_ram(self.queue.desc_table(), 16 * n)
            && in_ram(self.queue.avail_ring(), 6 + 2 * n)
            && in_ram(self.queue.used_ring(), 6 + 8 * n);
        if valid {
            self.queue.set_ready(true);
        } else {
            self.errors.note("queue readied with an invalid setup", format_args!("size {n}"));
            self.mark_broken(Broken::QueueSetup);
        }
    }

    fn notify(&mut self, queue: u32) {
        if self.needs_reset() {
            return;
        }
        if queue != 0 {
            self.errors.note("notify of a queue that does not exist", format_args!("queue {queue}"));
            return;
        }
        // A modern driver must have had its features accepted; a legacy one has no such step.
        let negotiated = self.version == MmioVersion::Legacy || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        if !self.queue.ready() || self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 || !negotiated {
            self.errors.note("notify before the queue is ready", format_args!("status {:#x}", self.status));
            self.mark_broken(Broken::NotReady);
            return;
        }
        let (done, result) = self.backend.process_queue(&mut self.queue, &self.mem);
        if done > 0 {
            self.interrupt(reg::VIRTIO_MMIO_INT_VRING);
        }
        if let Err(why) = result {
            self.mark_broken(why);
        }
    }
}

fn low(addr: u64, value: u32) -> u64 {
    (addr & !0xffff_ffff) | u64::from(value)
}

fn high(addr: u64, value: u32) -> u64 {
    (addr & 0xffff_ffff) | (u64::from(value) << 32)
}

impl BusDevice<u64> for MmioBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            // Bytes past the structure read as zero.
            let start = offset - config;
            for (i, byte) in data.iter_mut().enumerate() {
                let at = start.saturating_add(i as u64);
                if let Some(b) = usize::try_from(at).ok().and_then(|at| self.config.get(at)) {
                    *byte = *b;
                }
            }
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let value = self.read_register(offset as u32);
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            self.errors.note("register read not 32-bit aligned", format_args!("{offset:#x}+{}", data.len()));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            self.errors.note("config space write ignored", format_args!("{offset:#x}"));
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset as u32, u32::from_le_bytes(bytes));
        } else {
            self.errors.note("register write not 32-bit aligned", format_args!("{offset:#x}+{}", data.len()));
        }
    }
}
