//! The lazy restore (`restore=lazy`, the default): after a crash the kernel's plates are
//! copied back, and every process's user address space is left *away* 2 MiB at a time
//! (`kernel_core::lazy`): its user spaces' pages stay in their committed save areas, and
//! the processes run as soon as the kernel's state is back. The first access to 2 MiB away
//! faults, and the kernel copies back the pages of the user spaces there; a system call
//! that reads a process's memory brings back the 2 MiB of its buffer first, and one that
//! changes its mappings its whole space. What is still away comes back at once when the
//! CPU would idle, before the next write-out (which copies from the regions, and commits
//! the page tables, which must not say "away"), and before a shutdown (whose resume trusts
//! the page tables as they are); the restore ends there, or once nothing is away.
//!
//! Why it is safe: the committed areas are only read until the next commit, so a crash
//! anywhere before it (during a copy back included) restores the same state again. Only
//! this boot knows a lazy restore is under way ([`Tail`], scratch of this boot); the
//! directory entries say which 2 MiB are away. While a space has any away, its user spaces
//! are exactly the committed ones: a `map` or `unmap` brings the space back before it
//! changes them, and a process's death takes its page tables with it.

use kernel_core::lazy;
use kernel_core::plates::CopyRange;
use nvram::control::{Metrics, Operation};
use nvram::plate::{Plate, PlateKind, PlateTable};
use nvram::resources::{Resources, SPACES};

use super::copy::GuestPersist;
use super::state::{Plating, PAGE};
use crate::arch::{paging, ring3, timer};
use crate::dev::control;
use crate::println;

/// Copies batched per copier call.
const BATCH: usize = 256;

/// A lazy restore under way.
pub struct Tail {
    /// TSC at the restore's start.
    started: u64,
    generation: u64,
    /// The spaces whose user half was left away (by id), found at the first user plate.
    marked: [u64; SPACES.div_ceil(64)],
    /// Whether every space was marked (every user plate is left); `None` until the first
    /// user plate is asked about.
    all_marked: Option<bool>,
    /// Directory entries left away, user spaces left and their pages.
    spans: u32,
    /// Directory entries still away: at 0 the restore ends at once, before any idle.
    away: u32,
    spaces: u32,
    pages: u64,
    /// Pages brought back since, faults that brought some, and TSC ticks: of the copies,
    /// and of the copies with their walks.
    brought: u64,
    faults: u64,
    copy_ticks: u64,
    walk_ticks: u64,
}

impl Tail {
    pub(super) fn new(started: u64, generation: u64) -> Self {
        Self {
            started,
            generation,
            marked: [0; SPACES.div_ceil(64)],
            all_marked: None,
            spans: 0,
            away: 0,
            spaces: 0,
            pages: 0,
            brought: 0,
            faults: 0,
            copy_ticks: 0,
            walk_ticks: 0,
        }
    }

    /// The pages the restore left in save areas.
    pub(super) fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether the restore left anything away (else there is nothing to end).
    pub(super) fn pending(&self) -> bool {
        self.pages != 0 || self.spans != 0
    }

    fn is_marked(&self, space: u32) -> bool {
        self.marked.get(space as usize / 64).is_some_and(|w| w & (1 << (space % 64)) != 0)
    }

    /// The space `space` has nothing away any more: its faults and system calls are its own.
    fn unmark(&mut self, space: u32) {
        if let Some(w) = self.marked.get_mut(space as usize / 64) {
            *w &= !(1 << (space % 64));
        }
    }

    /// One directory entry is back.
    fn one_back(&mut self) {
        debug_assert!(self.away > 0, "more entries back than were away");
        self.away = self.away.saturating_sub(1);
    }
}

/// Whether a restore leaves user plate `plate` of the committed table `committed` in its
/// save area. At the first call, once the kernel's plates (the page tables among them) are
/// back, leaves the user half of every space away; if that was done for every space there
/// is, every user plate is left (each user space is in one of them), else none (the restore
/// copies them back at once). The user spaces themselves are not looked up here: that
/// would touch the resource table's pages in the work space, a fault of the hypervisor's
/// shadow paging each under PVM. At CPL 3, from the restore's work.
pub(super) fn leave(tail: &mut Tail, committed: &PlateTable, res: &Resources, plate: &Plate) -> bool {
    let all = match tail.all_marked {
        Some(all) => all,
        None => {
            let all = mark_all(tail, committed, res);
            tail.all_marked = Some(all);
            all
        }
    };
    if all {
        tail.spaces += 1;
        tail.pages += plate.pages;
    }
    all
}

