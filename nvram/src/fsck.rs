//! The image's consistency check, like `fsck`: `vmm inspect --check` runs it offline, the
//! guest after a restore with `check=on`, `vmm torture` after every restore. One code for
//! all three (`no_std`), so that they cannot disagree.
//!
//! A *state* is what a boot would run on: the resource tables, the frame bitmap and the
//! plate table. After a graceful shutdown it is the live one; after a crash, the committed
//! one (the fixed plates' valid save areas and the committed slot), which a restore brings
//! back. Its rules:
//!
//! - every plate and pending entry fits the layout ([`crate::plate_check`]);
//! - every managed frame is owned by exactly one real memory (regions, page-table pools),
//!   plate save area or pending save area, and the frame bitmap marks exactly the owned
//!   frames (so a pending deletion's areas are not reused, and nothing leaks);
//! - every plate names a resource that exists, at its address and size, and the plate
//!   table's bitmaps of plated ids say the same as its list; in a committed state every
//!   space has a plate (the write-out plate-ifies first).

use core::fmt;

use crate::header::{RootHeader, ShutdownFlag};
use crate::layout::{self, FRAMES_BASE, PAGE_SIZE};
use crate::plate::{PlateKind, PlateTable, FIXED_FRAME_BITMAP, FIXED_RESOURCES, MAX_IDS, TABLE_SIZE};
use crate::plate_check::{self, mark_frames, EntryError, Rejection};
use crate::resources::{Resources, TABLE_POOL_PAGES};

/// One rule broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// The committed slot's generation is behind the root header's.
    Generation { header: u64, committed: u64 },
    /// The root header records a commit, and no slot holds one.
    NoCommit { header: u64 },
    /// A plate or pending entry does not fit the layout.
    Entry(EntryError),
    /// A plate's valid save area does not hold what was written there.
    Content { plate: usize },
    /// Frame `frame` (its address) is owned twice (by a real memory or a save area).
    SharedFrame { frame: u64 },
    /// Frame `frame` is owned but free in the frame bitmap.
    OwnedButFree { frame: u64 },
    /// Frame `frame` is marked in use in the frame bitmap, and nothing owns it (a leak).
    Leaked { frame: u64 },
    /// Real memory `id` lies outside the managed frames.
    RealOutside { id: u32 },
    /// Plate `plate` names a resource that does not exist.
    NoResource { plate: usize },
    /// Plate `plate`'s region or size is not its resource's.
    WrongPlace { plate: usize },
    /// The plated-ids bitmap and the plate list disagree about `kind` id `id`.
    PlatedBits { kind: u32, id: u32 },
    /// A space (`kind`, id `id`) of a committed state has no plate.
    Unplated { kind: u32, id: u32 },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = |k: u32| PlateKind::try_from(k).map_or("?", <&str>::from);
        match *self {
            Self::Generation { header, committed } => {
                write!(f, "the root header records generation {header}, the committed slot holds {committed}")
            }
            Self::NoCommit { header } => write!(f, "the root header records generation {header}, no slot is committed"),
            Self::Entry(e) => write!(f, "{e}"),
            Self::Content { plate } => write!(f, "plate {plate}'s valid save area fails its checksum"),
            Self::SharedFrame { frame } => write!(f, "frame {frame:#x} has two owners"),
            Self::OwnedButFree { frame } => write!(f, "frame {frame:#x} is in use but free in the frame bitmap"),
            Self::Leaked { frame } => write!(f, "frame {frame:#x} is marked in use and nothing owns it"),
            Self::RealOutside { id } => write!(f, "real memory {id} is outside the frame area"),
            Self::NoResource { plate } => write!(f, "plate {plate} names a resource that does not exist"),
            Self::WrongPlace { plate } => write!(f, "plate {plate}'s region or size is not its resource's"),
            Self::PlatedBits { kind: k, id } => {
                write!(f, "the plated bitmap and the plate list disagree about {} {id}", kind(k))
            }
            Self::Unplated { kind: k, id } => write!(f, "{} {id} has no plate in a committed state", kind(k)),
        }
    }
}

/// A state to check: see the module's docs.
pub struct State<'a> {
    pub resources: &'a Resources,
    /// The frame bitmap's words (one bit per frame from `FRAMES_BASE`, 1 = in use).
    pub bitmap: &'a [u64],
    pub table: &'a PlateTable,
    /// Frames managed.
    pub frames: u64,
    /// The committed state of a crash (every space plated), rather than a live one.
    pub committed: bool,
}

