//! The plate table: the plate function's lasting list of plates, as laid out in NVM, and
//! the checksum that tells a committed table from a torn one. The write-out and the
//! restore that use it are the guest's logic (`kernel_core::plates`).
//!
//! It exists three times in NVM ([`crate::layout`]): the *live* table, which the kernel
//! changes between write-outs, and two *slots*, the commit records; the committed state is
//! the slot that checks out with the highest generation ([`committed`]).
//!
//! Table layout (all little endian; `count` plates and `pending` entries are meaningful):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `TNDRPLT1` |
//! | 8 | 4 | format version ([`VERSION`]) |
//! | 12 | 4 | `count`: plates in use |
//! | 16 | 8 | `generation` of the write-out this table commits |
//! | 24 | 4 | `pending`: entries of the deletion-pending list |
//! | 28 | 4 | `resume_first`: the process a restore runs first, plus one (0: none) |
//! | 32 | 8 | `checksum`: [`checksum64`] of every other word, as laid out below |
//! | 40 | 512 | `plated`: per kind, a bitmap of the resource ids that have a plate |
//! | 552 | 24 × 1154 | deletion-pending list: save areas `[a, b]` and `pages` |
//! | 28248 | 64 × 1154 | plates ([`Plate`]) |
//!
//! Plate entry:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `kind`: [`PlateKind`] (restore order) |
//! | 4 | 4 | `id`: the resource's index in its table |
//! | 8 | 8 | `src`: physical address of the region |
//! | 16 | 8 | `pages` |
//! | 24 | 16 | save areas `[a, b]`, physical |
//! | 40 | 4 | `valid`: 0 no copy yet, 1 area A, 2 area B |
//! | 44 | 4 | `summed`: bit `i` set when `sum[i]` is known |
//! | 48 | 16 | `sum`: per area, [`area_sum`] of what it holds (checked at restore) |
//!

use num_enum::{IntoPrimitive, TryFromPrimitive};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::resources::{KERNEL_SPACES, SPACES, USER_SPACES};

/// Magic of a plate table.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TNDRPLT1");
/// Version of the plate table's layout.
pub const VERSION: u32 = 3;
/// Most plates: one for every resource that can exist at once (the two fixed tables, every
/// kernel space, every space's page tables, every user space). A live plate belongs to a
/// live resource, one per resource, so plating an existing resource never finds the table
/// full: a table smaller than that would refuse a plate at every write-out while the
/// resources exist, and checkpointing would stop for good.
pub const MAX_PLATES: usize = 2 + KERNEL_SPACES + SPACES + USER_SPACES;
/// Most save areas pending deletion between two write-outs: as many as plates, so that the
/// list cannot overflow. Only a plate of the committed table goes pending ([`Removed`]): a
/// plate made since the last commit is in no committed table, and its areas are freed at
/// once. A committed plate leaves the live table when it goes pending and cannot come back
/// before the next commit empties the list, so the list holds at most one entry per plate
/// of the committed table. A list that could fill would have to refuse a deletion, or
/// leave the deleted resource's plate live for a new resource of the same id to inherit.
pub const MAX_PENDING: usize = MAX_PLATES;
/// Resource ids per kind that the `plated` bitmaps can mark.
pub const MAX_IDS: usize = 1024;

const _: () = assert!(KERNEL_SPACES <= MAX_IDS && SPACES <= MAX_IDS && USER_SPACES <= MAX_IDS);

/// What a plate holds, in restore order. Its name (`<&str>::from`) is what `vmm inspect`
/// shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, TryFromPrimitive, IntoPrimitive, strum::IntoStaticStr)]
#[repr(u32)]
pub enum PlateKind {
    /// A resource table at a fixed address (id: [`FIXED_RESOURCES`], [`FIXED_FRAME_BITMAP`]).
    #[strum(serialize = "fixed table")]
    Fixed = 0,
    /// A virtual kernel space.
    #[strum(serialize = "kernel space")]
    KernelSpace = 1,
    /// A virtual space's page-table pool (id: the space).
    #[strum(serialize = "page tables")]
    PageTables = 2,
    /// A virtual user space.
    #[strum(serialize = "user space")]
    UserSpace = 3,
}

