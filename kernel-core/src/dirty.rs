//! Which user pages a write-out copies, from the page tables' dirty bits, and which dirty
//! bits it clears again (re-arms).
//!
//! Why not re-arm every dirty page: under shadow paging (PVM, and KVM without EPT) a page
//! whose dirty bit the guest cleared is write-protected in the hypervisor's shadow tables,
//! so the program's first write to it after the write-out is a fault and a VM exit. `kv`
//! writes the same pages between every two write-outs: re-arming all of them cost it far
//! more than the write-out itself (a write-out every 10 ms took a fifth to a third of its
//! throughput for a 0.5 ms write-out). A page found dirty at two scans in a row is *hot*:
//! its dirty bit stays set, so its writes run unhindered, and every write-out copies it
//! (copying an unchanged page is always safe: the save area then holds what it held). Every
//! [`REARM_EVERY`]th write-out re-arms every dirty page, so a hot page that went quiet stops
//! being copied.
//!
//! The page-table entry keeps the page's history in [`SEEN`], a bit the CPU ignores:
//! "dirty at the last scan". A page is always reported dirty when its dirty bit is set, so
//! a write since the last scan is never missed, whatever the policy decides.

/// The CPU's dirty bit of a page-table entry.
pub const DIRTY: u64 = 1 << 6;
/// An entry bit the CPU ignores (bit 9, "available to software"): the page was dirty at the
/// last scan.
pub const SEEN: u64 = 1 << 9;
/// A write-out whose generation is a multiple of this re-arms every dirty page, hot ones
/// included. A hot page that went quiet is copied for at most this many write-outs more (a
/// page's copy costs well under a microsecond; a re-armed page's next write, tens).
pub const REARM_EVERY: u64 = 64;

/// Whether the write-out that commits `generation` re-arms every dirty page.
pub fn rearms_all(generation: u64) -> bool {
    generation.is_multiple_of(REARM_EVERY)
}

/// One entry's scan: whether its page is to be copied, and the entry to write back, if it
/// changes (`None`: leave it, which under shadow paging is a write to a page table saved).
/// `rearm_all`: re-arm hot pages too ([`rearms_all`]).
pub fn scan_entry(entry: u64, rearm_all: bool) -> (bool, Option<u64>) {
    match (entry & DIRTY != 0, entry & SEEN != 0) {
        // Dirty for the first time in a row: re-armed, remembered.
        (true, false) => (true, Some((entry & !DIRTY) | SEEN)),
        // Hot: left dirty (copied again next time), unless every page is re-armed now.
        (true, true) if rearm_all => (true, Some(entry & !DIRTY)),
        (true, true) => (true, None),
        // Clean now: forgotten.
        (false, true) => (false, Some(entry & !SEEN)),
        (false, false) => (false, None),
    }
}

#[cfg(test)]
mod tests;
