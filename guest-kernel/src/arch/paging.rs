//! Virtual spaces: page tables.
//!
//! ```text
//!   virtual address                     mapping
//!   0x0000_0000_0000 - 0x0000_ffff_ffff  identity map of the first 4 GiB (boot page tables,
//!                                        shared by every space), kernel only
//!   0x0080_0000_0000 - 0x3fff_ffff_ffff  user spaces `map` gives and the stack, 4 KiB
//!                                        pages, each followed by an unmapped guard page
//!   0x4000_0000_0000 - + 1 GiB           the program's segments, where its ELF file was
//!                                        linked (`nvram::abi`)
//! ```
//!
//! Every space's PML4 shares entry 0 with the kernel's; the rest of the PML4 is the
//! process's own. User pages are 4 KiB so that the CPU's dirty bits tell which pages changed.

use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::mapper::{MapToError, UnmapError};
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags as Flags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// First virtual address of user spaces (PML4 entry 1).
pub const USER_BASE: u64 = nvram::abi::USER_BASE;

const PAGE: u64 = 4096;

extern "C" {
    static boot_pml4: u8;
    static boot_pt0: u8;
    static __stack_guard: u8;
}

/// Physical address of the kernel's PML4 (the boot tables).
pub fn kernel_root() -> u64 {
    &raw const boot_pml4 as u64
}

/// Makes the guard page below the kernel stack not present. The kernel's own pages are
/// all kernel-only: user mode runs nothing of the kernel's (programs are ELF files of
/// their own, loaded into their spaces).
pub fn init() {
    // SAFETY: the boot page tables are identity-mapped statics of the kernel image, used by
    // this CPU alone; the guard page below the kernel stack holds nothing (linker script).
    unsafe {
        let pt = &raw const boot_pt0 as *mut u64;
        let guard = &raw const __stack_guard as u64 / PAGE;
        *pt.add(guard as usize) &= !Flags::PRESENT.bits();
        x86_64::instructions::tlb::flush_all();
    }
}

/// Points entry 0 (the kernel's identity map) of each of these PML4s at this kernel's
/// tables. A space made by another build of the kernel (an image resumed or restored by a
/// newer kernel) names that build's boot tables there, which may lie elsewhere now.
pub fn refresh_kernel_entries(roots: impl Iterator<Item = u64>) {
    // SAFETY: the kernel PML4 is the boot one, identity-mapped.
    let entry = unsafe { *(kernel_root() as *const u64) };
    for root in roots {
        // SAFETY: `root` is a space's PML4, a frame of its own, identity-mapped; entry 0 is
        // the kernel's by construction (`init_root`), never a user mapping.
        unsafe { *(root as *mut u64) = entry };
    }
}

/// Frames for a space's page tables, from its pool (`VirtualSpace::pool`), zeroed as the
/// mapper expects. Frames are never given back one by one: the pool goes with the space.
pub struct TablePool<'a> {
    pub base: u64,
    pub capacity: u64,
    pub used: &'a mut u32,
}

// SAFETY: every frame returned is a pool frame not handed out before.
unsafe impl FrameAllocator<Size4KiB> for TablePool<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let index = u64::from(*self.used);
        if index >= self.capacity {
            return None;
        }
        let addr = self.base + index * PAGE;
        crate::arch::memory::zero(addr, PAGE);
        *self.used += 1;
        Some(PhysFrame::containing_address(PhysAddr::new(addr)))
    }
}

/// The page tables of the space rooted at `root`.
///
/// # Safety
///
/// `root` must be a PML4 made by [`init_root`] (or the kernel's), identity-mapped, used by
/// no one else while the returned value lives.
unsafe fn tables(root: u64) -> OffsetPageTable<'static> {
    // SAFETY: per the caller's contract; physical memory is identity-mapped (offset 0).
    unsafe { OffsetPageTable::new(&mut *(root as *mut PageTable), VirtAddr::new(0)) }
}

/// Makes `root` (a frame of the space's own) the PML4 of a new space: the kernel's entry 0,
/// nothing else.
pub fn init_root(root: u64) {
    crate::arch::memory::zero(root, PAGE);
    // SAFETY: `root` is a frame owned by the new space, identity-mapped; the kernel PML4 is
    // the boot one.
    unsafe { *(root as *mut u64) = *(kernel_root() as *const u64) };
}

/// Why a mapping failed.
#[derive(Debug)]
pub enum MapError {
    OutOfMemory,
    AlreadyMapped,
}

/// What user mode may do with a mapping: never write and run the same page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
    ReadExecute,
}