/// Number of plate kinds.
pub const KINDS: usize = 4;
/// Id of the fixed plate of the resource tables.
pub const FIXED_RESOURCES: u32 = 0;
/// Id of the fixed plate of the frame bitmap.
pub const FIXED_FRAME_BITMAP: u32 = 1;

/// One plate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Plate {
    pub kind: u32,
    pub id: u32,
    pub src: u64,
    pub pages: u64,
    pub area: [u64; 2],
    pub valid: u32,
    /// Bit `i`: `sum[i]` is known. A write-out whose copier cannot read at native speed
    /// (the bookkeeping in PVM's emulated kernel mode, where hashing a page costs
    /// milliseconds) leaves the sum of the area it fills unknown; a restore then trusts
    /// that area as before. A whole copy later makes it known again.
    pub summed: u32,
    /// Per area, [`area_sum`] of its pages as the write-out that last filled it left them:
    /// a restore checks the valid area against it before copying (a bit flipped in a save
    /// area is refused, not restored).
    pub sum: [u64; 2],
}

impl Plate {
    /// A new plate, with no copy in either area yet.
    pub fn new(kind: PlateKind, id: u32, src: u64, pages: u64, area: [u64; 2]) -> Self {
        Self { kind: kind as u32, id, src, pages, area, valid: 0, summed: 0, sum: [0; 2] }
    }

    /// The area the next write-out fills: the one not holding the committed copy.
    pub fn inactive(&self) -> usize {
        if self.valid == 1 {
            1
        } else {
            0
        }
    }
}

/// Save areas waiting for the next commit before they may be freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Pending {
    pub area: [u64; 2],
    pub pages: u64,
}

/// The deletion-pending list is full. It cannot be (see [`MAX_PENDING`]); should it be,
/// the deletion is refused before anything is changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingFull;

/// What became of a deleted resource's plate ([`PlateTable::remove`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The resource had no plate.
    NoPlate,
    /// Its save areas wait in the pending list for the next commit: the committed table
    /// may need them.
    Pending,
    /// The plate was made after the last commit, so no committed table names its save
    /// areas: the caller frees them now.
    FreeNow(Pending),
}

/// A plate table (live copy or commit slot).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PlateTable {
    pub magic: u64,
    pub version: u32,
    pub count: u32,
    pub generation: u64,
    pub pending_count: u32,
    /// The process a restore of this table runs first, plus one (0: none): the one that
    /// asked for the write-out, or that it interrupted (the paper's restore, step 7).
    pub resume_first: u32,
    pub checksum: u64,
    pub plated: [[u64; MAX_IDS / 64]; KINDS],
    pub pending: [Pending; MAX_PENDING],
    pub plates: [Plate; MAX_PLATES],
}

const HEADER_WORDS: usize = 5;
const PLATED_WORDS: usize = KINDS * MAX_IDS / 64;
const PENDING_WORDS: usize = 3;
const PLATE_WORDS: usize = 8;

/// Size of a plate table.
pub const TABLE_SIZE: usize = core::mem::size_of::<PlateTable>();
const _: () =
    assert!(TABLE_SIZE == 8 * (HEADER_WORDS + PLATED_WORDS + PENDING_WORDS * MAX_PENDING + PLATE_WORDS * MAX_PLATES));
// The offsets of the module docs: the image format.
const _: () =
    assert!(TABLE_SIZE == 102_104 && core::mem::size_of::<Plate>() == 64 && core::mem::size_of::<Pending>() == 24);
const _: () = assert!(TABLE_SIZE as u64 <= crate::layout::PLATE_TABLE_MAX);
const _: () =
    assert!(core::mem::offset_of!(PlateTable, checksum) == 32 && core::mem::offset_of!(PlateTable, plated) == 40);
