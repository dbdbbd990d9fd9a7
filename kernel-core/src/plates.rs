//! The plate function's lasting structures and its commit protocol.
//!
//! Every persisted region is a **plate** with two save areas, A and B, allocated when the
//! plate is made. The **plate table** lists the plates, which area of each holds the last
//! committed copy, and the save areas waiting to be freed (the **deletion-pending** list).
//! Its layout and checksum are `nvram::plate`'s; this module is the logic over it. It exists three times
//! in NVM (`nvram::layout`):
//!
//! - the *live* table, which the kernel changes between write-outs (new plates, deletions);
//! - two *slots*, the commit records. A write-out copies every changed page of every plate
//!   into the plate's inactive area, makes the copies durable, then writes the live table
//!   (each copied plate's `valid` flipped, `generation` + 1) into the slot that does not
//!   hold the committed table, checksum included, and makes it durable: that store is the
//!   commit. The committed state is the slot that checks out with the highest generation;
//!   a torn slot fails its checksum and the other slot stands.
//!
//! Recovery: pick the committed slot; copy each plate's valid area back to its region, the
//! kernel's structures (tables, kernel spaces, page tables) before the user spaces; make it
//! durable; free the pending save areas; copy the slot into the live table.

use crate::frames::FrameBitmap;

use nvram::plate::{area_sum, Pending, Plate, PlateKind, PlateTable};
use nvram::plate_check;

const PAGE: u64 = nvram::layout::PAGE_SIZE;

/// A run of bytes to copy between physical addresses. The copy engine's descriptor
/// itself, so that a list of copies goes to the engine as it was built.
pub type CopyRange = nvram::engine::Descriptor;
/// The content checksums of a copy, asked for and returned: the copy engine's record
/// itself, for the same reason.
pub type RangeSum = nvram::engine::RangeSum;

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

/// Whether [`plan_copies`] will copy every page of `plate` (each dirty or stale), asked
/// before it plans: it changes `stale`.
fn copies_every_page(plate: &Plate, mut dirty: impl FnMut(u64, u64) -> u64, stale: &[u64], stale_base: u64) -> bool {
    let mut page = 0;
    while page < plate.pages {
        let n = (plate.pages - page).min(64);
        let all = low_mask(n);
        if (dirty(page, n) | bits_at(stale, stale_base + page, n)) & all != all {
            return false;
        }
        page += n;
    }
    true
}

