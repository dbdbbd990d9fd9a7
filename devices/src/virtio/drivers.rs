//! The device driven by the very driver the guest kernel will use: virtio-drivers 0.13's
//! `VirtIOBlk` (its own descriptor layout, queue code and feature negotiation), through a
//! transport that performs the register sequences of virtio-drivers' `MmioTransport` (modern
//! and legacy) as calls to the device, and a `Hal` whose DMA memory is the test guest RAM.

use std::cell::RefCell;
use std::ptr::NonNull;

use virtio_bindings::virtio_mmio as reg;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::tempdir::TempDir;

use crate::BusDevice;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::tests::{Counter, MEM_SIZE};
use super::*;

/// DMA pages (rings) are taken upwards from here; shared buffers bounce through the window
/// above them, reused once full (requests are synchronous, so few buffers are live at once).
const DMA_BASE: u64 = 0x10_0000;
const BOUNCE_BASE: u64 = 0x20_0000;

struct Dma {
    mem: GuestMem,
    host_base: *mut u8,
    next_page: u64,
    next_bounce: u64,
}

thread_local! {
    static DMA: RefCell<Option<Dma>> = const { RefCell::new(None) };
}

fn with_dma<T>(f: impl FnOnce(&mut Dma) -> T) -> T {
    DMA.with(|d| f(d.borrow_mut().as_mut().expect("the test installed its guest memory")))
}

struct TestHal;

// SAFETY: `dma_alloc` returns pointers into the test's guest RAM mapping (which outlives the
// driver), page-aligned, zeroed, and never handed out twice; `share` copies buffers into a
// bounce window of that RAM, which the driver never touches directly.
unsafe impl Hal for TestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        with_dma(|d| {
            let gpa = d.next_page;
            let len = (pages * PAGE_SIZE) as u64;
            assert!(gpa + len <= BOUNCE_BASE, "test DMA pages exhausted");
            d.next_page += len;
            d.mem.write_slice(&vec![0; len as usize], GuestAddress(gpa)).unwrap();
            // SAFETY: `gpa + len` is inside the single guest RAM region starting at GPA 0, which
            // `host_base` maps.
            let ptr = unsafe { d.host_base.add(gpa as usize) };
            (gpa, NonNull::new(ptr).unwrap())
        })
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("only the PCI transport maps BARs")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        // SAFETY: the caller guarantees `buffer` is valid and unaliased during this call.
        let bytes = unsafe { buffer.as_ref() };
        with_dma(|d| {
            let len = (bytes.len() as u64).next_multiple_of(16);
            if d.next_bounce + len > MEM_SIZE as u64 {
                d.next_bounce = BOUNCE_BASE;
            }
            let gpa = d.next_bounce;
            d.next_bounce += len;
            if direction != BufferDirection::DeviceToDriver {
                d.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
            }
            gpa
        })
    }

    unsafe fn unshare(paddr: PhysAddr, mut buffer: NonNull<[u8]>, direction: BufferDirection) {
        if direction == BufferDirection::DriverToDevice {
            return;
        }
        // SAFETY: the caller guarantees `buffer` is valid and unaliased during this call.
        let bytes = unsafe { buffer.as_mut() };
        with_dma(|d| d.mem.read_slice(bytes, GuestAddress(paddr)).unwrap());
    }
}

/// virtio-drivers' `MmioTransport`, register for register, as calls into the device.
struct Shim {
    dev: RefCell<MmioBlock>,
    version: MmioVersion,
}

impl Shim {
    fn r(&self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        self.dev.borrow_mut().read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn w(&self, offset: u32, value: u32) {
        self.dev.borrow_mut().write(u64::from(offset), &value.to_le_bytes());
    }

    fn legacy(&self) -> bool {
        self.version == MmioVersion::Legacy
    }
}

impl Transport for Shim {
    fn device_type(&self) -> DeviceType {
        DeviceType::try_from(self.r(reg::VIRTIO_MMIO_DEVICE_ID)).unwrap()
    }

