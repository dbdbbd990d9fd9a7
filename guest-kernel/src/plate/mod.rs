//! The plate function for NVM: plate-ification, write-out (checkpoint), deferred deletion,
//! and restore after a crash. The on-NVM structures and the commit protocol are
//! `kernel_core::plates` (tested on the host by crashing after every store); this module
//! finds what changed, and drives them over identity-mapped physical memory.
//!
//! Plates, in restore order: the resource tables and the frame bitmap (fixed save areas at
//! fixed addresses, `nvram::layout`), virtual kernel spaces, each virtual space's page-table
//! pool, virtual user spaces. Dirty pages of user spaces come from the page tables' dirty
//! bits; the other plates are small and copied whole (the page-table pool up to what is in
//! use).
//!
//! This layer sits above `nvm` and below the processes: it works on the tables it is
//! handed (resources, frames, root header), and the caller saves the interrupted process
//! (see [`write_out`]'s `save`).

mod copy;
mod dirty;
pub mod disk;
pub mod lazy;
pub mod plant;
mod plateify;
mod state;

use kernel_core::frames::FrameBitmap;
use kernel_core::plates;
pub(crate) use nvram::control::IO_PHASE;
use nvram::control::{Metrics, Operation};
use nvram::header::RootHeader;
use nvram::layout;
use nvram::plate::{Plate, PlateKind, PlateTable};
use nvram::resources::{Resources, TABLE_POOL_PAGES};

use crate::arch::{paging, ring3, timer};
use crate::dev::{control, engine, persist};
use crate::nvm::root;
use crate::println;
use copy::GuestPersist;
use plateify::{install_ops, plateify};
pub use state::{Areas, DiskStore, Plating, Store, WriteOutError};
use state::{FIXED_PAGES_MAX, PAGE};

/// Whether the copiers compute the save areas' content sums (`sums=off` on the command line
/// turns them off: a write-out then leaves its areas' sums unknown, and a restore does not
/// check those areas' bytes; the way to measure what the sums cost, in one build).
static SUMS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(true);

/// Turns the content sums on or off (`sums=on|off`), before the first write-out or restore.
pub fn set_sums(on: bool) {
    SUMS.store(on, core::sync::atomic::Ordering::Relaxed);
}

/// Whether the copiers sum (and the restore checks what they summed), where they can.
fn sums_on() -> bool {
    SUMS.load(core::sync::atomic::Ordering::Relaxed)
}

/// `checkpoint()`'s result in the running process, and in the one restored from it.
pub use nvram::abi::{RESTORED, SAVED};

/// The allocator of save areas: the frames, or the disk's area space.
fn area_allocator<'a>(store: &'a mut Store, frames: &'a mut FrameBitmap<'static>) -> &'a mut FrameBitmap<'static> {
    match store {
        Store::Disk(d) => &mut d.areas,
        Store::Nvm => frames,
    }
}

/// Enables the plate function on a freshly formatted image (or, with the areas on the
/// disk, a blank plate store): an empty plate table, no commit, every save area stale; and
/// the deletion of spaces replaced by one that defers the freeing of their save areas.
pub fn format(mut areas: Areas, store: Store) -> Plating {
    areas.live.format();
    for slot in &mut areas.slots {
        slot.magic = 0;
    }
    // At CPL 3: the bitmap grows with RAM, and kernel mode is slow under PVM.
    let stale = &mut *areas.stale;
    ring3::run(|| stale.fill(u64::MAX));
    persist::persist(layout::PLATE_LIVE, PAGE);
    persist::persist(layout::PLATE_SLOTS[0], 64);
    persist::persist(layout::PLATE_SLOTS[1], 64);
    install_ops();
    areas.into_plating(None, store)
}

