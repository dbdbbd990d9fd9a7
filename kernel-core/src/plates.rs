//! The plate function's lasting structures and its commit protocol.
//!
//! Every persisted region is a **plate** with two save areas, A and B, allocated when the
//! plate is made. The **plate table** lists the plates, which area of each holds the last
//! committed copy, and the save areas waiting to be freed (the **deletion-pending** list).
//! It exists three times in NVM (`nvram::layout`):
//!
//! - the *live* table, which the kernel changes between write-outs (new plates, deletions);
//! - two *slots*, the commit records. A write-out copies every changed page of every plate
//!   into the plate's inactive area, makes the copies durable, then writes the live table
//!   (each copied plate's `valid` flipped, `generation` + 1) into the slot that does not
//!   hold the committed table, checksum included, and makes it durable: that store is the
//!   commit. The committed state is the slot that checks out with the highest generation;
//!   a torn slot fails its checksum and the other slot stands.
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
//! | 28 | 4 | reserved |
//! | 32 | 8 | `checksum`: [`checksum64`] of every other word, as laid out below |
//! | 40 | 512 | `plated`: per kind, a bitmap of the resource ids that have a plate |
//! | 552 | 24 × 512 | deletion-pending list: save areas `[a, b]` and `pages` |
//! | 12840 | 48 × 1024 | plates ([`Plate`]) |
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
//! | 44 | 4 | reserved |
//!
//! Recovery: pick the committed slot; copy each plate's valid area back to its region, the
//! kernel's structures (tables, kernel spaces, page tables) before the user spaces; make it
//! durable; free the pending save areas; copy the slot into the live table.

use crate::frames::FrameBitmap;

/// Magic of a plate table.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TNDRPLT1");
/// Version of the plate table's layout.
pub const VERSION: u32 = 2;
/// Most plates.
pub const MAX_PLATES: usize = 1024;
/// Most save areas pending deletion between two write-outs.
pub const MAX_PENDING: usize = 512;
/// Resource ids per kind that the `plated` bitmaps can mark.
pub const MAX_IDS: usize = 1024;
const PAGE: u64 = 4096;

/// What a plate holds, in restore order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum PlateKind {
    /// A resource table at a fixed address (id: [`FIXED_RESOURCES`], [`FIXED_FRAME_BITMAP`]).
    Fixed = 0,
    /// A virtual kernel space.
    KernelSpace = 1,
    /// A virtual space's page-table pool (id: the space).
    PageTables = 2,
    /// A virtual user space.
    UserSpace = 3,
}

/// Number of plate kinds.
pub const KINDS: usize = 4;
/// Id of the fixed plate of the resource tables.
pub const FIXED_RESOURCES: u32 = 0;
/// Id of the fixed plate of the frame bitmap.
pub const FIXED_FRAME_BITMAP: u32 = 1;

impl PlateKind {
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Fixed),
            1 => Some(Self::KernelSpace),
            2 => Some(Self::PageTables),
            3 => Some(Self::UserSpace),
            _ => None,
        }
    }
}

/// One plate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Plate {
    pub kind: u32,
    pub id: u32,
    pub src: u64,
    pub pages: u64,
    pub area: [u64; 2],
    pub valid: u32,
    pub reserved: u32,
}

