//! Plate-ification (a plate for every resource that has none) and deferred deletion: the
//! plate function's replacement delete operations, installed in the resource types'
//! operation tables (Tender's table-program structure).

use kernel_core::frames::FrameBitmap;
use kernel_core::plates;
use nvram::layout;
use nvram::plate::{Plate, PlateKind, FIXED_FRAME_BITMAP, FIXED_RESOURCES};
use nvram::resources::{Resources, TABLE_POOL_PAGES};

use super::state::{Plating, WriteOutError, PAGE};
use crate::nvm::resources::{self, Mem, ResError, OPS};
use crate::println;

/// Adds `plate` to the live table. Its areas hold nothing yet: every page is stale (marked
/// 64 pages a step).
fn enlist(plating: &mut Plating, plate: Plate) -> Result<(), WriteOutError> {
    let first = plating.stale_index(&plate);
    let mut done = 0;
    while done < plate.pages {
        let n = (plate.pages - done).min(64);
        plates::set_bits_at(plating.stale, first + done, n, u64::MAX);
        done += n;
    }
    plating.live.add(plate).map(|_| ()).ok_or(WriteOutError::NoRoom)
}

/// Gives a plate (two save areas) to every resource that has none: the paper's
/// plate-ification, at each write-out for the spaces made since the last.
pub(super) fn plateify(plating: &mut Plating, res: &Resources, frames: &mut FrameBitmap) -> Result<(), WriteOutError> {
    let add = |plating: &mut Plating, frames: &mut FrameBitmap, kind: PlateKind, id, src, pages| {
        let a = frames.alloc(pages).map_err(|_| WriteOutError::NoRoom)?;
        let b = match frames.alloc(pages) {
            Ok(b) => b,
            Err(_) => {
                let _ = frames.free(a, pages);
                return Err(WriteOutError::NoRoom);
            }
        };
        enlist(plating, Plate { kind: kind as u32, id, src, pages, area: [a, b], valid: 0, summed: 0, sum: [0; 2] })
    };
    if !plating.live.is_plated(PlateKind::Fixed, FIXED_RESOURCES) {
        let pages = (core::mem::size_of::<Resources>() as u64).div_ceil(PAGE);
        let bitmap_pages = (kernel_core::frames::words_for(plating.frames) as u64 * 8).div_ceil(PAGE);
        for (id, src, pages, area) in [
            (FIXED_RESOURCES, layout::RESOURCES, pages, layout::RESOURCES_SAVE),
            (FIXED_FRAME_BITMAP, layout::FRAME_BITMAP, bitmap_pages, layout::FRAME_BITMAP_SAVE),
        ] {
            enlist(
                plating,
                Plate { kind: PlateKind::Fixed as u32, id, src, pages, area, valid: 0, summed: 0, sum: [0; 2] },
            )?;
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

/// Deletion with the plate function: the resource goes at once, its save areas wait in the
/// deletion-pending list for the next commit (they may hold the only copy a crash before
/// then would restore).
fn defer(m: &mut Mem<'_>, kind: PlateKind, id: u32) {
    if let Some(live) = m.plates.as_deref_mut() {
        if live.remove(kind, id).is_err() {
            println!("plate: deletion-pending list full: the save areas of {kind:?} {id} are leaked");
        }
    }
}

fn user_space_delete(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    resources::user_space_delete_now(m, id)?;
    defer(m, PlateKind::UserSpace, id);
    Ok(())
}

fn space_delete(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    resources::space_delete_now(m, id)?;
    defer(m, PlateKind::PageTables, id);
    Ok(())
}

fn kernel_space_delete(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    resources::kernel_space_delete_now(m, id)?;
    defer(m, PlateKind::KernelSpace, id);
    Ok(())
}

/// Replaces the delete operations of the space types (Tender's table-program structure).
pub(super) fn install_ops() {
    let mut ops = OPS.write();
    ops.user_space.delete = user_space_delete;
    ops.space.delete = space_delete;
    ops.kernel_space.delete = kernel_space_delete;
}