/// Maps `pages` pages of physical `phys` at user address `va` in the space `root`.
pub fn map_user(
    root: u64,
    va: u64,
    phys: u64,
    pages: u64,
    access: Access,
    frames: &mut TablePool,
) -> Result<(), MapError> {
    let mut flags = Flags::PRESENT | Flags::USER_ACCESSIBLE;
    match access {
        Access::ReadWrite => flags |= Flags::WRITABLE | Flags::NO_EXECUTE,
        Access::Read => flags |= Flags::NO_EXECUTE,
        Access::ReadExecute => {}
    }
    let parents = Flags::PRESENT | Flags::WRITABLE | Flags::USER_ACCESSIBLE;
    // SAFETY: `root` is a space's PML4; the kernel runs alone.
    let mut tables = unsafe { tables(root) };
    for i in 0..pages {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va + i * PAGE));
        let frame = PhysFrame::containing_address(PhysAddr::new(phys + i * PAGE));
        // SAFETY: the frame belongs to a region attached to this space alone.
        let result = unsafe { tables.map_to_with_table_flags(page, frame, flags, parents, frames) };
        match result {
            // A new mapping needs no TLB flush; the space's CR3 load flushes anyway.
            Ok(flush) => flush.ignore(),
            Err(MapToError::FrameAllocationFailed) => return Err(MapError::OutOfMemory),
            Err(_) => return Err(MapError::AlreadyMapped),
        }
    }
    Ok(())
}

/// Unmaps `pages` pages at user address `va` in the space `root`.
pub fn unmap_user(root: u64, va: u64, pages: u64) {
    // SAFETY: `root` is a space's PML4; the kernel runs alone.
    let mut tables = unsafe { tables(root) };
    let current = Cr3::read().0.start_address().as_u64() == root;
    for i in 0..pages {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va + i * PAGE));
        match tables.unmap(page) {
            Ok((_, flush)) if current => flush.flush(),
            Ok((_, flush)) => flush.ignore(),
            Err(UnmapError::PageNotMapped) => {}
            Err(_) => {}
        }
    }
}

/// The PML4 in use.
pub fn current_root() -> u64 {
    Cr3::read().0.start_address().as_u64()
}

/// Switches to the space `root` (no-op if it is the current one).
pub fn switch_to(root: u64) {
    let (current, _) = Cr3::read();
    if current.start_address().as_u64() != root {
        // SAFETY: `root` is a PML4 that maps the kernel (entry 0 shared), so execution
        // continues unchanged.
        unsafe { Cr3::write(PhysFrame::containing_address(PhysAddr::new(root)), Cr3Flags::empty()) };
    }
}

/// Finds the pages of `va..va + pages * 4 KiB` (a user space of the space `root`) that were
/// written since the last call: sets bit `i` of `dirty` for each dirty page `i` (a superset:
/// hot pages are reported until re-armed), and re-arms the dirty bits in the page tables as
/// `kernel_core::dirty` decides, so that the next call sees every newer write. The caller
/// flushes the TLB afterwards (a CR3 load), so the CPU sets the cleared bits again.
/// `rearm_all`: re-arm hot pages too (`kernel_core::dirty::rearms_all`).
///
/// Walks each page table once per 2 MiB, not once per page: the work is one load per page,
/// which under PVM's emulated kernel mode is what a write-out must stay proportional to.
pub fn collect_dirty(root: u64, va: u64, pages: u64, dirty: &mut [u64], rearm_all: bool) -> u64 {
    use kernel_core::dirty::{DIRTY, SEEN};
    const _: () = assert!(DIRTY == Flags::DIRTY.bits() && SEEN == Flags::BIT_9.bits());
    let mut found = 0;
    let mut page = 0;
    while page < pages {
        let addr = va + page * PAGE;
        // Pages left in this page table (2 MiB).
        let in_table = (512 - (addr >> 12) % 512).min(pages - page);
        // SAFETY: `root` is a space's PML4; every table it leads to is an identity-mapped
        // frame of the space's pool, which nothing else references while the kernel (or its
        // ring-3 work) runs alone with interrupts off.
        if let Some(table) = unsafe { leaf_table(root, addr) } {
            // The leaf's entries as words: the walk down is `PageTable`/`PageTableEntry`'s,
            // but the hot loop tests and clears the dirty bit on the raw entry. Measured on
            // the host (this loop runs natively, at CPL 3), over 450 spaces of 20 pages,
            // 15% dirty: 19 µs a write-out for raw words, 26 µs with `pte.flags()` and
            // `pte.set_flags()` (which rebuild the entry from its address and flags); the
            // same for 5 pages: 13.5 µs against 15 µs.
            // SAFETY: `PageTable` is `repr(C)` over 512 `repr(transparent)` u64 entries.
            let entries = unsafe { &mut *(table as *mut PageTable).cast::<[u64; 512]>() };
            let first = ((addr >> 12) & 511) as usize;
            let run = &mut entries[first..first + in_table as usize];
            for (i, pte) in (0..).zip(run.iter_mut()) {
                if *pte & (DIRTY | SEEN) == 0 {
                    continue;
                }
                let (dirty_now, new) = kernel_core::dirty::scan_entry(*pte, rearm_all);
                if let Some(new) = new {
                    *pte = new;
                }
                if dirty_now {
                    let bit = page + i;
                    if let Some(word) = dirty.get_mut((bit / 64) as usize) {
                        *word |= 1 << (bit % 64);
                    }
                    found += 1;
                }
            }
        }
        page += in_table;
    }
    found
}