const _: () =
    assert!(core::mem::offset_of!(PlateTable, pending) == 552 && core::mem::offset_of!(PlateTable, plates) == 28_248);
const _: () = assert!(core::mem::offset_of!(Plate, valid) == 40 && core::mem::offset_of!(Plate, sum) == 48);

/// A 64-bit checksum over words: cheap enough for the emulated kernel mode of PVM (three
/// operations a word, where a bitwise CRC would take forty), and sensitive to every bit
/// and to the order of the words. It guards against torn writes, not against an adversary.
///
/// Word `i` goes into lane `i % 4`, each lane a chain of bijections (xor, rotate, multiply by
/// an odd constant), and the lanes and the word count are mixed at the end: a change of any
/// one word always changes the result. Four independent lanes let a loop take four words a
/// step: under PVM that made a restore of 456 plates 7 ms shorter (38 to 31 ms) and a
/// write-out 6 ms shorter than one chain with the word's index folded in.
pub fn checksum64(words: impl Iterator<Item = u64>) -> u64 {
    let mut c = Checksum::new();
    for w in words {
        c.word(w);
    }
    c.finish()
}

/// The lanes of [`checksum64`].
const CHECKSUM_LANES: usize = 4;
/// Each lane's value before its first word.
const CHECKSUM_SEEDS: [u64; CHECKSUM_LANES] =
    [0x6a09_e667_f3bc_c908, 0xbb67_ae85_84ca_a73b, 0x3c6e_f372_fe94_f82b, 0xa54f_f53a_5f1d_36f1];
/// The odd multiplier of a step.
const CHECKSUM_MUL: u64 = 0x9e37_79b9_7f4a_7c15;
/// The rotation of a step.
const CHECKSUM_ROTATE: u32 = 23;

/// One step of a lane: the lane's value after word `w`.
#[inline(always)]
fn checksum_step(h: u64, w: u64) -> u64 {
    (h ^ w).rotate_left(CHECKSUM_ROTATE).wrapping_mul(CHECKSUM_MUL)
}

/// [`checksum64`] under way.
struct Checksum {
    lanes: [u64; CHECKSUM_LANES],
    count: usize,
}

impl Checksum {
    fn new() -> Self {
        Self { lanes: CHECKSUM_SEEDS, count: 0 }
    }

    #[inline(always)]
    fn word(&mut self, w: u64) {
        let lane = self.count % CHECKSUM_LANES;
        self.lanes[lane] = checksum_step(self.lanes[lane], w);
        self.count += 1;
    }

    /// The words of `words` in order, four a step once the lanes are aligned.
    fn words(&mut self, mut words: &[u64]) {
        while !self.count.is_multiple_of(CHECKSUM_LANES) {
            let Some((&w, rest)) = words.split_first() else { return };
            self.word(w);
            words = rest;
        }
        let chunks = words.chunks_exact(CHECKSUM_LANES);
        let rest = chunks.remainder();
        let [mut a, mut b, mut c, mut d] = self.lanes;
        for q in chunks {
            a = checksum_step(a, q[0]);
            b = checksum_step(b, q[1]);
            c = checksum_step(c, q[2]);
            d = checksum_step(d, q[3]);
        }
        self.lanes = [a, b, c, d];
        self.count += words.len() - rest.len();
        for &w in rest {
            self.word(w);
        }
    }

    /// The lanes, in order, and the count of words taken, mixed.
    fn finish(self) -> u64 {
        let mut h = self.count as u64;
        for lane in self.lanes {
            h = checksum_step(h, lane);
        }
        h ^ (h >> 29)
    }
}

/// Why a table cannot be the committed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableError {
    BadMagic,
    Version(u32),
    Counts,
    Checksum,
}

