//! The machine's virtio block device (`vmm boot --disk`), found at its fixed MMIO window
//! (`nvram::mmio`), driven by the `virtio-drivers` crate over its MMIO transport. Without a
//! disk the window holds virtio-mmio's placeholder (device ID 0), and under another VMM
//! nothing may answer there (the magic reads as something else): probing is always safe.
//!
//! The crate asks its [`Hal`] for DMA memory and for the device's view of buffers. This
//! kernel's memory is identity-mapped, so a physical address is the virtual one; DMA pages
//! come from a small pool in the kernel image (scratch for one boot, like all of `.bss`),
//! because the driver's queues are set up anew at every boot and never need to outlive it.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use nvram::mmio::{VIRTIO_BLK_BASE, VIRTIO_BLK_LEN, VIRTIO_MMIO_MAGIC};
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// virtio-mmio register offsets (virtio 1.2, 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_DEVICE_ID: u64 = 0x008;

/// The device ID of a block device.
const DEVICE_BLOCK: u32 = 2;

/// Pages of DMA memory for the driver's queues: a 16-entry split queue needs two.
const DMA_PAGES: usize = 8;

#[repr(C, align(4096))]
struct DmaPool([u8; DMA_PAGES * PAGE_SIZE]);

static mut DMA_POOL: DmaPool = DmaPool([0; DMA_PAGES * PAGE_SIZE]);
/// Pages of the pool handed out; the pool is a stack, reset when all are given back.
static DMA_USED: AtomicUsize = AtomicUsize::new(0);
static DMA_OUTSTANDING: AtomicUsize = AtomicUsize::new(0);

/// The kernel's side of `virtio-drivers`.
pub struct KernelHal;

// SAFETY: `dma_alloc` hands out page-aligned, zeroed pages of a static pool that nothing
// else uses, never the same page twice while it is allocated; addresses are identity-mapped,
// so the physical address the device gets is the one the driver uses.
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let first = DMA_USED.fetch_add(pages, Ordering::SeqCst);
        if first + pages > DMA_PAGES {
            panic!("virtio: the DMA pool of {DMA_PAGES} pages is exhausted");
        }
        DMA_OUTSTANDING.fetch_add(1, Ordering::SeqCst);
        // SAFETY: pages `first..first + pages` of the pool are this allocation's alone.
        let start = unsafe { (&raw mut DMA_POOL.0).cast::<u8>().add(first * PAGE_SIZE) };
        // SAFETY: as above: in bounds, and no one else holds these pages.
        unsafe { core::ptr::write_bytes(start, 0, pages * PAGE_SIZE) };
        let ptr = NonNull::new(start).expect("the pool is not at address 0");
        (start as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // Given back as a whole: once every allocation is returned, the pool is empty.
        if DMA_OUTSTANDING.fetch_sub(1, Ordering::SeqCst) == 1 {
            DMA_USED.store(0, Ordering::SeqCst);
        }
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO is not at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        // Kernel buffers only, identity-mapped.
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The block device, driven.
pub type Blk = VirtIOBlk<KernelHal, MmioTransport<'static>>;

fn read32(offset: u64) -> u32 {
    // SAFETY: the window is identity-mapped by the boot page tables (the first 4 GiB) and
    // is device memory or nothing; a read of these registers has no side effect.
    unsafe { core::ptr::read_volatile((VIRTIO_BLK_BASE + offset) as *const u32) }
}

/// Why the disk cannot be used.
#[derive(Debug)]
pub enum DiskError {
    /// The transport or the driver refused the device.
    Driver(virtio_drivers::Error),
    Transport(virtio_drivers::transport::mmio::MmioError),
}

impl core::fmt::Display for DiskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Driver(e) => write!(f, "the driver refused it: {e}"),
            Self::Transport(e) => write!(f, "its transport is unusable: {e}"),
        }
    }
}

