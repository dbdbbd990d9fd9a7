//! The plate function's state: its fixed areas in NVM, taken once per boot, and what a
//! boot keeps of them.

use core::sync::atomic::{AtomicBool, Ordering};

use kernel_core::frames::FrameBitmap;
use nvram::disk::Superblock;
use nvram::layout;
use nvram::plate::{self, Plate, PlateKind, PlateTable};
use nvram::resources::TABLE_POOL_PAGES;

use crate::arch::ring3;

// The pool of page tables is plated whole at creation; only its used part is copied.
const _: () = assert!(TABLE_POOL_PAGES <= 64);

pub(super) const PAGE: u64 = 4096;

/// Most pages of a fixed plate (the stale bitmap reserves this many bits for each).
pub(super) const FIXED_PAGES_MAX: u64 = layout::RESOURCES_SAVE_MAX / PAGE;

/// The plate function's fixed areas in NVM (`nvram::layout`): the live table, the two
/// commit slots, the stale and dirty bitmaps. Referenced once per boot ([`Areas::take`]);
/// every later access goes through these references, so none is ever made twice.
pub struct Areas {
    pub(super) live: &'static mut PlateTable,
    pub(super) slots: [&'static mut PlateTable; 2],
    pub(super) stale: &'static mut [u64],
    pub(super) dirty: &'static mut [u64],
    /// Frames managed (bit index of the first fixed-plate page in `stale`).
    pub(super) frames: u64,
}

impl Areas {
    /// Takes the references to the areas, for `frames` managed frames. Once per boot: a
    /// second call panics (it would alias the first's references).
    pub fn take(frames: u64) -> Self {
        static TAKEN: AtomicBool = AtomicBool::new(false);
        assert!(!TAKEN.swap(true, Ordering::Relaxed), "the plate areas are taken once per boot");
        let words = (frames + 2 * FIXED_PAGES_MAX).div_ceil(64) as usize;
        assert!((words * 8) as u64 <= layout::PLATE_BITMAP_MAX);
        // SAFETY: the plate tables and the bitmaps have their own fixed, disjoint areas
        // (nvram::layout, sized above the table's size by kernel-core's constants and above
        // `words` by the assertion), identity-mapped; `TAKEN` makes these the only references.
        unsafe {
            Self {
                live: &mut *(layout::PLATE_LIVE as *mut PlateTable),
                slots: [
                    &mut *(layout::PLATE_SLOTS[0] as *mut PlateTable),
                    &mut *(layout::PLATE_SLOTS[1] as *mut PlateTable),
                ],
                stale: core::slice::from_raw_parts_mut(layout::PLATE_STALE as *mut u64, words),
                dirty: core::slice::from_raw_parts_mut(layout::PLATE_DIRTY as *mut u64, words),
                frames,
            }
        }
    }

    /// The committed slot, if any (at CPL 3: checking a table is pure computation).
    pub(super) fn committed(&self) -> Option<usize> {
        ring3::run(|| plate::committed([&*self.slots[0], &*self.slots[1]]))
    }

    /// Becomes the plate function's state (the slots are reached by address from now on).
    pub(super) fn into_plating(self, committed: Option<(usize, u64)>, store: Store) -> Plating {
        Plating {
            live: self.live,
            committed,
            stale: self.stale,
            dirty: self.dirty,
            frames: self.frames,
            store,
            tail: None,
        }
    }
}

/// Where the save areas and the commit slots are (`plate_store=`).
pub enum Store {
    /// In NVM: the areas are frames of RAM, the slots at their fixed addresses.
    Nvm,
    /// On the virtio disk (`nvram::disk`); the slots' RAM addresses hold what was last
    /// read from the disk, or written to it.
    Disk(DiskStore),
}

/// The plate store on the disk, opened for this boot.
pub struct DiskStore {
    pub(super) sb: Superblock,
    /// The allocation of the disk's area space, one bit a page: rebuilt at each boot from
    /// the committed table (`kernel_core::plates::disk::take_areas`), never stored.
    pub(super) areas: FrameBitmap<'static>,
}

impl DiskStore {
    /// Pages of the disk's area space.
    pub fn area_pages(&self) -> u64 {
        self.sb.area_pages
    }
}

/// The dirty bitmap's whole room (`layout::PLATE_BITMAP_MAX`) from `dirty` (an
/// [`Areas::dirty`]), as scratch for a check that marks more bits than one per frame: a
/// disk's, which marks the area pages too.
pub(super) fn dirty_room(dirty: &mut [u64]) -> &mut [u64] {
    // SAFETY: an `Areas::dirty` is the start of the bitmap's fixed area of
    // PLATE_BITMAP_MAX bytes, identity-mapped and referenced nowhere else; the slice
    // borrows `dirty` mutably, so that is not used while it lives.
    unsafe { core::slice::from_raw_parts_mut(dirty.as_mut_ptr(), (layout::PLATE_BITMAP_MAX / 8) as usize) }
}

/// The plate function's state for this boot.
pub struct Plating {
    pub live: &'static mut PlateTable,
    /// The committed slot and its generation (`None`: nothing committed yet).
    pub committed: Option<(usize, u64)>,
    pub(super) stale: &'static mut [u64],
    pub(super) dirty: &'static mut [u64],
    /// Frames managed (bit index of the first fixed-plate page in `stale`).
    pub(super) frames: u64,
    pub(super) store: Store,
    /// A lazy restore under way: user pages still in their save areas (`super::lazy`).
    pub(super) tail: Option<super::lazy::Tail>,
}

impl Plating {
    /// The live table, and the allocator of save areas when it is not the frames' (the
    /// disk's area space): what a resource operation needs to defer a deletion.
    pub fn split(&mut self) -> (&mut PlateTable, Option<&mut FrameBitmap<'static>>) {
        let areas = match &mut self.store {
            Store::Disk(d) => Some(&mut d.areas),
            Store::Nvm => None,
        };
        (self.live, areas)
    }

    /// Whether the save areas are on the disk.
    pub fn on_disk(&self) -> bool {
        matches!(self.store, Store::Disk(_))
    }

    /// Index in the stale bitmap of a plate's first page.
    pub(super) fn stale_index(&self, plate: &Plate) -> u64 {
        match PlateKind::try_from(plate.kind).ok() {
            Some(PlateKind::Fixed) => self.frames + u64::from(plate.id) * FIXED_PAGES_MAX,
            _ => (plate.src - layout::FRAMES_BASE) / PAGE,
        }
    }
}

/// Why a write-out did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutError {
    /// `plate=off`.
    Disabled,
    /// No frames (or table room) for the save areas of a new plate; with the areas on the
    /// disk, no room left in its area space.
    NoRoom,
    /// A disk request failed (`plate_store=disk`): nothing after it was written, and
    /// nothing was committed.
    Disk(kernel_core::plates::disk::IoError),
}