impl PlateTable {
    /// An empty live table (in place: the table is too large for a stack).
    pub fn format(&mut self) {
        self.magic = MAGIC;
        self.version = VERSION;
        self.count = 0;
        self.generation = 0;
        self.pending_count = 0;
        self.resume_first = 0;
        self.plated = [[0; MAX_IDS / 64]; KINDS];
        self.seal();
    }

    /// The table as the words the checksum reads (its alignment is a word's, and it has no
    /// padding: `IntoBytes`).
    pub(crate) fn as_words(&self) -> &[u64; TABLE_SIZE / 8] {
        zerocopy::transmute_ref!(self)
    }

    /// The byte ranges `(offset, len)` that hold the meaningful part of the table: header,
    /// bitmaps and used pending entries; used plates. Copying a table copies these.
    pub fn used_ranges(&self) -> [(usize, usize); 2] {
        let pending = (self.pending_count as usize).min(MAX_PENDING);
        let plates_at = 8 * (HEADER_WORDS + PLATED_WORDS + PENDING_WORDS * MAX_PENDING);
        [
            (0, 8 * (HEADER_WORDS + PLATED_WORDS + PENDING_WORDS * pending)),
            (plates_at, 8 * PLATE_WORDS * (self.count as usize).min(MAX_PLATES)),
        ]
    }

    /// [`checksum64`] of the meaningful words in order (the header but its checksum, the
    /// bitmaps, the used pending entries, the used plates), four words a step over slices
    /// (this runs in emulated kernel mode under PVM).
    fn compute_checksum(&self) -> u64 {
        let words = self.as_words();
        let pending_at = HEADER_WORDS + PLATED_WORDS;
        let plates_at = pending_at + PENDING_WORDS * MAX_PENDING;
        let pending = (self.pending_count as usize).min(MAX_PENDING) * PENDING_WORDS;
        let plates = (self.count as usize).min(MAX_PLATES) * PLATE_WORDS;
        let mut c = Checksum::new();
        for part in [&words[..4], &words[HEADER_WORDS..pending_at + pending], &words[plates_at..plates_at + plates]] {
            c.words(part);
        }
        c.finish()
    }

    /// Recomputes the checksum.
    pub fn seal(&mut self) {
        self.checksum = self.compute_checksum();
    }

    /// Checks the header of a table that is not sealed at every change (the live one).
    pub fn check_header(&self) -> Result<(), TableError> {
        if self.magic != MAGIC {
            return Err(TableError::BadMagic);
        }
        if self.version != VERSION {
            return Err(TableError::Version(self.version));
        }
        if self.count as usize > MAX_PLATES || self.pending_count as usize > MAX_PENDING {
            return Err(TableError::Counts);
        }
        Ok(())
    }

    /// Checks a table found in NVM.
    pub fn check(&self) -> Result<(), TableError> {
        self.check_header()?;
        if self.compute_checksum() != self.checksum {
            return Err(TableError::Checksum);
        }
        Ok(())
    }

    pub fn plates(&self) -> &[Plate] {
        &self.plates[..(self.count as usize).min(MAX_PLATES)]
    }

    pub fn plates_mut(&mut self) -> &mut [Plate] {
        let n = (self.count as usize).min(MAX_PLATES);
        &mut self.plates[..n]
    }

    pub fn pending(&self) -> &[Pending] {
        &self.pending[..(self.pending_count as usize).min(MAX_PENDING)]
    }

    /// Whether resource `id` of `kind` has a plate.
    pub fn is_plated(&self, kind: PlateKind, id: u32) -> bool {
        let id = id as usize;
        id < MAX_IDS && self.plated[kind as usize][id / 64] & (1 << (id % 64)) != 0
    }

    fn mark(&mut self, kind: PlateKind, id: u32, on: bool) {
        let id = id as usize;
        if id < MAX_IDS {
            let word = &mut self.plated[kind as usize][id / 64];
            if on {
                *word |= 1 << (id % 64);
            } else {
                *word &= !(1 << (id % 64));
            }
        }
    }