/// Checks `state`, calling `report` with each violation (frame violations: the first few
/// of each kind only, so that one broken table does not drown the rest); returns how many
/// were found. `scratch`: at least `frames.div_ceil(64)` words.
pub fn check_state(state: &State<'_>, scratch: &mut [u64], mut report: impl FnMut(Violation)) -> usize {
    let mut found = 0;
    let mut say = |v| {
        found += 1;
        report(v);
    };
    let (res, t) = (state.resources, state.table);
    if let Err(e) = plate_check::check_entries(t, FRAMES_BASE, state.frames, scratch) {
        say(Violation::Entry(e));
        return found;
    }
    // Owners: the save areas (of plates and pending deletions, which the entries' check
    // found disjoint and inside), then the real memories. (The plates' regions are inside
    // real memories, not owners of their own.)
    let words = state.frames.div_ceil(64) as usize;
    scratch[..words].fill(0);
    let areas = t.plates().iter().filter(|p| p.kind != PlateKind::Fixed as u32).map(|p| (p.area, p.pages));
    for (area, pages) in areas.chain(t.pending().iter().map(|p| (p.area, p.pages))) {
        for a in area {
            mark_frames(scratch, (a - FRAMES_BASE) / PAGE_SIZE, pages);
        }
    }
    let end = FRAMES_BASE + state.frames * PAGE_SIZE;
    let mut shared = 0;
    for (id, real) in res.real.iter() {
        let inside = real.base >= FRAMES_BASE
            && real.base.is_multiple_of(PAGE_SIZE)
            && real.pages.checked_mul(PAGE_SIZE).and_then(|l| real.base.checked_add(l)).is_some_and(|e| e <= end);
        if !inside {
            say(Violation::RealOutside { id });
            continue;
        }
        let first = (real.base - FRAMES_BASE) / PAGE_SIZE;
        for f in first..first + real.pages {
            if !mark_frames(scratch, f, 1) && shared < 4 {
                shared += 1;
                say(Violation::SharedFrame { frame: FRAMES_BASE + f * PAGE_SIZE });
            }
        }
    }
    let (mut free, mut leaked) = (0, 0);
    for w in 0..state.frames.div_ceil(64) as usize {
        let owned = scratch.get(w).copied().unwrap_or(0);
        let marked = state.bitmap.get(w).copied().unwrap_or(0);
        let valid = if (w as u64 + 1) * 64 <= state.frames { u64::MAX } else { (1u64 << (state.frames % 64)) - 1 };
        for (bits, count, make) in [
            (owned & !marked & valid, &mut free, (|frame| Violation::OwnedButFree { frame }) as fn(u64) -> Violation),
            (marked & !owned & valid, &mut leaked, |frame| Violation::Leaked { frame }),
        ] {
            if bits != 0 && *count < 4 {
                *count += 1;
                say(make(FRAMES_BASE + (w as u64 * 64 + u64::from(bits.trailing_zeros())) * PAGE_SIZE));
            }
        }
    }
    // Plates against the resources.
    for (i, p) in t.plates().iter().enumerate() {
        let place = match PlateKind::try_from(p.kind) {
            Ok(PlateKind::Fixed) | Err(_) => continue,
            Ok(PlateKind::KernelSpace) => {
                res.kernel_spaces.get(p.id).map(|k| (k.vaddr, res.regions.get(k.region).map_or(0, |r| r.pages)))
            }
            Ok(PlateKind::PageTables) => res.spaces.get(p.id).map(|s| (s.root, TABLE_POOL_PAGES)),
            Ok(PlateKind::UserSpace) => res.user_spaces.get(p.id).map(|u| {
                let base = res.regions.get(u.region).and_then(|r| res.real.get(r.real)).map_or(0, |r| r.base);
                (base, u.pages)
            }),
        };
        match place {
            None => say(Violation::NoResource { plate: i }),
            Some(place) if place != (p.src, p.pages) => say(Violation::WrongPlace { plate: i }),
            Some(_) => {}
        }
    }
    // Each plate's bit is set; and as many bits as plates, else the bits without a plate.
    for p in t.plates() {
        if PlateKind::try_from(p.kind).is_ok_and(|k| !t.is_plated(k, p.id)) {
            say(Violation::PlatedBits { kind: p.kind, id: p.id });
        }
    }
    let bits: usize = t.plated.iter().flatten().map(|w| w.count_ones() as usize).sum();
    if bits != t.plates().len() {
        for kind in [PlateKind::Fixed, PlateKind::KernelSpace, PlateKind::PageTables, PlateKind::UserSpace] {
            for id in (0..MAX_IDS as u32).filter(|&id| t.is_plated(kind, id)) {
                if !t.plates().iter().any(|p| p.kind == kind as u32 && p.id == id) {
                    say(Violation::PlatedBits { kind: kind as u32, id });
                }
            }
        }
    }
    if state.committed {
        let kinds = [
            (PlateKind::KernelSpace, &mut res.kernel_spaces.iter().map(|(id, _)| id) as &mut dyn Iterator<Item = u32>),
            (PlateKind::PageTables, &mut res.spaces.iter().map(|(id, _)| id)),
            (PlateKind::UserSpace, &mut res.user_spaces.iter().map(|(id, _)| id)),
        ];
        for (kind, ids) in kinds {
            for id in ids {
                if !t.is_plated(kind, id) {
                    say(Violation::Unplated { kind: kind as u32, id });
                }
            }
        }
    }
    found
}

