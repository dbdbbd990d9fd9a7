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

use kernel_core::plates::{
    self, CopyRange, Persist, Plate, PlateKind, PlateTable, FIXED_FRAME_BITMAP, FIXED_RESOURCES,
};
use kernel_core::resources::{Resources, TABLE_POOL_PAGES};
use nvram::control::{Copier, Metrics, Operation};
use nvram::layout;

use crate::interrupts::TrapFrame;
use crate::kernel::Kernel;
use crate::resources::{self, ResError, OPS};
use crate::{control, paging, persist, println, process, ring3, timer};

// The pool of page tables is plated whole at creation; only its used part is copied.
const _: () = assert!(TABLE_POOL_PAGES <= 64);

const PAGE: u64 = 4096;

/// The plate function's state for this boot.
pub struct Plating {
    pub live: &'static mut PlateTable,
    /// The committed slot and its generation (`None`: nothing committed yet).
    pub committed: Option<(usize, u64)>,
    stale: &'static mut [u64],
    dirty: &'static mut [u64],
    /// Frames managed (bit index of the first fixed-plate page in `stale`).
    frames: u64,
}

/// `checkpoint()`'s result in the running process, and in the one restored from it.
pub const SAVED: u64 = 0;
pub const RESTORED: u64 = 1;

fn table_at(addr: u64) -> &'static mut PlateTable {
    // SAFETY: the plate tables have their own fixed areas (nvram::layout, sized above the
    // table's size by kernel-core's constants); this module hands out the only references.
    unsafe { &mut *(addr as *mut PlateTable) }
}

fn bitmap_at(addr: u64, frames: u64) -> &'static mut [u64] {
    let words = (frames + 2 * FIXED_PAGES_MAX).div_ceil(64) as usize;
    assert!((words * 8) as u64 <= layout::PLATE_BITMAP_MAX);
    // SAFETY: a fixed area of the layout, ours alone.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, words) }
}

/// Most pages of a fixed plate (the stale bitmap reserves this many bits for each).
const FIXED_PAGES_MAX: u64 = layout::RESOURCES_SAVE_MAX / PAGE;

fn slot(i: usize) -> &'static mut PlateTable {
    table_at(layout::PLATE_SLOTS[i])
}

impl Plating {
    fn open(frames: u64) -> Self {
        Self {
            live: table_at(layout::PLATE_LIVE),
            committed: None,
            stale: bitmap_at(layout::PLATE_STALE, frames),
            dirty: bitmap_at(layout::PLATE_DIRTY, frames),
            frames,
        }
    }

    /// Index in the stale bitmap of a plate's first page.
    fn stale_index(&self, plate: &Plate) -> u64 {
        match PlateKind::from_raw(plate.kind) {
            Some(PlateKind::Fixed) => self.frames + u64::from(plate.id) * FIXED_PAGES_MAX,
            _ => (plate.src - layout::FRAMES_BASE) / PAGE,
        }
    }
}

/// Enables the plate function on a freshly formatted image: an empty plate table, no
/// commit, every save area stale; and the deletion of spaces replaced by one that defers
/// the freeing of their save areas.
pub fn format(frames: u64) -> Plating {
    let plating = Plating::open(frames);
    plating.live.format();
    for i in 0..2 {
        slot(i).magic = 0;
    }
    plating.stale.fill(u64::MAX);
    persist::persist(layout::PLATE_LIVE, PAGE);
    persist::persist(layout::PLATE_SLOTS[0], 64);
    persist::persist(layout::PLATE_SLOTS[1], 64);
    install_ops();
    plating
}

/// After a graceful shutdown: everything is as it was, the live table included; only which
/// pages changed since the last write-out is not known any more.
pub fn resume(frames: u64) -> Option<Plating> {
    let mut plating = Plating::open(frames);
    plating.live.check_header().ok()?;
    // Pages written after the last write-out, before the shutdown, are in no dirty log this
    // VMM keeps: the next write-out copies every page.
    plating.stale.fill(u64::MAX);
    plating.committed = ring3::run(|| plates::committed([slot(0), slot(1)])).map(|i| (i, slot(i).generation));
    install_ops();
    Some(plating)
}

/// The generation a crash would restore, if any.
pub fn committed_generation() -> Option<u64> {
    ring3::run(|| plates::committed([slot(0), slot(1)])).map(|i| slot(i).generation)
}