/// With `plate=off`: makes the live table and both commit slots unusable, durably, so that
/// no later boot with the plate function on restores (after a crash) or resumes (after a
/// shutdown) a generation this run invalidates: a format hands every frame out again, save
/// areas included, and a run without plates deletes resources and makes new ones that no
/// plate follows. `frames`: the frame bitmap when it is the one the live table was kept
/// with (a resumed image), whose save areas are then freed; after a format there is nothing
/// to free.
pub fn forget(areas: Areas, frames: Option<&mut FrameBitmap>) {
    let live_whole = areas.live.check_header().is_ok();
    let committed = areas.committed().is_some();
    if !live_whole && !committed {
        return;
    }
    let mut freed = 0;
    if let (true, Some(frames)) = (live_whole, frames) {
        for p in areas.live.plates().iter().filter(|p| p.kind != PlateKind::Fixed as u32) {
            plates::free_pending(&[nvram::plate::Pending { area: p.area, pages: p.pages }], frames);
            freed += 1;
        }
        plates::free_pending(areas.live.pending(), frames);
        freed += areas.live.pending().len();
    }
    areas.live.magic = 0;
    persist::flush(layout::PLATE_LIVE, 8);
    for (slot, at) in areas.slots.into_iter().zip(layout::PLATE_SLOTS) {
        slot.magic = 0;
        persist::flush(at, 8);
    }
    persist::fence();
    println!("plate: off: the plate table and its commits are forgotten ({freed} plates' save areas freed)");
}

/// After a graceful shutdown: everything is as it was, the live table included; only which
/// pages changed since the last write-out is not known any more. Hands the areas back if
/// the live table is not whole.
pub fn resume(areas: Areas) -> Result<Plating, Areas> {
    if areas.live.check_header().is_err() {
        return Err(areas);
    }
    // Pages written after the last write-out, before the shutdown, are in no dirty log this
    // VMM keeps: the next write-out copies every page. (At CPL 3, as in `format`.)
    let stale = &mut *areas.stale;
    ring3::run(|| stale.fill(u64::MAX));
    let committed = areas.committed().map(|i| (i, areas.slots[i].generation));
    install_ops();
    Ok(areas.into_plating(committed, Store::Nvm))
}

/// After a crash, which slot to restore from (`kernel_core::plates::choose`): the newest
/// whose table checks out, whose entries fit the layout and whose valid save areas hold
/// what was written there. Runs at CPL 3 when it can (it reads every valid save area).
pub fn choose(areas: &mut Areas) -> plates::Choice {
    let frames = areas.frames;
    let Areas { slots, dirty, .. } = areas;
    ring3::run(|| {
        let choice =
            plates::choose([&*slots[0], &*slots[1]], layout::FRAMES_BASE, frames, dirty, &mut GuestPersist::default());
        // The dirty bitmap was the check's scratch: a write-out expects it clear. Here, at
        // CPL 3: the bitmap grows with RAM (8 KiB a 256 MiB), and clearing it in kernel mode
        // took milliseconds under PVM.
        dirty.fill(0);
        choice
    })
}

