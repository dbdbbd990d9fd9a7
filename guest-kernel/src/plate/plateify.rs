//! Plate-ification (a plate for every resource that has none) and deferred deletion: the
//! plate function's replacement delete operations, installed in the resource types'
//! operation tables (Tender's table-program structure).

use kernel_core::frames::FrameBitmap;
use kernel_core::plates;
use nvram::layout;
use nvram::plate::{PendingFull, Plate, PlateKind, Removed, FIXED_FRAME_BITMAP, FIXED_RESOURCES};
use nvram::resources::{Resources, TABLE_POOL_PAGES};

use super::state::{Plating, Store, WriteOutError, PAGE};
use crate::nvm::resources::{self, Mem, ResError, OPS};
use crate::println;

/// Marks every page of a new plate stale: its areas hold nothing yet (64 pages a step).
fn mark_stale(plating: &mut Plating, plate: &Plate) {
    let first = plating.stale_index(plate);
    let mut done = 0;
    while done < plate.pages {
        let n = (plate.pages - done).min(64);
        plates::set_bits_at(plating.stale, first + done, n, u64::MAX);
        done += n;
    }
}

/// Adds a fixed plate (its areas are fixed, nothing to allocate) to the live table.
fn enlist(plating: &mut Plating, plate: Plate) -> Result<(), WriteOutError> {
    plating.live.add(plate).ok_or(WriteOutError::NoRoom)?;
    mark_stale(plating, &plate);
    Ok(())
}

/// Gives a plate (two save areas) to every resource that has none: the paper's
/// plate-ification, at each write-out for the spaces made since the last.
pub(super) fn plateify(
    plating: &mut Plating,
    res: &Resources,
    frames: &mut FrameBitmap<'static>,
) -> Result<(), WriteOutError> {
    // The table holds a plate for every resource that can exist (`nvram::plate::MAX_PLATES`);
    // a refusal (no frames) leaves frames and table as they were (`plates::make_plate`).
    // The areas come from the frames, or from the disk's area space with `plate_store=disk`
    // (they take no frame of RAM then: the frame bitmap restored says so).
    let add = |plating: &mut Plating, frames: &mut FrameBitmap<'static>, kind: PlateKind, id, src, pages| {
        let areas = super::area_allocator(&mut plating.store, frames);
        let plate = plates::make_plate(plating.live, areas, kind, id, src, pages)
            .map_err(|plates::NoRoom| WriteOutError::NoRoom)?;
        mark_stale(plating, &plate);
        Ok::<(), WriteOutError>(())
    };
    if !plating.live.is_plated(PlateKind::Fixed, FIXED_RESOURCES) {
        let pages = (core::mem::size_of::<Resources>() as u64).div_ceil(PAGE);
        let bitmap_pages = (kernel_core::frames::words_for(plating.frames) as u64 * 8).div_ceil(PAGE);
        // The roots of a restore, at fixed places: in NVM, or on the disk.
        let (resources_save, bitmap_save) = match &plating.store {
            Store::Nvm => (layout::RESOURCES_SAVE, layout::FRAME_BITMAP_SAVE),
            Store::Disk(d) => (d.sb.resources_save, d.sb.bitmap_save),
        };
        for (id, src, pages, area) in [
            (FIXED_RESOURCES, layout::RESOURCES, pages, resources_save),
            (FIXED_FRAME_BITMAP, layout::FRAME_BITMAP, bitmap_pages, bitmap_save),
        ] {
            enlist(plating, Plate::new(PlateKind::Fixed, id, src, pages, area))?;
        }
    }
    // Only the resources without a plate, found a bitmap word at a time (against a copy of
    // the plated bits: adding a plate sets them).
    let plated = plating.live.plated[PlateKind::KernelSpace as usize];
    for id in res.kernel_spaces.ids_except(&plated) {
        let Some(space) = res.kernel_spaces.get(id) else { continue };
        let pages = res.regions.get(space.region).map_or(0, |r| r.pages);
        add(plating, frames, PlateKind::KernelSpace, id, space.vaddr, pages)?;
    }
    let plated = plating.live.plated[PlateKind::PageTables as usize];
    for id in res.spaces.ids_except(&plated) {
        let Some(space) = res.spaces.get(id) else { continue };
        add(plating, frames, PlateKind::PageTables, id, space.root, TABLE_POOL_PAGES)?;
    }
    let plated = plating.live.plated[PlateKind::UserSpace as usize];
    for id in res.user_spaces.ids_except(&plated) {
        let Some(user) = res.user_spaces.get(id) else { continue };
        let src = res.regions.get(user.region).and_then(|r| res.real.get(r.real)).map_or(0, |r| r.base);
        add(plating, frames, PlateKind::UserSpace, id, src, user.pages)?;
    }
    Ok(())
}

/// Deletion with the plate function: the resource goes at once; the save areas of a plate
/// a write-out committed wait in the deletion-pending list for the next commit (they may
/// hold the only copy a crash before then would restore), those of a plate made since the
/// last commit (in no committed table) are freed now. Either way the plate leaves the live
/// table, so a new resource given the same id gets a plate of its own.
///
/// The pending list cannot be full (`nvram::plate::MAX_PENDING`: one entry per committed
/// plate); it is checked before anything is deleted all the same, and a full list refuses
/// the deletion (the process's `unmap` fails) rather than leave a stale plate live.
fn defer(
    m: &mut Mem<'_>,
    kind: PlateKind,
    id: u32,
    delete_now: fn(&mut Mem<'_>, u32) -> Result<(), ResError>,
) -> Result<(), ResError> {
    if m.plates.as_deref().is_some_and(|live| !live.removal_fits(kind, id)) {
        println!("plate: deletion-pending list full: the deletion of {kind:?} {id} is refused");
        return Err(ResError::Exhausted);
    }
    delete_now(m, id)?;
    let Some(live) = m.plates.as_deref_mut() else { return Ok(()) };
    match live.remove(kind, id) {
        Ok(Removed::FreeNow(areas)) => plates::free_pending(&[areas], m.areas.as_deref_mut().unwrap_or(m.frames)),
        Ok(Removed::Pending | Removed::NoPlate) => {}
        // Ruled out by `removal_fits` above.
        Err(PendingFull) => println!("plate: deletion-pending list full after {kind:?} {id} was deleted"),
    }
    Ok(())
}

fn user_space_delete(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    defer(m, PlateKind::UserSpace, id, resources::user_space_delete_now)
}

fn space_delete(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    defer(m, PlateKind::PageTables, id, resources::space_delete_now)
}

fn kernel_space_delete(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    defer(m, PlateKind::KernelSpace, id, resources::kernel_space_delete_now)
}

/// Replaces the delete operations of the space types (Tender's table-program structure).
pub(super) fn install_ops() {
    let mut ops = OPS.write();
    ops.user_space.delete = user_space_delete;
    ops.space.delete = space_delete;
    ops.kernel_space.delete = kernel_space_delete;
}