impl Plate {
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Pending {
    pub area: [u64; 2],
    pub pages: u64,
}

/// The deletion-pending list is full: a write-out must empty it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingFull;

/// A plate table (live copy or commit slot).
#[repr(C)]
pub struct PlateTable {
    pub magic: u64,
    pub version: u32,
    pub count: u32,
    pub generation: u64,
    pub pending_count: u32,
    pub reserved: u32,
    pub checksum: u64,
    pub plated: [[u64; MAX_IDS / 64]; KINDS],
    pub pending: [Pending; MAX_PENDING],
    pub plates: [Plate; MAX_PLATES],
}

const HEADER_WORDS: usize = 5;
const PLATED_WORDS: usize = KINDS * MAX_IDS / 64;
const PENDING_WORDS: usize = 3;
const PLATE_WORDS: usize = 6;

/// Size of a plate table.
pub const TABLE_SIZE: usize = core::mem::size_of::<PlateTable>();
const _: () =
    assert!(TABLE_SIZE == 8 * (HEADER_WORDS + PLATED_WORDS + PENDING_WORDS * MAX_PENDING + PLATE_WORDS * MAX_PLATES));

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

const CHECKSUM_LANES: usize = 4;
const CHECKSUM_SEEDS: [u64; CHECKSUM_LANES] =
    [0x6a09_e667_f3bc_c908, 0xbb67_ae85_84ca_a73b, 0x3c6e_f372_fe94_f82b, 0xa54f_f53a_5f1d_36f1];
const CHECKSUM_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
fn checksum_step(h: u64, w: u64) -> u64 {
    (h ^ w).rotate_left(23).wrapping_mul(CHECKSUM_MUL)
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
        self.reserved = 0;
        self.plated = [[0; MAX_IDS / 64]; KINDS];
        self.seal();
    }

    fn as_words(&self) -> &[u64] {
        // SAFETY: `PlateTable` is `repr(C)` of u64s and pairs of u32s with no padding (the
        // size assertion above), so it is exactly `TABLE_SIZE / 8` initialised words.
        unsafe { core::slice::from_raw_parts(self as *const Self as *const u64, TABLE_SIZE / 8) }
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
        if self.magic != MAGIC {
            return Err(TableError::BadMagic);
        }
        if self.version != VERSION {
            return Err(TableError::Version(self.version));
        }
        if self.count as usize > MAX_PLATES || self.pending_count as usize > MAX_PENDING {
            return Err(TableError::Counts);
        }
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
        let kind = PlateKind::from_raw(plate.kind)?;
        if n >= MAX_PLATES || plate.id as usize >= MAX_IDS {
            return None;
        }
        self.plates[n] = plate;
        self.count += 1;
        self.mark(kind, plate.id, true);
        Some(n)
    }

    /// Deletes the plate of resource `id` of `kind`: its save areas join the pending list
    /// (freed after the next commit, never before). `Err(PendingFull)` if the list is full
    /// (the caller then makes a write-out first).
    pub fn remove(&mut self, kind: PlateKind, id: u32) -> Result<bool, PendingFull> {
        let Some(index) = self.plates().iter().position(|p| p.kind == kind as u32 && p.id == id) else {
            return Ok(false);
        };
        if self.pending_count as usize >= MAX_PENDING {
            return Err(PendingFull);
        }
        let plate = self.plates[index];
        self.pending[self.pending_count as usize] = Pending { area: plate.area, pages: plate.pages };
        self.pending_count += 1;
        let last = self.count as usize - 1;
        self.plates[index] = self.plates[last];
        self.count -= 1;
        self.mark(kind, id, false);
        Ok(true)
    }

    /// Copies every meaningful word of `other` into this table.
    pub fn copy_from(&mut self, other: &PlateTable) {
        self.magic = other.magic;
        self.version = other.version;
        self.count = other.count.min(MAX_PLATES as u32);
        self.generation = other.generation;
        self.pending_count = other.pending_count.min(MAX_PENDING as u32);
        self.reserved = 0;
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

/// A run of bytes to copy between physical addresses. The copy engine's descriptor
/// itself, so that a list of copies goes to the engine as it was built.
pub type CopyRange = nvram::engine::Descriptor;

/// Bits `bit..bit + n` (`n` ≤ 64) of `bitmap`, as the low bits of a word; bits past the
/// end of the bitmap read as ones (unknown: assume the worst).
pub fn bits_at(bitmap: &[u64], bit: u64, n: u64) -> u64 {
    let word = (bit / 64) as usize;
    let shift = bit % 64;
    let lo = bitmap.get(word).copied().unwrap_or(u64::MAX) >> shift;
    let hi = if shift == 0 { 0 } else { bitmap.get(word + 1).copied().unwrap_or(u64::MAX) << (64 - shift) };
    (lo | hi) & low_mask(n)
}

/// Sets bits `bit..bit + n` (`n` ≤ 64) of `bitmap` to the low bits of `value`.
pub fn set_bits_at(bitmap: &mut [u64], bit: u64, n: u64, value: u64) {
    let word = (bit / 64) as usize;
    let shift = bit % 64;
    let mask = low_mask(n);
    let value = value & mask;
    if let Some(w) = bitmap.get_mut(word) {
        *w = (*w & !(mask << shift)) | (value << shift);
    }
    if shift != 0 && shift + n > 64 {
        if let Some(w) = bitmap.get_mut(word + 1) {
            let rest = 64 - shift;
            *w = (*w & !(mask >> rest)) | (value >> rest);
        }
    }
}

fn low_mask(n: u64) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1 << n) - 1
    }
}

