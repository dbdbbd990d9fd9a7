//! The plate store on the virtio disk (`plate_store=disk`, the paper's volatile plate
//! function): the disk's superblock opened (a blank disk formatted), the restore from its
//! last commit into fresh RAM at every boot, and the [`Disk`] by which the commit protocol
//! (`kernel_core::plates::disk`, the same as in NVM) reaches the driver (`dev::virtio`).
//!
//! The write-out occupies the machine, as the paper's step 1 says: it runs with interrupts
//! off on the one CPU, each request waits for its completion (the device completes it
//! before the notifying write returns, and the driver polls the used ring), and no process
//! can issue a disk request of its own (there is no system call for one; the kernel's only
//! other request is the boot's `disk_test`, before any write-out). So no other request is
//! ever in flight while a write-out runs: it holds by construction.

use kernel_core::frames::FrameBitmap;
use kernel_core::plates::disk::{self as store, Direction, Disk, DiskPersist, IoError, OpenError, Request};
use nvram::control::{Metrics, Operation};
use nvram::disk::{MAX_AREA_PAGES, SECTOR};
use nvram::layout;
use nvram::plate::PlateTable;
use nvram::plate_check::Choice;
use virtio_drivers::device::blk::SECTOR_SIZE;

use super::state::{Areas, DiskStore, Plating, Store, PAGE};
use crate::arch::{ring3, timer};
use crate::dev::virtio;

const _: () = assert!(SECTOR as usize == SECTOR_SIZE);

/// Bytes of the bounce buffer: the old contents of an area whose known sum a partial copy
/// moves are read through it, 16 pages a request.
const BOUNCE_BYTES: usize = 16 * PAGE as usize;

#[repr(C, align(4096))]
struct Bounce([u8; BOUNCE_BYTES]);

static mut BOUNCE: Bounce = Bounce([0; BOUNCE_BYTES]);
static mut AREA_BITS: [u64; (MAX_AREA_PAGES / 64) as usize] = [0; (MAX_AREA_PAGES / 64) as usize];

/// The bounce buffer. Used by one write-out or restore at a time (one CPU, interrupts off,
/// the callers hold the plate function's state exclusively).
fn bounce() -> &'static mut [u8] {
    let bounce = &raw mut BOUNCE;
    // SAFETY: see above: no two callers are ever active at once, and each drops its
    // reference when its operation ends.
    unsafe { &mut (*bounce).0 }
}

/// The virtio disk as the commit protocol sees it, with the time spent in requests.
pub(super) struct GuestDisk {
    /// TSC ticks spent in disk requests (the paper's storage I/O).
    pub(super) io_ticks: u64,
}

impl GuestDisk {
    pub(super) fn new() -> Self {
        Self { io_ticks: 0 }
    }

    fn run(
        &mut self,
        request: Request,
        at: u64,
        f: impl FnOnce(&mut virtio::Blk) -> virtio_drivers::Result,
    ) -> Result<(), IoError> {
        let t = timer::rdtsc();
        let done = virtio::with(f);
        self.io_ticks += timer::rdtsc() - t;
        match done {
            Some(Ok(())) => Ok(()),
            _ => Err(IoError { request, at }),
        }
    }
}

/// RAM `addr..addr + len`, identity-mapped.
fn ram(addr: u64, len: u64) -> &'static mut [u8] {
    // SAFETY: all of RAM is identity-mapped (in the work space too), and the callers pass
    // ranges of plates checked against the layout (a committed table's) or the kernel's own
    // (the live table's); nothing else touches them while the system is occupied.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len as usize) }
}

impl Disk for GuestDisk {
    fn write(&mut self, at: u64, from: u64, len: u64) -> Result<(), IoError> {
        self.write_bytes(at, ram(from, len))
    }

    fn write_bytes(&mut self, at: u64, bytes: &[u8]) -> Result<(), IoError> {
        self.run(Request::Write, at, |blk| blk.write_blocks((at / SECTOR) as usize, bytes))
    }

    fn read(&mut self, at: u64, to: u64, len: u64) -> Result<(), IoError> {
        self.read_bytes(at, ram(to, len))
    }

    fn read_bytes(&mut self, at: u64, bytes: &mut [u8]) -> Result<(), IoError> {
        self.run(Request::Read, at, |blk| blk.read_blocks((at / SECTOR) as usize, bytes))
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.run(Request::Flush, 0, |blk| blk.flush())
    }

    fn ram(&self, addr: u64, len: u64) -> &[u8] {
        ram(addr, len)
    }

    /// At CPL 3, where the CPU reads natively, unless `sums=off` (see
    /// `copy::GuestPersist::can_sum`).
    fn can_sum(&self) -> bool {
        super::sums_on() && ring3::in_user_mode()
    }
}

