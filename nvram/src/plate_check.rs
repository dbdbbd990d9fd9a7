//! The checks a committed plate table must pass before a restore copies anything by it.
//!
//! A slot's checksum tells a whole table from a torn one, not a sound one from a wrong one:
//! a table written by a buggy kernel, or bits flipped with the checksum recomputed, would
//! have the restore copy over the kernel image, the root header or a slot. So every entry
//! is checked against the layout first ([`check_entries`]): each plate's kind, `valid`
//! index and page count, its region and both save areas inside the managed frames (the
//! fixed plates at their fixed places), and no two of these ranges (nor a pending
//! deletion's areas) sharing a frame. The guest runs it at every restore, `vmm inspect`
//! on the image; both over the same code.

use core::fmt;

use crate::layout::{self, PAGE_SIZE};
use crate::plate::{area_sum, PlateKind, PlateTable, TableError, FIXED_FRAME_BITMAP, FIXED_RESOURCES};

/// Most pages of a fixed plate: its save area's room.
pub const FIXED_PAGES_MAX: u64 = layout::RESOURCES_SAVE_MAX / PAGE_SIZE;

/// Which entry of a table is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Plate `n` (its index in the table).
    Plate(usize),
    /// Entry `n` of the deletion-pending list.
    Pending(usize),
}

/// Which range of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    Region,
    AreaA,
    AreaB,
}

impl Range {
    fn name(self) -> &'static str {
        match self {
            Self::Region => "region",
            Self::AreaA => "save area A",
            Self::AreaB => "save area B",
        }
    }
}

/// What is wrong with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// No such plate kind.
    Kind(u32),
    /// `valid` is neither 0, 1 nor 2.
    Valid(u32),
    /// More pages than the managed frames (none, or more than its room, for a fixed plate).
    Pages(u64),
    /// A fixed plate that is not one of the two, or not at its fixed place.
    Fixed,
    /// A range not page-aligned, or not inside the managed frames.
    Outside(Range, u64),
    /// A save area not page-aligned, or not inside the disk's area space.
    OutsideDisk(Range, u64),
    /// A range sharing a frame with an earlier one (or with itself across areas).
    Overlap(Range, u64),
    /// The scratch bitmap is too small for the managed frames.
    Scratch,
}

/// A table that a restore must not follow: which entry, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryError {
    pub entry: Entry,
    pub problem: Problem,
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.entry {
            Entry::Plate(i) => write!(f, "plate {i}: ")?,
            Entry::Pending(i) => write!(f, "pending deletion {i}: ")?,
        }
        match self.problem {
            Problem::Kind(k) => write!(f, "unknown kind {k}"),
            Problem::Valid(v) => write!(f, "valid area {v} is none of 0, 1, 2"),
            Problem::Pages(p) => write!(f, "{p} pages"),
            Problem::Fixed => write!(f, "a fixed table not at its fixed place"),
            Problem::Outside(r, at) => write!(f, "{} at {at:#x} is outside the frame area", r.name()),
            Problem::OutsideDisk(r, at) => write!(f, "{} at {at:#x} is outside the disk's area space", r.name()),
            Problem::Overlap(r, at) => write!(f, "{} at {at:#x} overlaps another plate's frames", r.name()),
            Problem::Scratch => write!(f, "no room to check the frames"),
        }
    }
}

/// Marks frames `first..first + n` in `bitmap`; `false` if one was marked already (then
/// the bitmap is left partly marked: the caller stops anyway).
pub fn mark_frames(bitmap: &mut [u64], first: u64, n: u64) -> bool {
    let mut frame = first;
    let end = first + n;
    while frame < end {
        let shift = frame % 64;
        let take = (64 - shift).min(end - frame);
        let mask = if take == 64 { u64::MAX } else { ((1u64 << take) - 1) << shift };
        let Some(word) = bitmap.get_mut((frame / 64) as usize) else { return false };
        if *word & mask != 0 {
            return false;
        }
        *word |= mask;
        frame += take;
    }
    true
}

/// Checks every plate and pending entry of `table` against the layout of an image that
/// manages `frames` frames from `base` (`layout::FRAMES_BASE`; another only in tests of a
/// simulated memory). `scratch` (at least
/// `frames.div_ceil(64)` words, zeroed here) marks the frames taken, to find overlaps; it
/// is left dirty.
pub fn check_entries(table: &PlateTable, base: u64, frames: u64, scratch: &mut [u64]) -> Result<(), EntryError> {
    let fixed = |id| match id {
        FIXED_RESOURCES => Some((layout::RESOURCES, layout::RESOURCES_SAVE)),
        FIXED_FRAME_BITMAP => Some((layout::FRAME_BITMAP, layout::FRAME_BITMAP_SAVE)),
        _ => None,
    };
    check_in(table, &Spaces { base, frames, areas: None }, fixed, scratch)
}