/// The pages of a plate to copy into its inactive area: those dirtied since the last
/// write-out, and those the inactive area lacks (`stale`: copied into the other area last
/// time). Afterwards `stale` holds this write-out's dirty pages, which the other area (the
/// committed one until this commit) now lacks.
///
/// Works 64 pages at a time: `dirty(first, n)` gives the dirty bits of pages
/// `first..first + n` as a word; `stale` is indexed by `stale_base + page`. Adjacent pages
/// are merged into one range. Returns the pages to copy. The cost is one step per 64 pages
/// and per range, which matters in the emulated kernel mode of PVM.
pub fn plan_copies(
    plate: &Plate,
    mut dirty: impl FnMut(u64, u64) -> u64,
    stale: &mut [u64],
    stale_base: u64,
    mut emit: impl FnMut(CopyRange),
) -> u64 {
    let dst = plate.area[plate.inactive()];
    let mut run: Option<(u64, u64)> = None;
    let mut copied = 0;
    let mut emit_run = |start: u64, len: u64| {
        emit(CopyRange { dst: dst + start * PAGE, src: plate.src + start * PAGE, len: len * PAGE });
    };
    let mut page = 0;
    while page < plate.pages {
        let n = (plate.pages - page).min(64);
        let d = dirty(page, n) & low_mask(n);
        let was_stale = bits_at(stale, stale_base + page, n);
        set_bits_at(stale, stale_base + page, n, d);
        let mut copy = (d | was_stale) & low_mask(n);
        copied += u64::from(copy.count_ones());
        while copy != 0 {
            let start = u64::from(copy.trailing_zeros());
            let len = u64::from((!(copy >> start)).trailing_zeros()).min(64 - start);
            let first = page + start;
            run = match run {
                Some((s, l)) if s + l == first => Some((s, l + len)),
                Some((s, l)) => {
                    emit_run(s, l);
                    Some((first, len))
                }
                None => Some((first, len)),
            };
            copy &= !(low_mask(len) << start);
        }
        page += n;
    }
    if let Some((s, l)) = run {
        emit_run(s, l);
    }
    copied
}

/// How the write-out and the restore touch NVM. The guest implements it over
/// identity-mapped memory (`clflushopt`/`clwb` + `sfence`, or a copy engine); the tests over
/// a simulated NVM with a cache that a crash may partly lose.
pub trait Persist {
    /// Copies every range; returns whether the copies are durable already (a copy engine's
    /// durable writes), or still need [`Persist::flush`]. All bulk copying goes through
    /// here, so that a copy engine can take it over.
    fn copy(&mut self, ranges: &[CopyRange]) -> bool;
    /// Writes back the cache lines of `addr..addr + len` (not yet ordered).
    fn flush(&mut self, addr: u64, len: u64);
    /// Waits until every flush before it is durable.
    fn fence(&mut self);
    /// Writes `table`'s meaningful bytes into commit slot `slot`, then flushes them.
    fn write_slot(&mut self, slot: usize, table: &PlateTable);
}

/// What a write-out did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutStats {
    pub plates: u64,
    pub plated_pages: u64,
    pub copied_pages: u64,
    pub ranges: u64,
}