/// Why an image could not be checked at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unchecked {
    #[error("the root header does not check out (`vmm inspect` says why)")]
    Header,
    #[error("the image is shorter than its root header says, or its bytes are not 8-byte aligned")]
    Bytes,
    #[error("the image has no live plate table (plate=off): nothing to check it against")]
    NoPlateTable,
    #[error("the scratch bitmap is too small")]
    Scratch,
}

/// Checks a whole image (`bytes`: guest RAM from address 0, 8-byte aligned): the root
/// header against the committed slot, the slot's entries and save areas, then the state a
/// boot would run on (see the module's docs), calling `report` with each violation. Returns
/// how many were found. `scratch`: at least the managed frames' `div_ceil(64)` words.
pub fn check_image(bytes: &[u8], scratch: &mut [u64], mut report: impl FnMut(Violation)) -> Result<usize, Unchecked> {
    use zerocopy::FromBytes;
    let at = |addr: u64, len: u64| bytes.get(addr as usize..addr.checked_add(len)? as usize);
    let header_at = |addr| at(addr, crate::header::HEADER_SIZE as u64).and_then(|b| b.try_into().ok());
    let (first, second) =
        (header_at(layout::ROOT_HEADER).ok_or(Unchecked::Bytes)?, header_at(layout::ROOT_HEADER_COPY));
    let first = RootHeader::from_bytes(first);
    let second = second.map(RootHeader::from_bytes).unwrap_or_default();
    let (header, _, _) = crate::header::choose(&first, &second).map_err(|_| Unchecked::Header)?;
    let frames = header.frames;
    if scratch.len() < frames.div_ceil(64) as usize {
        return Err(Unchecked::Scratch);
    }
    let table_at = |addr| at(addr, TABLE_SIZE as u64).and_then(|b| PlateTable::ref_from_bytes(b).ok());
    let resources_at = |addr| at(addr, size_of::<Resources>() as u64).and_then(|b| Resources::ref_from_bytes(b).ok());
    let bitmap_at = |addr| at(addr, frames.div_ceil(64) * 8).and_then(|b| <[u64]>::ref_from_bytes(b).ok());
    let found = core::cell::Cell::new(0);
    let mut say = |v| {
        found.set(found.get() + 1);
        report(v);
    };
    let normal = header.shutdown_flag == ShutdownFlag::Normal as u32;
    let (resources, bitmap, table, committed) = if normal {
        let live = table_at(layout::PLATE_LIVE).ok_or(Unchecked::Bytes)?;
        if live.check_header().is_err() {
            return Err(Unchecked::NoPlateTable);
        }
        (resources_at(layout::RESOURCES), bitmap_at(layout::FRAME_BITMAP), live, false)
    } else {
        let slots = [table_at(layout::PLATE_SLOTS[0]), table_at(layout::PLATE_SLOTS[1])];
        let [Some(a), Some(b)] = slots else { return Err(Unchecked::Bytes) };
        let verify = |t: &PlateTable| plate_check::verify_areas(t, at);
        let choice = plate_check::choose([a, b], FRAMES_BASE, frames, scratch, Some(verify));
        for r in choice.rejected.iter().flatten() {
            match *r {
                Rejection::Entry(e) => say(Violation::Entry(e)),
                Rejection::Content(plate) => say(Violation::Content { plate }),
                // Not from NVM: no request reads an image's save areas.
                Rejection::Table(_) | Rejection::Unreadable => {}
            }
        }
        let Some(i) = choice.index else {
            if header.generation != 0 {
                say(Violation::NoCommit { header: header.generation });
            }
            return Ok(found.get());
        };
        let generation = choice.generations[i];
        if generation < header.generation {
            say(Violation::Generation { header: header.generation, committed: generation });
        }
        let t = [a, b][i];
        // The state a restore brings back: the fixed plates' valid areas.
        let fixed = |id| {
            t.plates()
                .iter()
                .find(|p| p.kind == PlateKind::Fixed as u32 && p.id == id && p.valid != 0)
                .map(|p| p.area[(p.valid - 1) as usize & 1])
        };
        (fixed(FIXED_RESOURCES).and_then(resources_at), fixed(FIXED_FRAME_BITMAP).and_then(bitmap_at), t, true)
    };
    let (Some(resources), Some(bitmap)) = (resources, bitmap) else { return Err(Unchecked::Bytes) };
    let state = State { resources, bitmap, table, frames, committed };
    check_state(&state, scratch, &mut say);
    Ok(found.get())
}

#[cfg(test)]
mod tests;