/// After a crash: copies every plate's committed area back (the tables first, so that the
/// kernel's state is the checkpoint's), frees the save areas pending deletion, and makes the
/// committed table the live one again. Returns the plate function's state and the metrics.
/// `index`: the slot [`choose`] chose; `rolled_back`: the generations it went back behind
/// the root header's (reported in the metrics). `lazy` (`restore=lazy`): the user spaces'
/// pages stay in their save areas, their 2 MiB left away in the page tables, until they come
/// back at first touch ([`lazy`]); `res` is the resource table the kernel's plates restore,
/// whose spaces that marks (read only after the kernel's plates are back).
pub fn restore(areas: Areas, index: usize, rolled_back: u32, res: &Resources, lazy: bool) -> (Plating, Metrics) {
    let start = timer::rdtsc();
    let (plating, mut m) = ring3::run(|| {
        let committed: &PlateTable = areas.slots[index];
        let mut nvm = GuestPersist::default();
        let mut tail = lazy::Tail::new(start, committed.generation);
        let table = nvm.table_copies(areas.live, committed);
        let also = table.as_ref().map_or(&[][..], |t| &t[..]);
        let pages = plates::restore(committed, &mut nvm, also, |p| lazy && lazy::leave(&mut tail, committed, res, p));
        if table.is_none() {
            areas.live.copy_from(committed);
        }
        // The restored areas equal their regions; the other areas are behind in unknown pages.
        // After a lazy restore, at its end (`lazy`): needed only by the next write-out, which
        // that end precedes, and the bitmap's first touch in the work space costs faults of
        // the hypervisor's shadow paging under PVM.
        if !tail.pending() {
            areas.stale.fill(u64::MAX);
        }
        let mut m = Metrics::new(Operation::Restore);
        m.copier = nvm.copier() as u32;
        m.plates = committed.count;
        m.rolled_back = rolled_back;
        m.generation = committed.generation;
        m.plated_bytes = committed.plates().iter().map(|p| p.pages * PAGE).sum();
        m.copied_bytes = pages * PAGE;
        m.phases[2] = nvm.copy_ticks;
        m.phases[4] = nvm.flush_ticks;
        let generation = committed.generation;
        let mut plating = areas.into_plating(Some((index, generation)), Store::Nvm);
        plating.tail = tail.pending().then_some(tail);
        (plating, m)
    });
    install_ops();
    m.total = timer::rdtsc() - start;
    // Said after the restore's time is taken: a print is a trip to the VMM.
    if let Some(tail) = &plating.tail {
        println!(
            "plate: lazy restore: {} KiB of user spaces left in their save areas until touched",
            (tail.pages() * PAGE) >> 10
        );
    }
    (plating, m)
}

/// `check=on`: checks the state a restore brought back (`nvram::fsck`, the code of `vmm
/// inspect --check`) before the kernel runs on it, printing each violation; returns how
/// many. At CPL 3 when it can (it walks every table).
pub fn check_restored(plating: &mut Plating, res: &Resources, frames: &FrameBitmap) -> usize {
    let state = nvram::fsck::State {
        resources: res,
        bitmap: frames.words(),
        table: plating.live,
        frames: plating.frames,
        committed: true,
    };
    let dirty: &mut [u64] = plating.dirty;
    let found = ring3::run(|| {
        let found = nvram::fsck::check_state(&state, dirty, |v| crate::println!("NVM: check: VIOLATION: {v}"));
        // The dirty bitmap was the check's scratch: a write-out expects it clear.
        dirty.fill(0);
        found
    });
    if found == 0 {
        crate::println!("NVM: check: the restored state is consistent");
    }
    found
}

/// Frees the save areas the committed table left pending (after a restore, once the kernel
/// state with the restored frame bitmap is installed).
pub fn free_pending_after_restore(plating: &mut Plating, frames: &mut FrameBitmap<'static>) {
    plates::free_pending(plating.live.pending(), area_allocator(&mut plating.store, frames));
    plating.live.pending_count = 0;
}

/// A write-out: occupies the system (the caller runs with interrupts off, on the one CPU),
/// saves the interrupted process (`save`: the caller's, since processes are above this
/// layer; it must leave every process's registers in the process table, which is plated),
/// plate-ifies new spaces, copies what changed into the inactive save areas, commits by
/// writing the plate table last, and frees the save areas pending deletion. `resume_first`:
/// the process a restore of this write-out runs first (recorded in the committed table).
pub fn write_out(
    plating: &mut Plating,
    res: &Resources,
    frames: &mut FrameBitmap<'static>,
    header: &mut RootHeader,
    resume_first: Option<u32>,
    save: impl FnOnce(),
) -> Result<Metrics, WriteOutError> {
    // The write-out copies from the regions, and commits the page tables: a lazy restore's
    // pages must all be back first.
    lazy::finish(plating, res);
    let t0 = timer::rdtsc();
    plating.live.resume_first = resume_first.map_or(0, |pid| pid + 1);
    let next = plating.committed.map_or(1, |(_, g)| g + 1);
    // In kernel mode: from the work, the doorbell would trap there and back, which costs more.
    control::started(nvram::control::Started::new(next, control::take_cause()));
    // 2 to 11 at CPL 3 (see `ring3`): natively under PVM, where saving the process's
    // registers in kernel mode alone took some 40 µs (a copy is emulated there).
    let m = ring3::run(|| {
        // 2. The process table holds every process's registers; the running one's are saved.
        save();
        // 3 to 11, the bookkeeping.
        steps(plating, res, frames, header, t0)
    });
    if let Err(WriteOutError::Disk(e)) = m {
        crate::println!("plate: the write-out failed, nothing was committed: {e}");
    }
    let mut m = m?;
    // The way back from CPL 3 counts in the "free" phase.
    let end = timer::rdtsc();
    m.phases[5] += end - (t0 + m.total);
    m.total = end - t0;
    control::metrics(&m);
    Ok(m)
}