    /// Adds a plate whose save areas the caller allocated; `None` if the table is full.
    pub fn add(&mut self, plate: Plate) -> Option<usize> {
        let n = self.count as usize;
        let kind = PlateKind::try_from(plate.kind).ok()?;
        if n >= MAX_PLATES || plate.id as usize >= MAX_IDS {
            return None;
        }
        self.plates[n] = plate;
        self.count += 1;
        self.mark(kind, plate.id, true);
        Some(n)
    }

    /// Whether the table has room for the plate of resource `id` of `kind` (which has none).
    pub fn has_room(&self, kind: PlateKind, id: u32) -> bool {
        (self.count as usize) < MAX_PLATES && (id as usize) < MAX_IDS && !self.is_plated(kind, id)
    }

    /// Whether deleting resource `id` of `kind` would find the pending list full (never, by
    /// [`MAX_PENDING`]; checked before a deletion changes anything all the same).
    pub fn removal_fits(&self, kind: PlateKind, id: u32) -> bool {
        // The scan only when the list is full: this runs at every deletion, in the emulated
        // kernel mode of PVM.
        (self.pending_count as usize) < MAX_PENDING
            || !self.plates().iter().any(|p| p.kind == kind as u32 && p.id == id && p.valid != 0)
    }

    /// Deletes the plate of resource `id` of `kind`. A plate some write-out committed
    /// (`valid` set) has its save areas join the pending list, freed after the next commit,
    /// never before: a crash until then restores from them. A plate made since the last
    /// commit is in no committed table: its areas are handed back to be freed at once.
    /// `Err(PendingFull)` (which [`MAX_PENDING`] rules out) changes nothing.
    pub fn remove(&mut self, kind: PlateKind, id: u32) -> Result<Removed, PendingFull> {
        let Some(index) = self.plates().iter().position(|p| p.kind == kind as u32 && p.id == id) else {
            return Ok(Removed::NoPlate);
        };
        let plate = self.plates[index];
        let areas = Pending { area: plate.area, pages: plate.pages };
        let removed = if plate.valid == 0 {
            Removed::FreeNow(areas)
        } else {
            if self.pending_count as usize >= MAX_PENDING {
                return Err(PendingFull);
            }
            self.pending[self.pending_count as usize] = areas;
            self.pending_count += 1;
            Removed::Pending
        };
        let last = self.count as usize - 1;
        self.plates[index] = self.plates[last];
        self.count -= 1;
        self.mark(kind, id, false);
        Ok(removed)
    }

    /// Copies every meaningful word of `other` into this table.
    pub fn copy_from(&mut self, other: &PlateTable) {
        self.magic = other.magic;
        self.version = other.version;
        self.count = other.count.min(MAX_PLATES as u32);
        self.generation = other.generation;
        self.pending_count = other.pending_count.min(MAX_PENDING as u32);
        self.resume_first = other.resume_first;
        self.checksum = other.checksum;
        self.plated = other.plated;
        let (p, n) = (self.pending_count as usize, self.count as usize);
        self.pending[..p].copy_from_slice(&other.pending[..p]);
        self.plates[..n].copy_from_slice(&other.plates[..n]);
    }
}

/// Of the two slots, the index of the committed one: it checks out and has the highest
/// generation. `None` if neither does (nothing was ever committed).
///
/// The slot that claims the higher generation is checked first, and if it checks out the
/// other is not checked at all: a checksum over a full table is tens of milliseconds of
/// emulated kernel mode under PVM, and a claim of a torn slot is only a claim.
pub fn committed(slots: [&PlateTable; 2]) -> Option<usize> {
    let order = if slots[1].generation > slots[0].generation { [1, 0] } else { [0, 1] };
    order.into_iter().find(|&i| slots[i].check().is_ok())
}

mod sum;
pub use sum::{area_sum, crc32c, page_hash, AreaSum};

#[cfg(test)]
mod tests;