/// Leaves the user half of every space away, if every space of `res` has its page-table
/// plate in `committed` at its root; whether it did (else nothing is marked, and the
/// restore copies every user plate back at once).
fn mark_all(tail: &mut Tail, committed: &PlateTable, res: &Resources) -> bool {
    let tables = PlateKind::PageTables as u32;
    let plated = |id: u32, root: u64| {
        committed.plates().iter().any(|p| p.kind == tables && p.valid != 0 && p.id == id && p.src == root)
    };
    // The space's root is its pool's first frame (`nvm::resources`), its plate's `src`.
    if !res.spaces.iter().all(|(id, s)| (id as usize) < SPACES && plated(id, s.root)) {
        return false;
    }
    for (id, space) in res.spaces.iter() {
        tail.marked[id as usize / 64] |= 1 << (id % 64);
        paging::for_each_directory_entry(space.root, |_, e| {
            if let Some(gone) = lazy::away(*e) {
                *e = gone;
                tail.spans += 1;
                tail.away += 1;
            }
        });
    }
    true
}

/// The copies back of one call, batched across user spaces: one copier call (a doorbell)
/// per [`BATCH`] runs of pages.
struct Copies {
    batch: [CopyRange; BATCH],
    used: usize,
    nvm: GuestPersist,
}

impl Copies {
    fn new() -> Self {
        Self { batch: [CopyRange { dst: 0, src: 0, len: 0 }; BATCH], used: 0, nvm: GuestPersist::default() }
    }

    fn push(&mut self, range: CopyRange) {
        if self.used == BATCH {
            self.run();
        }
        self.batch[self.used] = range;
        self.used += 1;
    }

    /// Copies what is batched. Not made durable: the regions are the live state, and a crash
    /// restores the commit again.
    fn run(&mut self) {
        if self.used > 0 {
            self.nvm.copy_volatile(&self.batch[..self.used]);
            self.used = 0;
        }
    }
}

/// Queues the copies back of the pages of the user spaces of `space` that lie in the
/// 2 MiB at `base`, from their committed areas. The caller has made the
/// directory entry present again: nothing runs between that and the copies (one CPU,
/// interrupts off, and every caller runs the copies before it returns).
fn queue_span(tail: &mut Tail, live: &PlateTable, res: &Resources, space: u32, base: u64, copies: &mut Copies) {
    let user = PlateKind::UserSpace as u32;
    let mut queued = 0;
    for plate in live.plates().iter().filter(|p| p.kind == user && p.valid != 0) {
        let Some(u) = res.user_spaces.get(plate.id).filter(|u| u.space == space) else { continue };
        // The plate's pages are what was saved; the user space's, where they are mapped.
        let (first, n) = lazy::pages_in_span(u.vaddr, u.pages.min(plate.pages), base);
        if n == 0 {
            continue;
        }
        let area = plate.area[(plate.valid - 1) as usize & 1];
        copies.push(CopyRange { dst: plate.src + first * PAGE, src: area + first * PAGE, len: n * PAGE });
        queued += n;
    }
    tail.brought += queued;
}

/// Brings back every 2 MiB away of the space `space`.
fn open_all(tail: &mut Tail, live: &PlateTable, res: &Resources, space: u32, copies: &mut Copies) {
    let Some(root) = res.spaces.get(space).map(|s| s.root) else { return };
    paging::for_each_directory_entry(root, |base, e| {
        if lazy::is_away(*e) {
            *e = lazy::back(*e);
            tail.one_back();
            queue_span(tail, live, res, space, base, copies);
        }
    });
    tail.unmark(space);
}

/// Times `f` (the copies it queues run before the time is taken) into the tail.
fn timed(tail: &mut Tail, f: impl FnOnce(&mut Tail, &mut Copies)) {
    let t = timer::rdtsc();
    let mut copies = Copies::new();
    f(tail, &mut copies);
    copies.run();
    tail.copy_ticks += copies.nvm.copy_ticks;
    tail.walk_ticks += timer::rdtsc() - t;
}

/// Brings back the 2 MiB holding `va` in the space `space` (rooted at `root`) if they are
/// away: the entry present again, the copies of its user spaces' pages queued. Whether
/// they were away.
fn open_span(
    tail: &mut Tail,
    live: &PlateTable,
    res: &Resources,
    space: u32,
    root: u64,
    va: u64,
    copies: &mut Copies,
) -> bool {
    // SAFETY: `root` is a space's PML4, its tables identity-mapped frames of its pool that
    // nothing else references while the kernel (or its work) runs alone.
    let Some(entry) = (unsafe { paging::directory_entry(root, va) }) else { return false };
    if !lazy::is_away(*entry) {
        return false;
    }
    *entry = lazy::back(*entry);
    tail.one_back();
    queue_span(tail, live, res, space, va & !(lazy::SPAN - 1), copies);
    true
}