/// After a crash: copies every plate's committed area back (the tables first, so that the
/// kernel's state is the checkpoint's), frees the save areas pending deletion, and makes the
/// committed table the live one again. Returns the plate function's state and the metrics.
pub fn restore(frames_count: u64) -> Option<(Plating, Metrics)> {
    let start = timer::rdtsc();
    let (plating, mut m) = ring3::run(|| {
        let index = plates::committed([slot(0), slot(1)])?;
        let committed = slot(index);
        let mut nvm = GuestPersist::default();
        let pages = plates::restore(committed, &mut nvm);
        let mut plating = Plating::open(frames_count);
        plating.live.copy_from(committed);
        plating.committed = Some((index, committed.generation));
        // The restored areas equal their regions; the other areas are behind in unknown pages.
        plating.stale.fill(u64::MAX);
        let mut m = Metrics::new(Operation::Restore);
        m.copier = nvm.copier() as u32;
        m.plates = committed.count;
        m.generation = committed.generation;
        m.plated_bytes = committed.plates().iter().map(|p| p.pages * PAGE).sum();
        m.copied_bytes = pages * PAGE;
        m.phases[2] = nvm.copy_ticks;
        m.phases[4] = nvm.flush_ticks;
        Some((plating, m))
    })?;
    install_ops();
    m.total = timer::rdtsc() - start;
    Some((plating, m))
}

/// Frees the save areas the committed table left pending (after a restore, once the kernel
/// state with the restored frame bitmap is installed).
pub fn free_pending_after_restore(k: &mut Kernel) {
    let Some(plating) = k.plating.as_mut() else { return };
    plates::free_pending(plating.live.pending(), &mut k.frames);
    plating.live.pending_count = 0;
}

/// Why a write-out did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutError {
    /// `plate=off`.
    Disabled,
    /// No frames (or table room) for the save areas of a new plate.
    NoRoom,
}

/// A write-out: occupies the system (the caller runs with interrupts off, on the one CPU),
/// saves the interrupted process, plate-ifies new spaces, copies what changed into the
/// inactive save areas, commits by writing the plate table last, and frees the save areas
/// pending deletion. `from_checkpoint_call`: the interrupted process asked for it, and
/// must see [`SAVED`] now and [`RESTORED`] when resumed from this checkpoint after a crash.
pub fn write_out(k: &mut Kernel, frame: &mut TrapFrame, from_checkpoint_call: bool) -> Result<Metrics, WriteOutError> {
    if k.plating.is_none() {
        return Err(WriteOutError::Disabled);
    }
    let t0 = timer::rdtsc();
    let next = k.plating.as_ref().and_then(|p| p.committed).map_or(1, |(_, g)| g + 1);
    control::started(nvram::control::Started::new(next));
    // 2. The process table holds every process's registers; the running one's are in `frame`.
    if let Some(current) = k.current {
        if process::from_user(frame) {
            if let Some(p) = k.procs.get_mut(current) {
                p.regs = *frame;
                if from_checkpoint_call {
                    p.regs.rax = RESTORED;
                }
            }
        }
    }
    // 3 to 11, the bookkeeping, at CPL 3 (see `ring3`): natively under PVM.
    let mut m = ring3::run(|| steps(k, t0))?;
    // The way back from CPL 3 counts in the last phase.
    let end = timer::rdtsc();
    m.phases[5] += end - (t0 + m.total);
    m.total = end - t0;
    if from_checkpoint_call {
        frame.rax = SAVED;
    }
    control::metrics(m);
    Ok(m)
}