/// Gives a plate (two save areas) to every resource that has none, now rather than at the
/// next write-out: `map` calls it for the region it just made, so that a process that runs
/// out of frames gets a refused `map`, not a kernel whose write-outs fail for want of save
/// areas (and a machine that stops checkpointing). A refusal leaves frames and table as
/// they were.
pub fn plate_now(
    plating: &mut Plating,
    res: &Resources,
    frames: &mut FrameBitmap<'static>,
) -> Result<(), WriteOutError> {
    plateify(plating, res, frames)
}

/// Steps 3 to 11 of a write-out (see [`write_out`]), timed from `t0`.
fn steps(
    plating: &mut Plating,
    res: &Resources,
    frame_bitmap: &mut FrameBitmap<'static>,
    header: &mut RootHeader,
    t0: u64,
) -> Result<Metrics, WriteOutError> {
    // 3. Plate-ify what has no plate yet.
    plateify(plating, res, frame_bitmap)?;
    let t1 = timer::rdtsc();
    // Find the dirty pages of user spaces (and clear the page tables' dirty bits).
    // Walk the page tables' dirty bits of each user space: at CPL 3 that is native and
    // takes tens of microseconds for the paper's 450 spaces. In (emulated) kernel mode,
    // the copy engine hands over KVM's log of the pages the CPU wrote instead, for all
    // frames at once, if there is an engine.
    let at_cpl3 = ring3::in_user_mode();
    let logged = !at_cpl3 && engine::dirty_log(layout::FRAMES_BASE / PAGE, plating.frames, layout::PLATE_DIRTY);
    // Hot pages keep their dirty bits but at every so many write-outs (`kernel_core::dirty`).
    let rearm_all = kernel_core::dirty::rearms_all(plating.committed.map_or(1, |(_, g)| g + 1));
    for plate in plating.live.plates().iter().filter(|_| !logged) {
        if plate.kind != PlateKind::UserSpace as u32 {
            continue;
        }
        let Some(user) = res.user_spaces.get(plate.id) else { continue };
        let Some(space) = res.spaces.get(user.space) else { continue };
        let base = (plate.src - layout::FRAMES_BASE) / PAGE;
        dirty::collect_into(space.root, user.vaddr, user.pages, plating.dirty, base, rearm_all);
    }
    // The cleared dirty bits must reach the TLB. At CPL 3 there is nothing to do: the
    // switch back to the kernel's address space flushes the TLB (no page is global and
    // every CR3 load flushes: CR4.PGE is off, and no PCID is kept).
    if !at_cpl3 {
        paging::flush_tlb();
    }
    let t2 = timer::rdtsc();

    // 4-10. Copy, make durable, commit.
    let (generation, slot_index) = match plating.committed {
        Some((slot, generation)) => (generation, 1 - slot),
        None => (0, 0),
    };
    let (stats, timing) = if plating.on_disk() {
        let mut disk = disk::GuestDisk::new();
        let mut p = disk::persist(&mut disk);
        let stats = commit(plating, res, generation, slot_index, &mut p);
        if let Some(e) = p.error {
            return Err(WriteOutError::Disk(e));
        }
        (stats, Timing { io: disk.io_ticks, copier: nvram::control::Copier::Disk, ..Timing::default() })
    } else {
        let mut nvm = GuestPersist::for_write_out();
        let stats = commit(plating, res, generation, slot_index, &mut nvm);
        let copier = nvm.copier();
        (stats, Timing { copy: nvm.copy_ticks, flush: nvm.flush_ticks, commit: nvm.slot_ticks, io: 0, copier })
    };
    plating.committed = Some((slot_index, generation + 1));
    let t3 = timer::rdtsc();

    // 11. Free the save areas of deleted spaces, now that no committed table needs them.
    let areas = area_allocator(&mut plating.store, frame_bitmap);
    plates::free_pending(plating.live.pending(), areas);
    plating.live.pending_count = 0;
    if !logged {
        // The engine rewrites the whole bitmap at each request; the walk only sets bits.
        dirty::clear(plating);
    }
    header.generation = generation + 1;
    // With the areas on the disk, the slot's RAM address holds no copy of the commit.
    header.plate_table = if plating.on_disk() { 0 } else { layout::PLATE_SLOTS[slot_index] };
    header.seal();
    root::store_header(header);
    let t4 = timer::rdtsc();

    let mut m = Metrics::new(Operation::WriteOut);
    m.copier = timing.copier as u32;
    m.plates = stats.plates as u32;
    m.generation = generation + 1;
    m.plated_bytes = stats.plated_pages * PAGE;
    m.copied_bytes = stats.copied_pages * PAGE;
    let Timing { copy, flush, commit: slot, io, .. } = timing;
    let rest = (t3 - t2).saturating_sub(slot + copy + flush + io);
    m.phases = [t1 - t0, (t2 - t1) + rest, copy, slot, flush, t4 - t3, io];
    m.total = t4 - t0;
    Ok(m)
}