/// [`check_entries`] for a table whose save areas are on a plate-store disk
/// (`crate::disk`): the regions inside RAM's `frames` frames from `base`, the areas inside
/// the disk's area space (the fixed plates' at the disk's fixed places), no two regions and
/// no two areas sharing a page. `scratch`: at least `(frames + sb.area_pages).div_ceil(64)`
/// words (RAM's frames, then the area pages), left dirty.
pub fn check_disk_entries(
    table: &PlateTable,
    base: u64,
    frames: u64,
    sb: &crate::disk::Superblock,
    scratch: &mut [u64],
) -> Result<(), EntryError> {
    let fixed = |id| {
        let src = match id {
            FIXED_RESOURCES => layout::RESOURCES,
            FIXED_FRAME_BITMAP => layout::FRAME_BITMAP,
            _ => return None,
        };
        Some((src, sb.fixed_areas(id)?))
    };
    check_in(table, &Spaces { base, frames, areas: Some((sb.area_start, sb.area_pages)) }, fixed, scratch)
}

/// Where a table's ranges must lie: regions in `frames` frames from `base`; save areas
/// there too (`areas: None`, NVM) or in an area space of its own (first byte, pages: a
/// disk), marked in the scratch bitmap after the frames.
struct Spaces {
    base: u64,
    frames: u64,
    areas: Option<(u64, u64)>,
}

fn check_in(
    table: &PlateTable,
    spaces: &Spaces,
    fixed: impl Fn(u32) -> Option<(u64, [u64; 2])>,
    scratch: &mut [u64],
) -> Result<(), EntryError> {
    let Spaces { base, frames, areas } = *spaces;
    let (area_base, area_pages) = areas.unwrap_or((base, frames));
    let bits = frames + if areas.is_some() { area_pages } else { 0 };
    let words = bits.div_ceil(64) as usize;
    let fail = |entry, problem| Err(EntryError { entry, problem });
    let Some(scratch) = scratch.get_mut(..words) else { return fail(Entry::Plate(0), Problem::Scratch) };
    scratch.fill(0);
    // A range's first bit in the scratch bitmap, or the problem: `area` ranges lie in the
    // area space, after RAM's frames when that space is a disk's.
    let bit_of = |range: Range, at: u64, pages: u64| {
        let is_area = range != Range::Region;
        let (b, n, skip) = if is_area { (area_base, area_pages, bits - area_pages) } else { (base, frames, 0) };
        let end = b + n * PAGE_SIZE;
        let inside = at.is_multiple_of(PAGE_SIZE)
            && at >= b
            && pages.checked_mul(PAGE_SIZE).and_then(|len| at.checked_add(len)).is_some_and(|e| e <= end);
        match (inside, is_area && areas.is_some()) {
            (true, _) => Ok(skip + (at - b) / PAGE_SIZE),
            (false, true) => Err(Problem::OutsideDisk(range, at)),
            (false, false) => Err(Problem::Outside(range, at)),
        }
    };
    let mut claim = |range: Range, at: u64, pages: u64| -> Result<(), Problem> {
        let first = bit_of(range, at, pages)?;
        if mark_frames(scratch, first, pages) {
            Ok(())
        } else {
            Err(Problem::Overlap(range, at))
        }
    };
    let most = frames.max(area_pages);
    for (i, p) in table.plates().iter().enumerate() {
        let entry = Entry::Plate(i);
        let Ok(kind) = PlateKind::try_from(p.kind) else { return fail(entry, Problem::Kind(p.kind)) };
        if p.valid > 2 {
            return fail(entry, Problem::Valid(p.valid));
        }
        // (A plate of no pages is possible: a kernel space whose region is gone. It takes no frame.)
        if p.pages > most {
            return fail(entry, Problem::Pages(p.pages));
        }
        if kind == PlateKind::Fixed {
            let Some(place) = fixed(p.id) else { return fail(entry, Problem::Fixed) };
            if (p.src, p.area) != place {
                return fail(entry, Problem::Fixed);
            }
            if p.pages == 0 || p.pages > FIXED_PAGES_MAX {
                return fail(entry, Problem::Pages(p.pages));
            }
            continue;
        }
        for (range, at) in [(Range::Region, p.src), (Range::AreaA, p.area[0]), (Range::AreaB, p.area[1])] {
            claim(range, at, p.pages).or_else(|problem| fail(entry, problem))?;
        }
    }
    for (i, p) in table.pending().iter().enumerate() {
        let entry = Entry::Pending(i);
        if p.pages > most {
            return fail(entry, Problem::Pages(p.pages));
        }
        for (range, at) in [(Range::AreaA, p.area[0]), (Range::AreaB, p.area[1])] {
            claim(range, at, p.pages).or_else(|problem| fail(entry, problem))?;
        }
    }
    Ok(())
}