/// The block device, if the machine has one, set up for requests. Kernel mode only (the
/// caller is `kmain` or a privileged call).
pub fn open() -> Option<Result<Blk, DiskError>> {
    if read32(REG_MAGIC) != VIRTIO_MMIO_MAGIC || read32(REG_DEVICE_ID) != DEVICE_BLOCK {
        return None;
    }
    let header = NonNull::new(VIRTIO_BLK_BASE as *mut VirtIOHeader).expect("the window is not at address 0");
    // SAFETY: a virtio-mmio device answers at the window (its magic said so), which is
    // identity-mapped device memory of `VIRTIO_BLK_LEN` bytes for the whole boot; this
    // kernel opens it once.
    let transport = match unsafe { MmioTransport::new(header, VIRTIO_BLK_LEN as usize) } {
        Ok(transport) => transport,
        Err(e) => return Some(Err(DiskError::Transport(e))),
    };
    Some(VirtIOBlk::new(transport).map_err(DiskError::Driver))
}

/// Bytes of the buffer of [`self_test`].
const TEST_BYTES: usize = nvram::cmdline::MAX_DISK_TEST_SECTORS as usize * SECTOR_SIZE;

#[repr(C, align(4096))]
struct TestBuffer([u64; TEST_BYTES / 8]);

static mut TEST_BUFFER: TestBuffer = TestBuffer([0; TEST_BYTES / 8]);

/// The word at `index` of the pattern `disk_test` writes for `seed`.
fn pattern(seed: u64, index: usize) -> u64 {
    (seed << 32 | index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What [`self_test`] found.
pub enum TestOutcome {
    Passed { first_sector: u64 },
    TooSmall,
    Mismatch { word: usize },
    Failed(virtio_drivers::Error),
}

/// Writes `sectors` sectors of a pattern derived from `seed` at the end of the disk,
/// flushes, reads them back over a cleared buffer and compares (the boot's `disk_test`).
pub fn self_test(blk: &mut Blk, sectors: usize, seed: u64) -> TestOutcome {
    let sectors = sectors.min(TEST_BYTES / SECTOR_SIZE);
    let Some(first) = blk.capacity().checked_sub(sectors as u64) else { return TestOutcome::TooSmall };
    let words = sectors * SECTOR_SIZE / 8;
    let whole = &raw mut TEST_BUFFER;
    // SAFETY: the buffer is used by this function alone, which the boot calls once.
    let whole: &mut [u64; TEST_BYTES / 8] = unsafe { &mut (*whole).0 };
    let buffer = &mut whole[..words];
    for (i, word) in buffer.iter_mut().enumerate() {
        *word = pattern(seed, i);
    }
    let result = blk
        .write_blocks(first as usize, zerocopy::IntoBytes::as_bytes(&*buffer))
        .and_then(|()| blk.flush())
        .and_then(|()| {
            buffer.fill(0);
            blk.read_blocks(first as usize, zerocopy::IntoBytes::as_mut_bytes(buffer))
        });
    if let Err(e) = result {
        return TestOutcome::Failed(e);
    }
    match buffer.iter().enumerate().position(|(i, &word)| word != pattern(seed, i)) {
        Some(word) => TestOutcome::Mismatch { word },
        None => TestOutcome::Passed { first_sector: first },
    }
}

/// The opened disk, kept for the plate store (`plate_store=disk`).
struct Held(Blk);

// SAFETY: the driver holds raw pointers to its MMIO window and DMA pages, which belong to
// the machine, not to a thread; this kernel runs on one CPU and reaches the driver only
// through `DISK`'s lock.
unsafe impl Send for Held {}

static DISK: spin::Mutex<Option<Held>> = spin::Mutex::new(None);

/// Keeps the disk for later requests ([`with`]).
pub fn keep(blk: Blk) {
    *DISK.lock() = Some(Held(blk));
}

/// Runs `f` with the kept disk, if there is one. Requests are synchronous (each waits for
/// its completion, which the device gives before the notifying write returns), so while
/// `f` runs no other request can be in flight: one holder of the lock at a time, on one
/// CPU. Callable from ring-3 kernel work too: the work space maps the MMIO window and the
/// kernel's DMA pool at their physical addresses, and nothing here is privileged.
pub fn with<R>(f: impl FnOnce(&mut Blk) -> R) -> Option<R> {
    DISK.lock().as_mut().map(|held| f(&mut held.0))
}