/// Steps 3 to 11 of a write-out (see [`write_out`]), timed from `t0`.
fn steps(k: &mut Kernel, t0: u64) -> Result<Metrics, WriteOutError> {
    // 3. Plate-ify what has no plate yet.
    plateify(k)?;
    let t1 = timer::rdtsc();
    // Find the dirty pages of user spaces (and clear the page tables' dirty bits).
    let Kernel { res, frames: frame_bitmap, plating, header, .. } = k;
    let res: &Resources = res;
    let plating = plating.as_mut().expect("checked by write_out");
    // Walk the page tables' dirty bits of each user space: at CPL 3 that is native and
    // takes tens of microseconds for the paper's 450 spaces. In (emulated) kernel mode,
    // the copy engine hands over KVM's log of the pages the CPU wrote instead, for all
    // frames at once, if there is an engine.
    let at_cpl3 = ring3::in_user_mode();
    let logged = !at_cpl3 && crate::engine::dirty_log(layout::FRAMES_BASE / PAGE, plating.frames, layout::PLATE_DIRTY);
    for plate in plating.live.plates().iter().filter(|_| !logged) {
        if plate.kind != PlateKind::UserSpace as u32 {
            continue;
        }
        let Some(user) = res.user_spaces.get(plate.id) else { continue };
        let Some(space) = res.spaces.get(user.space) else { continue };
        let base = (plate.src - layout::FRAMES_BASE) / PAGE;
        collect_dirty_into(space.root, user.vaddr, user.pages, plating.dirty, base);
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
    let pool_used = |k_res: &Resources, plate: &Plate| {
        k_res.spaces.get(plate.id).map_or(TABLE_POOL_PAGES, |s| u64::from(s.pool_used))
    };
    let frames = plating.frames;
    let mut nvm = GuestPersist::default();
    let stats = {
        let Plating { live, stale, dirty, .. } = &mut *plating;
        let dirty_bits: &[u64] = dirty;
        plates::write_out(
            live,
            generation,
            slot_index,
            stale,
            |p| match PlateKind::from_raw(p.kind) {
                Some(PlateKind::Fixed) => frames + u64::from(p.id) * FIXED_PAGES_MAX,
                _ => (p.src - layout::FRAMES_BASE) / PAGE,
            },
            |p, first, n| match PlateKind::from_raw(p.kind) {
                Some(PlateKind::UserSpace) => {
                    plates::bits_at(dirty_bits, (p.src - layout::FRAMES_BASE) / PAGE + first, n)
                }
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
            &mut nvm,
        )
    };
    plating.committed = Some((slot_index, generation + 1));
    let t3 = timer::rdtsc();

    // 11. Free the save areas of deleted spaces, now that no committed table needs them.
    plates::free_pending(plating.live.pending(), frame_bitmap);
    plating.live.pending_count = 0;
    if !logged {
        // The engine rewrites the whole bitmap at each request; the walk only sets bits.
        clear_dirty(plating);
    }
    header.generation = generation + 1;
    header.plate_table = layout::PLATE_SLOTS[slot_index];
    header.seal();
    crate::nvm::store_header(header);
    let t4 = timer::rdtsc();

    let mut m = Metrics::new(Operation::WriteOut);
    m.copier = nvm.copier() as u32;
    m.plates = stats.plates as u32;
    m.generation = generation + 1;
    m.plated_bytes = stats.plated_pages * PAGE;
    m.copied_bytes = stats.copied_pages * PAGE;
    let commit_ticks = nvm.slot_ticks;
    let copy_ticks = nvm.copy_ticks;
    let flush_ticks = nvm.flush_ticks;
    let rest = (t3 - t2).saturating_sub(commit_ticks + copy_ticks + flush_ticks);
    m.phases = [t1 - t0, (t2 - t1) + rest, copy_ticks, commit_ticks, flush_ticks, t4 - t3];
    m.total = t4 - t0;
    Ok(m)
}

/// Collects dirty bits of one user space into the frame-indexed `dirty` bitmap.
fn collect_dirty_into(root: u64, va: u64, pages: u64, dirty: &mut [u64], base: u64) -> u64 {
    // The bitmap is word-indexed by frame; collect into a window starting at `base`'s word,
    // shifted so that page 0 lands on bit `base`.
    let shift = base % 64;
    let first = (base / 64) as usize;
    if shift == 0 {
        return paging::collect_dirty(root, va, pages, &mut dirty[first..]);
    }
    // Unaligned start: collect into a small scratch window, then merge.
    let mut found = 0;
    let mut scratch = [0u64; 16];
    let mut done = 0;
    while done < pages {
        let chunk = (pages - done).min(64 * 15);
        scratch.fill(0);
        found += paging::collect_dirty(root, va + done * PAGE, chunk, &mut scratch);
        for i in 0..chunk {
            if scratch[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                let bit = base + done + i;
                if let Some(w) = dirty.get_mut((bit / 64) as usize) {
                    *w |= 1 << (bit % 64);
                }
            }
        }
        done += chunk;
    }
    found
}

fn clear_dirty(plating: &mut Plating) {
    for plate in plating.live.plates() {
        if plate.kind != PlateKind::UserSpace as u32 {
            continue;
        }
        let first = (plate.src - layout::FRAMES_BASE) / PAGE;
        for word in (first / 64)..=((first + plate.pages) / 64) {
            if let Some(w) = plating.dirty.get_mut(word as usize) {
                *w = 0;
            }
        }
    }
}

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
fn plateify(k: &mut Kernel) -> Result<(), WriteOutError> {
    let Kernel { res, frames, plating, .. } = k;
    let Some(plating) = plating.as_mut() else { return Err(WriteOutError::Disabled) };
    let add =
        |plating: &mut Plating, frames: &mut kernel_core::frames::FrameBitmap, kind: PlateKind, id, src, pages| {
            let a = frames.alloc(pages).map_err(|_| WriteOutError::NoRoom)?;
            let b = match frames.alloc(pages) {
                Ok(b) => b,
                Err(_) => {
                    let _ = frames.free(a, pages);
                    return Err(WriteOutError::NoRoom);
                }
            };
            enlist(plating, Plate { kind: kind as u32, id, src, pages, area: [a, b], valid: 0, reserved: 0 })
        };
    if !plating.live.is_plated(PlateKind::Fixed, FIXED_RESOURCES) {
        let pages = (core::mem::size_of::<Resources>() as u64).div_ceil(PAGE);
        let bitmap_pages = (kernel_core::frames::words_for(plating.frames) as u64 * 8).div_ceil(PAGE);
        for (id, src, pages, area) in [
            (FIXED_RESOURCES, layout::RESOURCES, pages, layout::RESOURCES_SAVE),
            (FIXED_FRAME_BITMAP, layout::FRAME_BITMAP, bitmap_pages, layout::FRAME_BITMAP_SAVE),
        ] {
            enlist(plating, Plate { kind: PlateKind::Fixed as u32, id, src, pages, area, valid: 0, reserved: 0 })?;
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
fn defer(k: &mut Kernel, kind: PlateKind, id: u32) {
    if let Some(plating) = k.plating.as_mut() {
        if plating.live.remove(kind, id).is_err() {
            println!("plate: deletion-pending list full: the save areas of {kind:?} {id} are leaked");
        }
    }
}

fn user_space_delete(k: &mut Kernel, id: u32) -> Result<(), ResError> {
    resources::user_space_delete_now(k, id)?;
    defer(k, PlateKind::UserSpace, id);
    Ok(())
}

fn space_delete(k: &mut Kernel, id: u32) -> Result<(), ResError> {
    resources::space_delete_now(k, id)?;
    defer(k, PlateKind::PageTables, id);
    Ok(())
}

fn kernel_space_delete(k: &mut Kernel, id: u32) -> Result<(), ResError> {
    resources::kernel_space_delete_now(k, id)?;
    defer(k, PlateKind::KernelSpace, id);
    Ok(())
}

/// Replaces the delete operations of the space types (Tender's table-program structure).
fn install_ops() {
    let mut ops = OPS.write();
    ops.user_space.delete = user_space_delete;
    ops.space.delete = space_delete;
    ops.kernel_space.delete = kernel_space_delete;
}

/// Bulk copies and cache write-back over identity-mapped physical memory, timed: by the
/// copy engine when there is one (its copies are durable on completion, so there is
/// nothing left to flush), else by the CPU.
struct GuestPersist {
    engine: bool,
    copy_ticks: u64,
    flush_ticks: u64,
    slot_ticks: u64,
}

impl Default for GuestPersist {
    fn default() -> Self {
        Self { engine: crate::engine::enabled(), copy_ticks: 0, flush_ticks: 0, slot_ticks: 0 }
    }
}

impl GuestPersist {
    fn copier(&self) -> Copier {
        if self.engine {
            Copier::Engine
        } else {
            Copier::Cpu
        }
    }

    /// Copies `ranges` (by the engine if possible; durable then); returns whether the
    /// copies still need flushing. `small`: a few KiB, which at CPL 3 the CPU copies
    /// natively in less time than a trap to ring the engine takes.
    fn copy_ranges(&mut self, ranges: &[CopyRange], small: bool) -> bool {
        let by_cpu = small && ring3::in_user_mode();
        if self.engine && !by_cpu && crate::engine::copy(ranges) {
            return false;
        }
        for r in ranges {
            crate::memory::copy(r.dst, r.src, r.len);
        }
        true
    }
}

impl Persist for GuestPersist {
    fn copy(&mut self, ranges: &[CopyRange]) -> bool {
        let t = timer::rdtsc();
        let durable = !self.copy_ranges(ranges, false);
        self.copy_ticks += timer::rdtsc() - t;
        durable
    }

    fn flush(&mut self, addr: u64, len: u64) {
        let t = timer::rdtsc();
        persist::flush(addr, len);
        self.flush_ticks += timer::rdtsc() - t;
    }

    fn fence(&mut self) {
        persist::fence();
    }

    fn write_slot(&mut self, slot_index: usize, table: &PlateTable) {
        let t = timer::rdtsc();
        let dst = layout::PLATE_SLOTS[slot_index];
        let src = table as *const PlateTable as u64;
        let [(a, a_len), (b, b_len)] = table.used_ranges();
        let ranges = [
            CopyRange { dst: dst + a as u64, src: src + a as u64, len: a_len as u64 },
            CopyRange { dst: dst + b as u64, src: src + b as u64, len: b_len as u64 },
        ];
        let ranges = if b_len == 0 { &ranges[..1] } else { &ranges[..] };
        if self.copy_ranges(ranges, true) {
            for r in ranges {
                persist::flush(r.dst, r.len);
            }
        }
        self.slot_ticks += timer::rdtsc() - t;
    }
}