/// Checks that every plate's valid area holds what the write-out that filled it left
/// there (its content checksum); `Err(n)`: plate `n`'s does not (or lies past what `read`
/// reaches). `read(addr, len)`: the bytes there. The table's entries must have passed
/// [`check_entries`] first.
pub fn verify_areas<'a>(table: &PlateTable, read: impl Fn(u64, u64) -> Option<&'a [u8]>) -> Result<(), usize> {
    for (i, plate) in table.plates().iter().enumerate().filter(|(_, p)| p.valid != 0) {
        let v = (plate.valid - 1) as usize & 1;
        if plate.summed & (1 << v) == 0 {
            continue;
        }
        if read(plate.area[v], plate.pages * PAGE_SIZE).is_none_or(|bytes| area_sum(bytes, 0) != plate.sum[v]) {
            return Err(i);
        }
    }
    Ok(())
}

/// Why a slot is not the one a restore follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Torn, or never written: its header or checksum does not check out.
    Table(TableError),
    /// It checks out, but an entry is wrong for the layout.
    Entry(EntryError),
    /// It checks out, but plate `n`'s valid save area does not hold what was written there.
    Content(usize),
    /// Its save areas could not be read back from the disk (a request failed).
    Unreadable,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Table(e) => write!(f, "the table does not check out ({e:?})"),
            Self::Entry(e) => write!(f, "an entry is wrong: {e}"),
            Self::Content(n) => write!(f, "plate {n}'s save area does not hold what was written there (checksum)"),
            Self::Unreadable => write!(f, "its save areas could not be read back from the disk"),
        }
    }
}

/// Which slot a restore follows, and why the others were passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The slot restored from; `None` if neither may be.
    pub index: Option<usize>,
    /// Per slot, why it was passed over (`None`: chosen, or not looked at).
    pub rejected: [Option<Rejection>; 2],
    /// Per slot, the generation it claims (a torn slot's claim is only a claim).
    pub generations: [u64; 2],
}

impl Choice {
    /// Whether a slot that checked out (a commit once whole) was refused: something was
    /// damaged, not merely torn by a crash.
    pub fn damaged(&self) -> bool {
        self.rejected.iter().flatten().any(|r| !matches!(r, Rejection::Table(_)))
    }

    /// The generation restored, if any.
    pub fn generation(&self) -> Option<u64> {
        self.index.map(|i| self.generations[i])
    }

    /// How many generations a restore by this choice goes back behind `recorded`, the
    /// generation the root header records: 0 normally (the header is written after the
    /// commit, so the slot restored may be one ahead of it). A damaged slot passed over
    /// counts as one generation lost even when the header had not recorded it yet.
    pub fn rolled_back(&self, recorded: u64) -> u64 {
        let behind = self.generation().map_or(recorded, |g| recorded.saturating_sub(g));
        if behind == 0 && self.damaged() {
            1
        } else {
            behind
        }
    }
}

/// Chooses the slot to restore from: of those that check out (header, checksum), whose
/// entries fit the layout of an image of `frames` frames from `base`
/// (`layout::FRAMES_BASE`) and whose valid save areas hold what was written there
/// ([`verify_areas`]), the one with the highest generation. The slot claiming the higher
/// generation is looked at first; the other only if the first is passed over. `scratch`:
/// at least `frames.div_ceil(64)` words, left dirty. `verify`: checks a table's valid save
/// areas, giving the first plate whose area does not hold what was written there
/// ([`verify_areas`] over the bytes, or a copier that sums as it copies); `None`: the save
/// areas are not checked (where that costs too much: PVM's emulated kernel mode).
pub fn choose(
    slots: [&PlateTable; 2],
    base: u64,
    frames: u64,
    scratch: &mut [u64],
    mut verify: Option<impl FnMut(&PlateTable) -> Result<(), usize>>,
) -> Choice {
    let mut choice = Choice { index: None, rejected: [None; 2], generations: slots.map(|t| t.generation) };
    let order = if slots[1].generation > slots[0].generation { [1, 0] } else { [0, 1] };
    for i in order {
        let t = slots[i];
        let verdict = t
            .check()
            .map_err(Rejection::Table)
            .and_then(|()| check_entries(t, base, frames, scratch).map_err(Rejection::Entry))
            .and_then(|()| verify.as_mut().map_or(Ok(()), |verify| verify(t)).map_err(Rejection::Content));
        match verdict {
            Ok(()) => {
                choice.index = Some(i);
                break;
            }
            Err(r) => choice.rejected[i] = Some(r),
        }
    }
    choice
}

#[cfg(test)]
mod tests;