/// How the write-out and the restore touch NVM. The guest implements it over
/// identity-mapped memory (`clflushopt`/`clwb` + `sfence`, or a copy engine); the tests over
/// a simulated NVM with a cache that a crash may partly lose.
pub trait Persist {
    /// Copies every range; returns whether the copies are durable already (a copy engine's
    /// durable writes), or still need [`Persist::flush`]. All bulk copying goes through
    /// here, so that a copy engine can take it over.
    fn copy(&mut self, ranges: &[CopyRange]) -> bool;
    /// [`Persist::copy`], and for each range `i` the content checksums `sums[i]` asks for
    /// (`nvram::engine::RangeSum`: of what it wrote, and of what it overwrote, read before),
    /// when [`Persist::can_sum`]. A copier that copies page by page hashes each page as it
    /// moves it (the copy engine, the guest's CPU copier), so that nothing is read twice;
    /// this default reads the ranges before copying them.
    fn copy_summed(&mut self, ranges: &[CopyRange], sums: &mut [RangeSum]) -> bool {
        for (r, s) in ranges.iter().zip(sums.iter_mut()) {
            s.overwritten = if s.wants_overwritten() { area_sum(self.read(r.dst, r.len), s.first) } else { 0 };
            s.written = area_sum(self.read(r.src, r.len), s.first);
        }
        self.copy(ranges)
    }
    /// Writes back the cache lines of `addr..addr + len` (not yet ordered).
    fn flush(&mut self, addr: u64, len: u64);
    /// Waits until every flush before it is durable.
    fn fence(&mut self);
    /// Writes `table`'s meaningful bytes into commit slot `slot`, then flushes them.
    fn write_slot(&mut self, slot: usize, table: &PlateTable);
    /// The bytes at `addr..addr + len`, as the CPU sees them now (to checksum save areas
    /// and regions; the callers pass ranges of plates already checked against the layout).
    fn read(&self, addr: u64, len: u64) -> &[u8];
    /// Whether checksumming is cheap enough here (not in PVM's emulated kernel mode): if
    /// not, a write-out leaves the sums of the areas it fills unknown, and calls
    /// [`Persist::copy`] instead of [`Persist::copy_summed`]; a restore does not read the
    /// save areas to check them.
    fn can_sum(&self) -> bool {
        true
    }
    /// The content sums of the ranges' bytes where they are (`sums[i].written`, with
    /// `sums[i].first`, as [`Persist::copy_summed`] returns them), computed outside the CPU:
    /// a copy engine checks a save area this way without the CPU reading a byte of it
    /// (under PVM, every page the CPL-3 work touches first costs a shadow-paging fault), and
    /// without copying it anywhere. `false`: not offered, or refused; the restore then checks
    /// the areas by reading them ([`Persist::read`]).
    fn sum_in_place(&mut self, _ranges: &[CopyRange], _sums: &mut [RangeSum]) -> bool {
        false
    }
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
// A batch the engine takes whole: one it would refuse unrung would be copied and summed by
// the CPU behind its back (the engine keeps the hashes of what it wrote on the premise that
// it sees every refusal: `devices::engine`'s cache).
const _: () = assert!(BATCH <= nvram::engine::MAX_DESCRIPTORS as usize);

/// A write-out's copies under way: up to [`BATCH`] ranges, the sums asked for each, and
/// which plate's area each sum goes to once the batch is copied.
struct Batch {
    ranges: [CopyRange; BATCH],
    sums: [RangeSum; BATCH],
    /// Per range: the plate's index in the live table, times two, plus the area.
    owner: [u16; BATCH],
    used: usize,
    summing: bool,
}

const _: () = assert!(2 * nvram::plate::MAX_PLATES <= u16::MAX as usize);

impl Batch {
    fn new(summing: bool) -> Self {
        let empty = CopyRange { dst: 0, src: 0, len: 0 };
        Self { ranges: [empty; BATCH], sums: [RangeSum::default(); BATCH], owner: [0; BATCH], used: 0, summing }
    }

    /// Adds a copy of plate `index`'s pages into its `area`; `sum`: what to hash of it.
    fn push<P: Persist>(&mut self, nvm: &mut P, live: &mut PlateTable, r: CopyRange, sum: RangeSum, owner: u16) {
        if self.used == BATCH {
            self.run(nvm, live);
        }
        self.ranges[self.used] = r;
        self.sums[self.used] = sum;
        self.owner[self.used] = owner;
        self.used += 1;
    }

