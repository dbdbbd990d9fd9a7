//! How the plate function copies and makes durable: a [`Persist`] over identity-mapped
//! physical memory, by the copy engine when there is one, else by the CPU, timed per phase.

use kernel_core::plates::{CopyRange, Persist, RangeSum};
use nvram::control::Copier;
use nvram::layout;
use nvram::plate::{AreaSum, PlateTable};

use crate::arch::{memory, ring3, timer};
use crate::dev::{engine, persist};

/// Bulk copies and cache write-back over identity-mapped physical memory, timed: by the
/// copy engine when there is one (its copies are durable on completion, so there is
/// nothing left to flush), else by the CPU.
pub(super) struct GuestPersist {
    engine: bool,
    /// A write-out's: where a planted bug goes ([`super::plant`]); none for a restore.
    plant: Option<super::plant::Count>,
    pub(super) copy_ticks: u64,
    pub(super) flush_ticks: u64,
    pub(super) slot_ticks: u64,
}

impl Default for GuestPersist {
    fn default() -> Self {
        Self { engine: engine::enabled(), plant: None, copy_ticks: 0, flush_ticks: 0, slot_ticks: 0 }
    }
}

impl GuestPersist {
    /// A write-out's copier (a planted bug, if any, goes into its flushes and fences).
    pub(super) fn for_write_out() -> Self {
        Self { plant: Some(super::plant::Count::default()), ..Self::default() }
    }

    pub(super) fn copier(&self) -> Copier {
        if self.engine {
            Copier::Engine
        } else {
            Copier::Cpu
        }
    }

    /// The copies that make `dst` a copy of the table `src` (a restore's live table from its
    /// committed slot), for the copy engine to make with the restore's first batch, so that
    /// the CPU does not touch the live table's pages (each first touch in the work space is
    /// a fault of the hypervisor's shadow paging under PVM: about a third of a restore's time
    /// went there). `None` without the engine: [`PlateTable::copy_from`] then.
    pub(super) fn table_copies(&self, dst: &PlateTable, src: &PlateTable) -> Option<[CopyRange; 2]> {
        let (to, from) = (dst as *const PlateTable as u64, src as *const PlateTable as u64);
        let range =
            |(at, len): (usize, usize)| CopyRange { dst: to + at as u64, src: from + at as u64, len: len as u64 };
        self.engine.then(|| src.used_ranges().map(range))
    }

    /// Copies `ranges` into live memory, with no write-back (a lazy restore's copies back
    /// to the regions: their durability matters to nothing).
    pub(super) fn copy_volatile(&mut self, ranges: &[CopyRange]) {
        let t = timer::rdtsc();
        if !(self.engine && engine::copy_volatile(ranges)) {
            for r in ranges {
                memory::copy(r.dst, r.src, r.len);
            }
        }
        self.copy_ticks += timer::rdtsc() - t;
    }

    /// Copies `ranges` (by the engine if possible; durable then); returns whether the
    /// copies still need flushing. `small`: a few KiB, which at CPL 3 the CPU copies
    /// natively in less time than a trap to ring the engine takes.
    fn copy_ranges(&mut self, ranges: &[CopyRange], small: bool) -> bool {
        let by_cpu = small && ring3::in_user_mode();
        if self.engine && !by_cpu && engine::copy(ranges) {
            return false;
        }
        for r in ranges {
            memory::copy(r.dst, r.src, r.len);
        }
        true
    }
}

/// Copies `r` page by page, hashing each page of the source as it goes (`sum.written`) and,
/// if asked, each page of the destination just before it is overwritten (`sum.overwritten`):
/// a page is hashed while it is in the cache for its copy, not read again afterwards.
fn copy_and_sum(r: &CopyRange, sum: &mut RangeSum) {
    let page = layout::PAGE_SIZE;
    let mut written = AreaSum::new(sum.first);
    let mut overwritten = AreaSum::new(sum.first);
    let mut at = 0;
    while at < r.len {
        let n = (r.len - at).min(page);
        let (src, dst) = (r.src + at, r.dst + at);
        // SAFETY: all of RAM is identity-mapped and the ranges are the plates' own (see
        // `read`); the slices are dropped before the copy writes `dst`.
        let (from, to) = unsafe {
            (
                core::slice::from_raw_parts(src as *const u8, n as usize),
                core::slice::from_raw_parts(dst as *const u8, n as usize),
            )
        };
        if sum.wants_overwritten() {
            overwritten.page(to);
        }
        written.page(from);
        memory::copy(dst, src, n);
        at += n;
    }
    sum.written = written.sum();
    sum.overwritten = if sum.wants_overwritten() { overwritten.sum() } else { 0 };
}

impl Persist for GuestPersist {
    fn copy(&mut self, ranges: &[CopyRange]) -> bool {
        let t = timer::rdtsc();
        let durable = !self.copy_ranges(ranges, false);
        self.copy_ticks += timer::rdtsc() - t;
        durable
    }

    /// By the engine, which sums as it copies; else (no engine, or a batch it refused,
    /// which copied nothing) by the CPU, page by page.
    fn copy_summed(&mut self, ranges: &[CopyRange], sums: &mut [RangeSum]) -> bool {
        let t = timer::rdtsc();
        let durable = self.engine && engine::copy_summed(ranges, sums);
        if !durable {
            ranges.iter().zip(sums.iter_mut()).for_each(|(r, s)| copy_and_sum(r, s));
        }
        self.copy_ticks += timer::rdtsc() - t;
        durable
    }

    fn flush(&mut self, addr: u64, len: u64) {
        if self.plant.as_mut().is_some_and(|p| p.skip_flush()) {
            return;
        }
        let t = timer::rdtsc();
        persist::flush(addr, len);
        self.flush_ticks += timer::rdtsc() - t;
    }

    fn fence(&mut self) {
        if self.plant.as_mut().is_some_and(|p| p.skip_fence()) {
            return;
        }
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

    /// At CPL 3, where the CPU reads natively (a restore checks the save areas then) and the
    /// bookkeeping of the sums costs nothing to speak of. The engine could sum in kernel mode
    /// too, but there each plate's share of the bookkeeping is emulated, instruction by
    /// instruction: the sums stay unknown, as the restore's check is off there. And not
    /// with `sums=off`.
    fn can_sum(&self) -> bool {
        super::sums_on() && ring3::in_user_mode()
    }

    /// With the engine: the restore's check has the engine sum the save areas where they
    /// are, so the CPU touches none of their pages. (At CPL 3 every page the work touches
    /// first costs a fault of the hypervisor's shadow paging: reading the paper's 9.5 MB
    /// took 28 ms that way; copying them onto a scratch buffer to have them summed, which
    /// this replaced, cost a copy of every byte.)
    fn sum_in_place(&mut self, ranges: &[CopyRange], sums: &mut [RangeSum]) -> bool {
        self.engine && engine::sum_in_place(ranges, sums)
    }

    fn read(&self, addr: u64, len: u64) -> &[u8] {
        // SAFETY: all of RAM is identity-mapped, and the callers pass only ranges of plates
        // inside it (a committed table's entries are checked against the layout first, and
        // the live table's are the kernel's own); nothing writes them while the slice is
        // read (one CPU, the system occupied by the write-out or the restore).
        unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) }
    }
}