/// After a user-mode fault on a page not present at `va` in the space `space` of the
/// current process: brings its 2 MiB back if they are away; `false` if they are not (the
/// fault is the program's own). At CPL 3.
pub fn on_fault(plating: &mut Plating, res: &Resources, space: u32, va: u64) -> bool {
    let Plating { tail: Some(tail), live, .. } = plating else { return false };
    if !tail.is_marked(space) {
        return false;
    }
    let handled = ring3::run(|| {
        let Some(root) = res.spaces.get(space).map(|s| s.root) else { return false };
        let mut opened = false;
        timed(tail, |tail, copies| opened = open_span(tail, live, res, space, root, va, copies));
        tail.faults += u64::from(opened);
        opened
    });
    end_if_all_back(plating, res);
    handled
}

/// Before the kernel reads `addr..addr + len` of the space `space` through its regions'
/// frames (a system call's buffer, found inside one of its user spaces): brings back the
/// 2 MiB spans that hold it.
pub fn settle_range(plating: &mut Plating, res: &Resources, space: u32, addr: u64, len: u64) {
    let Plating { tail: Some(tail), live, .. } = plating else { return };
    if !tail.is_marked(space) || len == 0 {
        return;
    }
    ring3::run(|| {
        let Some(root) = res.spaces.get(space).map(|s| s.root) else { return };
        let last = addr.saturating_add(len - 1);
        timed(tail, |tail, copies| {
            let mut at = addr & !(lazy::SPAN - 1);
            while at <= last {
                open_span(tail, live, res, space, root, at, copies);
                at = match at.checked_add(lazy::SPAN) {
                    Some(next) => next,
                    None => break,
                };
            }
        });
    });
    end_if_all_back(plating, res);
}

/// Before the space `space` is deleted (its process died): its entries still away go with
/// its page tables, so they no longer count, and nothing of it is to be brought back.
pub fn forget(plating: &mut Plating, res: &Resources, space: u32) {
    let Plating { tail: Some(tail), .. } = plating else { return };
    if !tail.is_marked(space) {
        return;
    }
    let Some(root) = res.spaces.get(space).map(|s| s.root) else { return };
    ring3::run(|| {
        let mut away = 0;
        paging::for_each_directory_entry(root, |_, e| away += u32::from(lazy::is_away(*e)));
        tail.away = tail.away.saturating_sub(away);
        tail.unmark(space);
    });
    end_if_all_back(plating, res);
}

/// Ends the lazy restore once no directory entry is away any more.
fn end_if_all_back(plating: &mut Plating, res: &Resources) {
    if plating.tail.as_ref().is_some_and(|t| t.away == 0) {
        finish(plating, res);
    }
}

/// Before the kernel changes a process's mappings (`map`, `unmap`): brings back all of
/// the space `space`.
pub fn settle(plating: &mut Plating, res: &Resources, space: u32) {
    let Plating { tail: Some(tail), live, .. } = plating else { return };
    if !tail.is_marked(space) {
        return;
    }
    ring3::run(|| timed(tail, |tail, copies| open_all(tail, live, res, space, copies)));
    end_if_all_back(plating, res);
}

/// Ends a lazy restore under way, if any: brings back everything still away (at CPL 3).
/// Called when the CPU would idle, before a write-out and before a shutdown.
pub fn finish(plating: &mut Plating, res: &Resources) {
    let Plating { tail: Some(tail), live, stale, .. } = plating else { return };
    ring3::run(|| {
        // Nothing away (every entry back at first touches): no walk to make.
        if tail.away > 0 {
            timed(tail, |tail, copies| {
                for space in 0..SPACES as u32 {
                    if tail.is_marked(space) {
                        open_all(tail, live, res, space, copies);
                    }
                }
            });
        }
        // What the restore left for its end: every area is behind in unknown pages.
        stale.fill(u64::MAX);
    });
    end(plating);
}

/// The lazy restore is over: says so, on the console and to the VMM (`RestoreTail`).
fn end(plating: &mut Plating) {
    let Some(tail) = plating.tail.take() else { return };
    let mut m = Metrics::new(Operation::RestoreTail);
    m.plates = tail.spaces;
    m.generation = tail.generation;
    m.plated_bytes = tail.pages * PAGE;
    m.copied_bytes = tail.brought * PAGE;
    m.phases[1] = tail.walk_ticks.saturating_sub(tail.copy_ticks);
    m.phases[2] = tail.copy_ticks;
    m.copier = GuestPersist::default().copier() as u32;
    m.total = timer::rdtsc() - tail.started;
    control::metrics(&m);
    println!(
        "plate: restore finished: {} KiB of {} user spaces brought back from their save areas ({} of {} \
         2 MiB spans at first touch)",
        m.copied_bytes >> 10,
        tail.spaces,
        tail.faults,
        tail.spans
    );
}