/// Ranges batched per `Persist::copy` call (a copy engine's doorbell each).
const BATCH: usize = 256;

/// Steps 4 to 10 of a write-out, after plate-ification: copies what changed of every plate
/// into its inactive area and makes it durable, then commits the live table (generation
/// `committed_generation + 1`) into slot `slot`, the one not holding the committed table.
/// When this returns, the write-out is committed; the caller then frees the pending list.
///
/// `dirty(plate, first, n)` gives, as a word, which of pages `first..first + n` (n ≤ 64)
/// changed since the last write-out; `stale` is the bitmap of pages whose inactive area is
/// behind, indexed by `stale_index(plate) + page`.
pub fn write_out<P: Persist>(
    live: &mut PlateTable,
    committed_generation: u64,
    slot: usize,
    stale: &mut [u64],
    stale_index: impl Fn(&Plate) -> u64,
    mut dirty: impl FnMut(&Plate, u64, u64) -> u64,
    nvm: &mut P,
) -> WriteOutStats {
    let mut stats = WriteOutStats::default();
    let mut batch = [CopyRange { dst: 0, src: 0, len: 0 }; BATCH];
    let mut used = 0;
    for plate in live.plates_mut() {
        stats.plates += 1;
        stats.plated_pages += plate.pages;
        let snapshot = *plate;
        let copied = plan_copies(
            &snapshot,
            |first, n| dirty(&snapshot, first, n),
            stale,
            stale_index(plate),
            |r| {
                if used == BATCH {
                    copy_durably(nvm, &batch);
                    used = 0;
                }
                batch[used] = r;
                used += 1;
                stats.ranges += 1;
            },
        );
        stats.copied_pages += copied;
        // Nothing copied: no page changed and the inactive area lacked none, so both areas
        // equal the plate; it keeps its valid area. Otherwise the inactive area now holds
        // the plate as of this write-out.
        if copied != 0 || plate.valid == 0 {
            plate.valid = snapshot.inactive() as u32 + 1;
        }
    }
    copy_durably(nvm, &batch[..used]);
    // The copies are durable before the table that declares them valid is written.
    nvm.fence();
    live.generation = committed_generation + 1;
    live.seal();
    nvm.write_slot(slot, live);
    nvm.fence();
    stats
}

/// Copies every plate's committed area back to its region and makes it durable: the
/// kernel's own structures first (the tables, kernel spaces, page tables), then the user
/// spaces, as the paper does. Returns the pages copied.
pub fn restore<P: Persist>(committed: &PlateTable, nvm: &mut P) -> u64 {
    let mut batch = [CopyRange { dst: 0, src: 0, len: 0 }; BATCH];
    let mut used = 0;
    let mut pages = 0;
    let user = PlateKind::UserSpace as u32;
    for users in [false, true] {
        for plate in committed.plates().iter().filter(|p| (p.kind == user) == users && p.valid != 0) {
            if used == BATCH {
                copy_durably(nvm, &batch);
                used = 0;
            }
            let area = plate.area[(plate.valid - 1) as usize & 1];
            batch[used] = CopyRange { dst: plate.src, src: area, len: plate.pages * PAGE };
            used += 1;
            pages += plate.pages;
        }
        copy_durably(nvm, &batch[..used]);
        used = 0;
    }
    nvm.fence();
    pages
}

/// Copies `ranges` and writes their lines back, unless the copier made them durable
/// itself (the caller fences).
fn copy_durably<P: Persist>(nvm: &mut P, ranges: &[CopyRange]) {
    if ranges.is_empty() || nvm.copy(ranges) {
        return;
    }
    for r in ranges {
        nvm.flush(r.dst, r.len);
    }
}

/// Frees the save areas of the pending list (after a commit, or after a restore).
pub fn free_pending(pending: &[Pending], frames: &mut FrameBitmap) {
    for p in pending {
        for area in p.area {
            let _ = frames.free(area, p.pages);
        }
    }
}

#[cfg(test)]
mod tests;