/// A [`DiskPersist`] for a write-out, over the bounce buffer.
pub(super) fn persist(disk: &mut GuestDisk) -> DiskPersist<'_, GuestDisk> {
    DiskPersist::new(disk, Direction::ToDisk, bounce())
}

/// Opens the plate store of the kept disk (a blank one is formatted: `formatted` then).
/// Kernel mode or CPL 3 alike.
pub fn open() -> Result<(DiskStore, bool), OpenError> {
    let capacity = virtio::with(|blk| blk.capacity() * SECTOR).unwrap_or(0);
    let mut disk = GuestDisk::new();
    let (sb, formatted) = ring3::run(|| store::open(&mut disk, capacity, bounce()))?;
    let words = &raw mut AREA_BITS;
    // SAFETY: taken once per boot (the plate store is opened once, by `kmain`), the only
    // reference to the bitmap; zeroed: every page of the area space is free until the
    // committed table says otherwise.
    let words = unsafe { &mut *words };
    words.fill(0);
    let areas = FrameBitmap::new(words, sb.area_start, sb.area_pages).expect("sized for MAX_AREA_PAGES");
    Ok((DiskStore { sb, areas }, formatted))
}

/// The disk's size in KiB (0 without one).
pub fn capacity_kib() -> u64 {
    virtio::with(|blk| blk.capacity() / 2).unwrap_or(0)
}

/// Reads both commit slots from the disk into their RAM addresses (`layout::PLATE_SLOTS`).
pub fn read_slots() -> Result<(), IoError> {
    let mut disk = GuestDisk::new();
    ring3::run(|| store::read_slots(&mut disk, layout::PLATE_SLOTS))
}

/// What [`restore`] found.
pub enum Outcome {
    /// Restored: the plate function's state and the restore's metrics.
    Restored(Plating, Metrics, Choice),
    /// Neither slot holds a commit that may be restored (the reasons are in the choice);
    /// the areas and the store are handed back.
    Refused(Areas, DiskStore, Choice),
}

/// Restores the newest commit that checks out (`kernel_core::plates::disk::restore`) from
/// the disk into fresh RAM (the slots read by [`read_slots`] first), the kernel's tables
/// first, rebuilds the allocation of the area space from the restored table (its pending
/// areas freed later, by `free_pending_after_restore`), and makes the restored table the
/// live one. Runs at CPL 3 (the check and the sums read every region).
pub fn restore(mut areas: Areas, mut disk_store: DiskStore) -> Outcome {
    let start = timer::rdtsc();
    let frames = areas.frames;
    let mut disk = GuestDisk::new();
    // All of it at CPL 3, the bookkeeping after the reads included (the allocation rebuilt
    // page by page, the bitmaps filled): in PVM's emulated kernel mode that alone took
    // tens of milliseconds for the paper's 456 plates.
    let outcome = ring3::run(|| {
        let restored = {
            // The dirty bitmap is the check's scratch, as in NVM mode (cleared afterwards).
            let Areas { slots, dirty, .. } = &mut areas;
            let scratch = super::state::dirty_room(dirty);
            let slots = [&*slots[0], &*slots[1]];
            store::restore(slots, layout::FRAMES_BASE, frames, &disk_store.sb, scratch, &mut disk, bounce())
        };
        let Some(index) = restored.choice.index else { return Err(restored.choice) };
        let committed: &PlateTable = areas.slots[index];
        let taken = store::take_areas(committed, &mut disk_store.areas);
        debug_assert!(taken.is_ok(), "the areas were checked against the area space");
        areas.live.copy_from(committed);
        areas.dirty.fill(0);
        // The restored areas equal their regions; the other areas are behind in unknown pages.
        areas.stale.fill(u64::MAX);
        let mut m = Metrics::new(Operation::Restore);
        m.copier = nvram::control::Copier::Disk as u32;
        m.plates = committed.count;
        m.generation = committed.generation;
        m.plated_bytes = committed.plates().iter().map(|p| p.pages * PAGE).sum();
        m.copied_bytes = restored.pages * PAGE;
        m.rolled_back = u32::from(restored.choice.damaged());
        Ok((restored.choice, m, index))
    });
    let (choice, mut m, index) = match outcome {
        Ok(done) => done,
        Err(choice) => return Outcome::Refused(areas, disk_store, choice),
    };
    let plating = areas.into_plating(Some((index, m.generation)), Store::Disk(disk_store));
    super::install_ops();
    m.total = timer::rdtsc() - start;
    m.phases[super::IO_PHASE] = disk.io_ticks.min(m.total);
    Outcome::Restored(plating, m, choice)
}