    /// Copies the batch durably, and moves each area's sum by what its copies wrote less
    /// what they overwrote (when asked: a known sum).
    fn run<P: Persist>(&mut self, nvm: &mut P, live: &mut PlateTable) {
        let n = core::mem::take(&mut self.used);
        if n == 0 {
            return;
        }
        let ranges = &self.ranges[..n];
        let durable = if self.summing { nvm.copy_summed(ranges, &mut self.sums[..n]) } else { nvm.copy(ranges) };
        if !durable {
            for r in ranges {
                nvm.flush(r.dst, r.len);
            }
        }
        if !self.summing {
            return;
        }
        let plates = live.plates_mut();
        for (s, &owner) in self.sums[..n].iter().zip(&self.owner[..n]) {
            let Some(plate) = plates.get_mut(usize::from(owner / 2)) else { continue };
            let sum = &mut plate.sum[usize::from(owner & 1)];
            let gone = if s.wants_overwritten() { s.overwritten } else { 0 };
            *sum = sum.wrapping_add(s.written).wrapping_sub(gone);
        }
    }
}

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
    let summing = nvm.can_sum();
    let mut batch = Batch::new(summing);
    for index in 0..live.plates().len() {
        let snapshot = live.plates()[index];
        stats.plates += 1;
        stats.plated_pages += snapshot.pages;
        let base = stale_index(&snapshot);
        let inactive = snapshot.inactive();
        let known = 1 << inactive;
        // The inactive area's content checksum follows its pages: the copier hashes each
        // page it writes and, where asked, each it overwrites, as it copies
        // (`Persist::copy_summed`). A copy of every page sums the area afresh, from zero,
        // and never asks for the old pages: they do not count, and the recorded sum may not
        // be theirs (a write-out cut short by a crash scribbled on this area after the
        // commit that recorded it; the restore then marks every page stale, so the next
        // write-out copies them all). A copy of some pages moves a known sum by what it
        // writes less what it overwrites; an unknown sum (a kernel-mode write-out's) stays
        // unknown. Old pages are read only then: a new plate's fresh frames are only written
        // (a first touch costs the host, and under PVM a shadow-paging fault, a page).
        let whole = summing && copies_every_page(&snapshot, |first, n| dirty(&snapshot, first, n), stale, base);
        let old_counts = !whole && snapshot.summed & known != 0;
        if summing && !old_counts {
            live.plates_mut()[index].sum[inactive] = 0;
        }
        let owner = (index * 2 + inactive) as u16;
        let copied = plan_copies(
            &snapshot,
            |first, n| dirty(&snapshot, first, n),
            stale,
            base,
            |r| {
                let sum = RangeSum::new((r.src - snapshot.src) / PAGE, old_counts);
                batch.push(nvm, live, r, sum, owner);
                stats.ranges += 1;
            },
        );
        stats.copied_pages += copied;
        let plate = &mut live.plates_mut()[index];
        if !summing {
            if copied != 0 {
                plate.summed &= !known;
            }
        } else if copied == plate.pages {
            // Every page written, summed from zero: known.
            plate.summed |= known;
        }
        // Copied in part: known stays known, unknown stays unknown.
        if snapshot.valid == 0 {
            // The first copy went into area A; area B has had none, so it lacks every
            // page (not only this write-out's dirty ones): its first copy is whole too.
            let mut page = 0;
            while page < plate.pages {
                let n = (plate.pages - page).min(64);
                set_bits_at(stale, base + page, n, u64::MAX);
                page += n;
            }
        }
        // Nothing copied: no page changed and the inactive area lacked none, so both areas
        // equal the plate; it keeps its valid area. Otherwise the inactive area now holds
        // the plate as of this write-out.
        if copied != 0 || plate.valid == 0 {
            plate.valid = inactive as u32 + 1;
        }
    }
    batch.run(nvm, live);
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
/// spaces, as the paper does. A user plate that `leave` takes (a lazy restore leaves its
/// pages in its committed area until first touched: `crate::lazy`) is not copied; `leave` is
/// asked once the kernel's plates are back, since it works on the restored page tables.
/// `also`: ranges copied with the kernel's plates, in their first copier call (the live
/// table from the committed slot: a copy engine's doorbell costs a VM exit).
/// Returns the pages copied.
pub fn restore<P: Persist>(
    committed: &PlateTable,
    nvm: &mut P,
    also: &[CopyRange],
    mut leave: impl FnMut(&Plate) -> bool,
) -> u64 {
    let mut batch = [CopyRange { dst: 0, src: 0, len: 0 }; BATCH];
    let mut used = 0;
    // An empty range would have a copy engine refuse the whole batch.
    for r in also.iter().filter(|r| r.len > 0).take(BATCH - 1) {
        batch[used] = *r;
        used += 1;
    }
    let mut pages = 0;
    let user = PlateKind::UserSpace as u32;
    for users in [false, true] {
        for plate in committed.plates().iter().filter(|p| (p.kind == user) == users && p.valid != 0) {
            if users && leave(plate) {
                continue;
            }
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

pub use nvram::plate_check::{Choice, Rejection};

/// [`nvram::plate_check::choose`] over `nvm`'s memory: the slot a restore follows (its
/// save areas checked where [`Persist::can_sum`]: by their sums in place
/// ([`Persist::sum_in_place`]) where the copier offers them, else by reading them).
pub fn choose<P: Persist>(slots: [&PlateTable; 2], base: u64, frames: u64, scratch: &mut [u64], nvm: &mut P) -> Choice {
    let summing = nvm.can_sum();
    let verify = |t: &PlateTable| match verify_in_place(t, nvm, IN_PLACE_PIECE) {
        Some(verdict) => verdict,
        None => plate_check::verify_areas(t, |addr, len| Some(nvm.read(addr, len))),
    };
    plate_check::choose(slots, base, frames, scratch, summing.then_some(verify))
}

/// The most pages of one range of [`verify_in_place`]: an area is summed in pieces of this
/// many (a copy engine takes a range of at most `nvram::engine::MAX_LEN`).
const IN_PLACE_PIECE: u64 = 16 << 10;

/// [`nvram::plate_check::verify_areas`] by sums in place: each valid, summed save area of
/// `table` in pieces of at most `piece_pages`, [`BATCH`] pieces a call, the sums of each
/// area's pieces added up (the sum is one of pages, each hashed with its index in the
/// plate) and compared with the table's. Gives the first plate whose area does not match;
/// `None` if the copier does not sum in place (or refused a batch).
fn verify_in_place<P: Persist>(table: &PlateTable, nvm: &mut P, piece_pages: u64) -> Option<Result<(), usize>> {
    let mut ranges = [CopyRange { dst: 0, src: 0, len: 0 }; BATCH];
    let mut sums = [RangeSum::new(0, false); BATCH];
    let mut owners = [0usize; BATCH];
    let mut used = 0;
    // The area being summed: its plate's index, what its finished pieces add up to.
    let mut current: Option<(usize, u64)> = None;
    let expected = |i: usize| {
        let p = &table.plates()[i];
        p.sum[(p.valid - 1) as usize & 1]
    };
    let mut settle =
        |ranges: &[CopyRange], sums: &mut [RangeSum], owners: &[usize], current: &mut Option<(usize, u64)>| {
            if !ranges.is_empty() && !nvm.sum_in_place(ranges, sums) {
                return None;
            }
            for (&owner, sum) in owners.iter().zip(sums.iter()) {
                match current {
                    Some((i, acc)) if *i == owner => *acc = acc.wrapping_add(sum.written),
                    _ => {
                        if let Some((i, acc)) = *current {
                            if acc != expected(i) {
                                return Some(Err(i));
                            }
                        }
                        *current = Some((owner, sum.written));
                    }
                }
            }
            Some(Ok(()))
        };
    for (i, plate) in table.plates().iter().enumerate().filter(|(_, p)| p.valid != 0) {
        let v = (plate.valid - 1) as usize & 1;
        if plate.summed & (1 << v) == 0 || plate.pages == 0 {
            continue;
        }
        let mut first = 0;
        while first < plate.pages {
            if used == BATCH {
                if let verdict @ (None | Some(Err(_))) = settle(&ranges, &mut sums, &owners, &mut current) {
                    return verdict;
                }
                used = 0;
            }
            let pages = (plate.pages - first).min(piece_pages.max(1));
            ranges[used] = CopyRange { dst: 0, src: plate.area[v] + first * PAGE, len: pages * PAGE };
            sums[used] = RangeSum::new(first, false);
            owners[used] = i;
            used += 1;
            first += pages;
        }
    }
    if let verdict @ (None | Some(Err(_))) = settle(&ranges[..used], &mut sums[..used], &owners[..used], &mut current) {
        return verdict;
    }
    match current {
        Some((i, acc)) if acc != expected(i) => Some(Err(i)),
        _ => Some(Ok(())),
    }
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

/// A plate could not be made: no frames for its save areas, or no room in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom;

/// Makes the plate of resource `id` of `kind` (its region at `src`, `pages` long):
/// allocates its two save areas and adds it to `live` (its pages are all stale: the caller
/// marks them). Room in the table is checked before anything is allocated, and an area
/// already taken is given back when the next cannot be had: a refusal leaves the frames
/// and the table as they were, since a write-out that cannot plate retries at every
/// period, and a leak per retry would end in no frames at all.
pub fn make_plate(
    live: &mut PlateTable,
    frames: &mut FrameBitmap,
    kind: PlateKind,
    id: u32,
    src: u64,
    pages: u64,
) -> Result<Plate, NoRoom> {
    if !live.has_room(kind, id) {
        return Err(NoRoom);
    }
    let a = frames.alloc(pages).map_err(|_| NoRoom)?;
    let b = match frames.alloc(pages) {
        Ok(b) => b,
        Err(_) => {
            let _ = frames.free(a, pages);
            return Err(NoRoom);
        }
    };
    let plate = Plate::new(kind, id, src, pages, [a, b]);
    if live.add(plate).is_none() {
        free_pending(&[Pending { area: plate.area, pages }], frames);
        return Err(NoRoom);
    }
    Ok(plate)
}

pub mod disk;

#[cfg(test)]
mod capacity_tests;
#[cfg(test)]
mod sum_tests;
#[cfg(test)]
mod tests;