/// Where a write-out's commit spent its time, by phase (TSC ticks), and who copied.
#[derive(Default)]
struct Timing {
    copy: u64,
    flush: u64,
    commit: u64,
    /// In disk requests (`plate_store=disk`): the copies, the slot and the flushes, all of
    /// them storage I/O there.
    io: u64,
    copier: nvram::control::Copier,
}

/// Steps 4 to 10 of a write-out over `nvm` (NVM, or the disk): copies what changed of
/// every plate into its inactive area, makes it durable, commits the live table into slot
/// `slot_index` (generation `generation + 1`).
fn commit<P: plates::Persist>(
    plating: &mut Plating,
    res: &Resources,
    generation: u64,
    slot_index: usize,
    nvm: &mut P,
) -> plates::WriteOutStats {
    let pool_used = |k_res: &Resources, plate: &Plate| {
        k_res.spaces.get(plate.id).map_or(TABLE_POOL_PAGES, |s| u64::from(s.pool_used))
    };
    let frames = plating.frames;
    let Plating { live, stale, dirty, .. } = &mut *plating;
    let dirty_bits: &[u64] = dirty;
    plates::write_out(
        live,
        generation,
        slot_index,
        stale,
        |p| match PlateKind::try_from(p.kind).ok() {
            Some(PlateKind::Fixed) => frames + u64::from(p.id) * FIXED_PAGES_MAX,
            _ => (p.src - layout::FRAMES_BASE) / PAGE,
        },
        |p, first, n| match PlateKind::try_from(p.kind).ok() {
            Some(PlateKind::UserSpace) => plates::bits_at(dirty_bits, (p.src - layout::FRAMES_BASE) / PAGE + first, n),
            Some(PlateKind::PageTables) => {
                let used = pool_used(res, p).saturating_sub(first).min(64);
                if used == 64 {
                    u64::MAX
                } else {
                    (1 << used) - 1
                }
            }
            _ => u64::MAX,
        },
        nvm,
    )
}
