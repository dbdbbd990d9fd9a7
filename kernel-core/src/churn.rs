//! The `churn` workload's bookkeeping: a seeded stream of maps, unmaps and rewrites of
//! regions of random sizes, and the ledger that says what every live region must hold.
//!
//! The stream is hostile on purpose: maps outnumber unmaps, so the process grows until the
//! kernel refuses a map (a table or the frames are exhausted), and goes on from there,
//! unmapping and mapping around every table's capacity. A refused map (or unmap) is
//! counted, and the stream goes on. Every page of a region holds a pattern derived from the region's id,
//! its version (a rewrite bumps it) and the word's place, so a page restored from the wrong
//! save area, another region's frames or an older generation fails [`Ledger::verify`].
//!
//! The ledger lives in a region of its own, mapped first: the process's persistent memory,
//! restored with the data, so that after any restore it describes exactly the regions the
//! process had at that instant. The program (in the guest) makes the system calls; this
//! module only decides and checks. No allocation, no statics, no formatting: it runs in
//! ring 3.
//!
//! | offset | size          | field                                                |
//! |--------|---------------|------------------------------------------------------|
//! | 0      | 8             | magic `CHURNLG1`                                     |
//! | 8      | 8             | capacity (slots)                                     |
//! | 16     | 8             | generator state                                      |
//! | 24     | 8             | most pages of one region                             |
//! | 32     | 8             | operations done                                      |
//! | 40     | 8             | live regions                                         |
//! | 48     | 8             | maps done                                            |
//! | 56     | 8             | maps refused                                         |
//! | 64     | 8             | unmaps done                                          |
//! | 72     | 8             | next region id                                       |
//! | 80     | 8             | running checksum of the operations                   |
//! | 88     | 8             | unmaps refused                                       |
//! | 96     | 24 × capacity | slots: `(address, id, pages, version)` of live regions |

use crate::rng::{mix, SplitMix64};

const MAGIC: u64 = u64::from_le_bytes(*b"CHURNLG1");
const HEADER: usize = 96;
const SLOT: usize = 24;
const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Header {
    magic: u64,
    capacity: u64,
    rng: u64,
    max_pages: u64,
    ops: u64,
    live: u64,
    maps: u64,
    refused: u64,
    unmaps: u64,
    next_id: u64,
    checksum: u64,
    unmaps_refused: u64,
}

/// A live region as the ledger records it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub addr: u64,
    pub id: u64,
    pub pages: u32,
    pub version: u32,
}

/// Why a region cannot hold a ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerError {
    /// Too small for a header and a few slots, or not 8-byte aligned.
    BadRegion,
}

/// What [`Ledger::verify`] found wrong: the first word that differs from its pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub id: u64,
    pub page: u64,
    pub word: u64,
}

/// One operation of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Map a region of this many pages, then [`Ledger::mapped`] or [`Ledger::refused`].
    Map { pages: u64 },
    /// Unmap the live region in this slot, then [`Ledger::unmapped`].
    Unmap { slot: usize },
    /// Write the next version of the live region in this slot ([`Ledger::rewrite`]).
    Rewrite { slot: usize },
}

/// The word at `index` of page `page` of region `id` at `version`.
pub fn pattern(id: u64, version: u32, page: u64, index: u64) -> u64 {
    mix(mix(id ^ (u64::from(version) << 40)) ^ (page << 9 | index))
}

/// The ledger in its region.
pub struct Ledger<'a> {
    header: &'a mut Header,
    slots: &'a mut [Slot],
}

impl<'a> Ledger<'a> {
    /// Formats a new, empty ledger in `region`: the stream of `seed`, regions of
    /// `1..=max_pages` pages (at least 1).
    pub fn format(region: &'a mut [u8], seed: u64, max_pages: u64) -> Result<Self, LedgerError> {
        if region.len() < HEADER + 4 * SLOT || !(region.as_ptr() as usize).is_multiple_of(8) {
            return Err(LedgerError::BadRegion);
        }
        let capacity = (region.len() - HEADER) / SLOT;
        let (head, rest) = region.split_at_mut(HEADER);
        // SAFETY: `head` is 96 bytes, 8-byte aligned (checked above); `Header` is 96 bytes
        // of integers, valid for any bit pattern. `rest` holds `capacity` slots of 24 bytes,
        // 8-byte aligned (96 bytes past an aligned start), integers only. Disjoint halves.
        let (header, slots) = unsafe {
            (
                &mut *(head.as_mut_ptr() as *mut Header),
                core::slice::from_raw_parts_mut(rest.as_mut_ptr() as *mut Slot, capacity),
            )
        };
        *header = Header {
            magic: MAGIC,
            capacity: capacity as u64,
            rng: seed,
            max_pages: max_pages.max(1),
            ops: 0,
            live: 0,
            maps: 0,
            refused: 0,
            unmaps: 0,
            next_id: 1,
            checksum: 0,
            unmaps_refused: 0,
        };
        Ok(Self { header, slots })
    }