// The lazy restore's directory-entry bits are the CPU's.
const _: () = assert!(
    kernel_core::lazy::PRESENT == Flags::PRESENT.bits()
        && kernel_core::lazy::HUGE == Flags::HUGE_PAGE.bits()
        && kernel_core::lazy::AWAY == Flags::BIT_10.bits()
);

/// Calls `f(base, entry)` with each directory entry (level 2: 2 MiB, `base` its first
/// address) under the user half of the space `root` (PML4 entries 1 to 511: entry 0 is the
/// kernel's, shared by every space), where the tables above it are present. `f` may
/// rewrite the entry. A present entry made not present must reach the TLB before the
/// space runs (a CR3 load: the lazy restore marks spaces no process has run in this boot);
/// one made present needs nothing (a not-present entry is never cached).
pub fn for_each_directory_entry(root: u64, mut f: impl FnMut(u64, &mut u64)) {
    let present = |e: u64| e & Flags::PRESENT.bits() != 0 && e & Flags::HUGE_PAGE.bits() == 0;
    // SAFETY: `root` is a space's PML4 and every table it leads to an identity-mapped frame
    // of the space's pool (a table is 512 u64 entries), referenced by nothing else while the
    // kernel (or its ring-3 work) runs alone.
    let pml4 = unsafe { &*(root as *const [u64; 512]) };
    for (i, &e4) in pml4.iter().enumerate().skip(1).filter(|(_, e)| present(**e)) {
        // SAFETY: a present PML4 entry of the space points at one of its tables (as above).
        let pdpt = unsafe { &*((e4 & ADDRESS) as *const [u64; 512]) };
        for (j, &e3) in pdpt.iter().enumerate().filter(|(_, e)| present(**e)) {
            // SAFETY: likewise, a present directory-pointer entry that is no 1 GiB page.
            let pd = unsafe { &mut *((e3 & ADDRESS) as *mut [u64; 512]) };
            for (k, e2) in pd.iter_mut().enumerate() {
                f(((i as u64) << 39) | ((j as u64) << 30) | ((k as u64) << 21), e2);
            }
        }
    }
}

/// The directory entry (level 2) that covers `addr` in the space `root`, if the tables
/// above it are present.
///
/// # Safety
///
/// As [`leaf_table`]'s: `root` must be a PML4 whose tables are identity-mapped frames, and
/// nothing else may reference the entry while it is in use.
pub unsafe fn directory_entry<'a>(root: u64, addr: u64) -> Option<&'a mut u64> {
    let mut table = root;
    for shift in [39, 30] {
        // SAFETY: per the contract, `table` is one of the space's page tables.
        let entry = unsafe { (*(table as *const [u64; 512]))[((addr >> shift) & 511) as usize] };
        if entry & Flags::PRESENT.bits() == 0 || entry & Flags::HUGE_PAGE.bits() != 0 {
            return None;
        }
        table = entry & ADDRESS;
    }
    // SAFETY: per the contract.
    Some(unsafe { &mut (*(table as *mut [u64; 512]))[((addr >> 21) & 511) as usize] })
}

/// The physical address bits of a table entry.
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// The page table (level 1) that maps `addr` in the space `root`, if every table on the
/// way is present.
///
/// # Safety
///
/// `root` must be a PML4 whose tables are identity-mapped frames, and nothing else may
/// reference the returned table while it is in use.
unsafe fn leaf_table<'a>(root: u64, addr: u64) -> Option<&'a mut PageTable> {
    let mut table = root;
    for shift in [39, 30, 21] {
        // SAFETY: per the contract, `table` is one of the space's page tables.
        let entry = unsafe { &(&*(table as *const PageTable))[((addr >> shift) & 511) as usize] };
        if !entry.flags().contains(Flags::PRESENT) {
            return None;
        }
        table = entry.addr().as_u64();
    }
    // SAFETY: per the contract.
    Some(unsafe { &mut *(table as *mut PageTable) })
}

/// Reloads CR3, flushing the TLB's non-global entries (after dirty bits were cleared).
pub fn flush_tlb() {
    let (frame, flags) = Cr3::read();
    // SAFETY: reloading the current CR3 changes no mapping.
    unsafe { Cr3::write(frame, flags) };
}
