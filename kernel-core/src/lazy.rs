//! The page-directory entries of a lazy restore (`restore=lazy`): after a crash, every
//! 2 MiB of a process's user address space is *away* until first touched. Its directory
//! entry (level 2, which points at a page table of 512 pages) is made not present and
//! marked [`AWAY`]; the first access anywhere in those 2 MiB faults, and the kernel copies
//! the pages of the user spaces there back from their committed save areas, then makes the
//! entry present again.
//!
//! Why the directory, not each page: under PVM, the first touch of a page by the kernel's
//! work at CPL 3 is a fault of the hypervisor's shadow paging (35 to 45 µs here, by TSC
//! stamps of a restore), so what a restore must touch before the processes run is what it
//! costs. Marking directory entries
//! touches the page-table roots and directories only (a few pages a process); marking each
//! page's entry touched every page table, and the resource table to find them, which cost
//! more than the copy it saved. The page tables themselves are not touched until their
//! 2 MiB come back, and the committed save areas are only ever read, so a crash at any
//! point before the next commit restores the same state again.

/// The CPU's present bit.
pub const PRESENT: u64 = 1;
/// The CPU's user bit (of a page-fault error code: the access came from user mode).
pub const USER: u64 = 1 << 2;
/// The CPU's page-size bit of a directory entry (a 2 MiB page, not a table).
pub const HUGE: u64 = 1 << 7;
/// A bit of a not-present entry (the CPU ignores all of them then): the 2 MiB are away.
pub const AWAY: u64 = 1 << 10;
/// Bytes one directory entry maps.
pub const SPAN: u64 = 2 << 20;

/// The entry that leaves a present directory entry's 2 MiB away; `None` if `entry` does not
/// point at a page table (not present, a 2 MiB page, away already).
pub fn away(entry: u64) -> Option<u64> {
    (entry & (PRESENT | HUGE) == PRESENT).then_some((entry & !PRESENT) | AWAY)
}

/// Whether `entry` is a directory entry whose 2 MiB are away.
pub fn is_away(entry: u64) -> bool {
    entry & (PRESENT | AWAY) == AWAY
}

/// The entry of 2 MiB back: present again, pointing at the same page table.
pub fn back(entry: u64) -> u64 {
    (entry & !AWAY) | PRESENT
}

/// Whether a page fault's error code is an access from user mode to a page not present:
/// the only fault 2 MiB away cause (bits 0 and 2: present, user).
pub fn is_user_not_present(error_code: u64) -> bool {
    error_code & (PRESENT | USER) == USER
}

/// The pages `first..first + n` of a user space at `vaddr` of `pages` pages that lie in the
/// 2 MiB at `base` (`n` = 0: none).
pub fn pages_in_span(vaddr: u64, pages: u64, base: u64) -> (u64, u64) {
    const PAGE: u64 = 4096;
    let end = vaddr.saturating_add(pages.saturating_mul(PAGE));
    let (lo, hi) = (vaddr.max(base), end.min(base.saturating_add(SPAN)));
    if lo >= hi {
        return (0, 0);
    }
    ((lo - vaddr) / PAGE, (hi - lo).div_ceil(PAGE))
}

#[cfg(test)]
mod tests;