    fn read_device_features(&mut self) -> u64 {
        self.w(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.r(reg::VIRTIO_MMIO_DEVICE_FEATURES));
        self.w(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        low | u64::from(self.r(reg::VIRTIO_MMIO_DEVICE_FEATURES)) << 32
    }

    fn write_driver_features(&mut self, features: u64) {
        self.w(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(reg::VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.w(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(reg::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.w(reg::VIRTIO_MMIO_QUEUE_SEL, queue.into());
        self.r(reg::VIRTIO_MMIO_QUEUE_NUM_MAX)
    }

    fn notify(&mut self, queue: u16) {
        self.w(reg::VIRTIO_MMIO_QUEUE_NOTIFY, queue.into());
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.r(reg::VIRTIO_MMIO_STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.w(reg::VIRTIO_MMIO_STATUS, status.bits());
    }

    fn set_guest_page_size(&mut self, size: u32) {
        if self.legacy() {
            self.w(reg::VIRTIO_MMIO_GUEST_PAGE_SIZE, size);
        }
    }

    fn requires_legacy_layout(&self) -> bool {
        self.legacy()
    }

    fn queue_set(&mut self, queue: u16, size: u32, desc: PhysAddr, driver: PhysAddr, device: PhysAddr) {
        self.w(reg::VIRTIO_MMIO_QUEUE_SEL, queue.into());
        self.w(reg::VIRTIO_MMIO_QUEUE_NUM, size);
        if self.legacy() {
            self.w(reg::VIRTIO_MMIO_QUEUE_ALIGN, PAGE_SIZE as u32);
            self.w(reg::VIRTIO_MMIO_QUEUE_PFN, (desc / PAGE_SIZE as u64) as u32);
            return;
        }
        for (low, addr) in [
            (reg::VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
            (reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, driver),
            (reg::VIRTIO_MMIO_QUEUE_USED_LOW, device),
        ] {
            self.w(low, addr as u32);
            self.w(low + 4, (addr >> 32) as u32);
        }
        self.w(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.w(reg::VIRTIO_MMIO_QUEUE_SEL, queue.into());
        if self.legacy() {
            for r in [reg::VIRTIO_MMIO_QUEUE_NUM, reg::VIRTIO_MMIO_QUEUE_ALIGN, reg::VIRTIO_MMIO_QUEUE_PFN] {
                self.w(r, 0);
            }
            return;
        }
        self.w(reg::VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(self.r(reg::VIRTIO_MMIO_QUEUE_READY), 0);
        for r in [reg::VIRTIO_MMIO_QUEUE_NUM, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH] {
            self.w(r, 0);
        }
        for r in [reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH] {
            self.w(r, 0);
        }
        for r in [reg::VIRTIO_MMIO_QUEUE_USED_LOW, reg::VIRTIO_MMIO_QUEUE_USED_HIGH] {
            self.w(r, 0);
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.w(reg::VIRTIO_MMIO_QUEUE_SEL, queue.into());
        let r = if self.legacy() { reg::VIRTIO_MMIO_QUEUE_PFN } else { reg::VIRTIO_MMIO_QUEUE_READY };
        self.r(r) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let pending = self.r(reg::VIRTIO_MMIO_INTERRUPT_STATUS);
        if pending != 0 {
            self.w(reg::VIRTIO_MMIO_INTERRUPT_ACK, pending);
        }
        InterruptStatus::from_bits_truncate(pending)
    }

    fn read_config_generation(&self) -> u32 {
        self.r(reg::VIRTIO_MMIO_CONFIG_GENERATION)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> virtio_drivers::Result<T> {
        let mut bytes = vec![0u8; size_of::<T>()];
        self.dev.borrow_mut().read(u64::from(reg::VIRTIO_MMIO_CONFIG) + offset as u64, &mut bytes);
        T::read_from_bytes(&bytes).map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(&mut self, offset: usize, value: T) -> virtio_drivers::Result<()> {
        self.dev.borrow_mut().write(u64::from(reg::VIRTIO_MMIO_CONFIG) + offset as u64, value.as_bytes());
        Ok(())
    }
}

fn driven_by_virtio_drivers(version: MmioVersion) {
    let dir = TempDir::new().unwrap();
    let disk = Disk::open(dir.as_path().join("disk.img"), 64 * 512).unwrap();
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let host_base = mem.get_host_address(GuestAddress(0)).unwrap();
    DMA.with(|d| {
        *d.borrow_mut() = Some(Dma { mem: mem.clone(), host_base, next_page: DMA_BASE, next_bounce: BOUNCE_BASE });
    });
    let irqs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let backend = BlockBackend::new(disk, "plate-disk");
    let dev = MmioBlock::new(version, mem.clone(), backend, Box::new(Counter(irqs)));
    let shim = Shim { dev: RefCell::new(dev), version };

    let mut blk = VirtIOBlk::<TestHal, Shim>::new(shim).expect("VirtIOBlk accepts the device");
    assert_eq!(blk.capacity(), 64);
    assert!(!blk.readonly());
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 5 + 1) as u8).collect();
    blk.write_blocks(3, &data).unwrap();
    let mut back = vec![0u8; 2048];
    blk.read_blocks(3, &mut back).unwrap();
    assert_eq!(back, data);
    blk.flush().unwrap();
    let mut id = [0u8; 20];
    let n = blk.device_id(&mut id).unwrap();
    assert_eq!(&id[..n], b"plate-disk");
    // Past the end: the driver sees an I/O error, and the device carries on.
    assert_eq!(blk.read_blocks(64, &mut back[..512]), Err(virtio_drivers::Error::IoError));
    assert_eq!(blk.write_blocks(63, &data), Err(virtio_drivers::Error::IoError));
    blk.read_blocks(4, &mut back[..512]).unwrap();
    assert_eq!(back[..512], data[512..1024]);
    assert!(blk.ack_interrupt().contains(InterruptStatus::QUEUE_INTERRUPT));
    drop(blk);
    DMA.with(|d| d.borrow_mut().take());
}

#[test]
fn virtio_drivers_blk_over_the_modern_transport() {
    driven_by_virtio_drivers(MmioVersion::Modern);
}

#[test]
fn virtio_drivers_blk_over_the_legacy_transport() {
    driven_by_virtio_drivers(MmioVersion::Legacy);
}