    pub fn ops_done(&self) -> u64 {
        self.header.ops
    }
    pub fn live(&self) -> u64 {
        self.header.live
    }
    pub fn maps(&self) -> u64 {
        self.header.maps
    }
    /// Maps the kernel refused (a clean error), counted and gone past.
    pub fn refused(&self) -> u64 {
        self.header.refused
    }
    pub fn unmaps(&self) -> u64 {
        self.header.unmaps
    }
    /// Unmaps the kernel refused (a clean error: the region stays, and stays checked).
    pub fn unmaps_refused(&self) -> u64 {
        self.header.unmaps_refused
    }
    pub fn checksum(&self) -> u64 {
        self.header.checksum
    }

    /// The live region in `slot`.
    pub fn slot(&self, slot: usize) -> Slot {
        self.slots[slot]
    }

    fn live_slots(&self) -> &[Slot] {
        &self.slots[..self.header.live as usize]
    }

    fn count(&mut self, what: u64) {
        self.header.ops += 1;
        self.header.checksum = mix(self.header.checksum ^ what);
    }

    /// The next operation of the stream (advances the generator). `grow`: the stream is
    /// still running (false once its length is reached: then only rewrites are drawn, so
    /// the regions stay as they are and their pages keep changing).
    pub fn next_op(&mut self, grow: bool) -> Op {
        let mut rng = SplitMix64::new(self.header.rng);
        let dice = rng.below(16);
        let pages = if rng.below(8) == 0 { rng.below(self.header.max_pages) + 1 } else { rng.below(2) + 1 };
        let pick = rng.next_u64();
        self.header.rng = rng.state;
        let live = self.header.live;
        let full = live as usize == self.slots.len();
        let slot = ((u128::from(pick) * u128::from(live.max(1))) >> 64) as usize;
        match dice {
            _ if live == 0 || (grow && !full && dice < 10) => Op::Map { pages },
            10..=13 if grow => Op::Unmap { slot },
            _ => Op::Rewrite { slot },
        }
    }

    /// Records a region of `pages` pages mapped at `addr` (zeroed, as `map` gives it) and
    /// returns its slot; the caller then writes its pattern ([`fill`]). `None` if the
    /// ledger is full (the stream maps no more then).
    pub fn mapped(&mut self, addr: u64, pages: u64) -> Option<usize> {
        let at = self.header.live as usize;
        let slot = self.slots.get_mut(at)?;
        let id = self.header.next_id;
        *slot = Slot { addr, id, pages: pages as u32, version: 0 };
        self.header.next_id += 1;
        self.header.maps += 1;
        self.header.live += 1;
        self.count(id);
        Some(at)
    }

    /// Records a map the kernel refused.
    pub fn refused_map(&mut self) {
        self.header.refused += 1;
        self.count(u64::MAX);
    }

    /// Records an unmap the kernel refused: the region is still mapped and kept.
    pub fn refused_unmap(&mut self) {
        self.header.unmaps_refused += 1;
        self.count(u64::MAX - 1);
    }

    /// Forgets the region in `slot` once the kernel unmapped it (the last live slot takes
    /// its place).
    pub fn unmapped(&mut self, slot: usize) {
        let last = self.header.live as usize - 1;
        let gone = self.slots[slot];
        self.slots[slot] = self.slots[last];
        self.header.live -= 1;
        self.header.unmaps += 1;
        self.count(!gone.id);
    }

    /// Bumps the version of the region in `slot`; the caller then writes its pattern again.
    pub fn rewrite(&mut self, slot: usize) -> Slot {
        self.slots[slot].version = self.slots[slot].version.wrapping_add(1);
        let s = self.slots[slot];
        self.count(s.id ^ (u64::from(s.version) << 32));
        s
    }

    /// Checks every page of every live region against its pattern. `region` gives the
    /// words of a live region (the caller, who knows the mapping, makes the slice).
    pub fn verify<'r>(&self, mut region: impl FnMut(&Slot) -> &'r [u64]) -> Result<(), Mismatch> {
        for s in self.live_slots() {
            check(s, region(s))?;
        }
        Ok(())
    }
}

/// Writes the pattern of `slot` into `words` (its region, `pages` pages of words).
pub fn fill(slot: &Slot, words: &mut [u64]) {
    for (page, chunk) in words.chunks_exact_mut(WORDS).enumerate() {
        for (i, w) in chunk.iter_mut().enumerate() {
            *w = pattern(slot.id, slot.version, page as u64, i as u64);
        }
    }
}

/// Checks `words` (the region of `slot`) against its pattern.
pub fn check(slot: &Slot, words: &[u64]) -> Result<(), Mismatch> {
    if words.len() != slot.pages as usize * WORDS {
        return Err(Mismatch { id: slot.id, page: 0, word: 0 });
    }
    for (page, chunk) in words.chunks_exact(WORDS).enumerate() {
        for (i, w) in chunk.iter().enumerate() {
            if *w != pattern(slot.id, slot.version, page as u64, i as u64) {
                return Err(Mismatch { id: slot.id, page: page as u64, word: i as u64 });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
