//! The hash of what the copy engine last wrote at each page, so that a write-out's copy need
//! not read and hash the page it overwrites (`nvram::engine::SUM_OVERWRITTEN`).
//!
//! A write-out moves a save area's sum by what its copies write less what they overwrite.
//! What they overwrite is what a copy wrote there two write-outs before, nearly always the
//! engine's, and the engine hashed those very bytes then: this keeps that hash, per page of
//! guest RAM, with the page's index in its plate (`page_hash` folds it in). Reading and
//! hashing the overwritten pages was half of what the sums cost a write-out.
//!
//! What an entry means, and why that is sound. An area's sum is the sum, over its pages, of
//! the hash of what the copy that last wrote each page wrote there (every copy returns it,
//! and the write-out adds it: `kernel_core::plates`); the restore checks the area's bytes
//! against it. An entry is that hash, for as long as the engine is the last copier of the
//! page that returned sums: a copy that overwrites the page then takes out of the sum
//! exactly what the sum counted for it, and the page then holds exactly what the engine
//! wrote now, so the sum stays the sum of what the write-outs meant the area to hold. A
//! store over the page by anyone else since (a stray store of the guest's, a device) does not
//! change what the sum counted: if a copy overwrites the page, the scribble is gone and the
//! sum is right; if none does, the scribble stays in the area and the restore's check of the
//! whole area refuses it, as before. (Hashing the scribbled bytes instead, as reading the
//! page does, would take out of the sum what it never counted: a good area refused.)
//!
//! So an entry is forgotten only when the sum may count something else for the page: when
//! another copier that returns sums may have written it, or when the engine wrote the page
//! without hashing it as a whole page of a plate:
//!
//! - the guest's CPU copier sums too, and copies a batch when the engine refused it: any
//!   batch that does not end done forgets every entry (the engine copies nothing of a batch
//!   it refuses, but for a sums array it could not write back after copying). It copies
//!   nothing else while the engine is in use (`plate_copy=engine`, for the whole boot);
//! - the engine's own writes that it did not hash as whole pages (copies without sums, a
//!   short page, a destination not page-aligned, its status words and bitmaps) forget their
//!   pages;
//! - the entries live as long as the machine: a power failure (any stop) ends it, and a new
//!   machine, in this process or another, starts with none, so the first copy over each page
//!   reads it.

const PAGE: u64 = nvram::layout::PAGE_SIZE;

/// Per page of guest RAM, the hash of what the engine last wrote there.
pub(super) struct SumCache {
    /// Per page: `[index + 1, hash]`, the page's index in its plate (as the copy's sum
    /// request counts it) and its `page_hash`; `[0, _]`: nothing known. Allocated at the
    /// first entry (zeroed pages, which the host maps lazily).
    entries: Vec<[u64; 2]>,
    pages: u64,
}

impl SumCache {
    /// An empty cache of `ram` bytes of guest RAM.
    pub(super) fn new(ram: u64) -> Self {
        Self { entries: Vec::new(), pages: ram / PAGE }
    }

    /// The hash the engine wrote at the page at `addr` (page-aligned), if it was hashed as
    /// page `index` of its plate.
    pub(super) fn get(&self, addr: u64, index: u64) -> Option<u64> {
        if !addr.is_multiple_of(PAGE) {
            return None;
        }
        let [i, hash] = *self.entries.get((addr / PAGE) as usize)?;
        (i != 0 && i == index.wrapping_add(1)).then_some(hash)
    }

    /// The engine wrote the whole page at `addr` (page-aligned), hashed as page `index`.
    pub(super) fn set(&mut self, addr: u64, index: u64, hash: u64) {
        if !addr.is_multiple_of(PAGE) || addr / PAGE >= self.pages || index == u64::MAX {
            self.forget(addr, PAGE);
            return;
        }
        if self.entries.is_empty() {
            self.entries = vec![[0; 2]; self.pages as usize];
        }
        self.entries[(addr / PAGE) as usize] = [index + 1, hash];
    }

    /// The engine wrote `addr..addr + len` without hashing it page by page.
    pub(super) fn forget(&mut self, addr: u64, len: u64) {
        if len == 0 || self.entries.is_empty() {
            return;
        }
        let first = addr / PAGE;
        let end = addr.saturating_add(len).div_ceil(PAGE).min(self.pages);
        for page in first..end {
            self.entries[page as usize][0] = 0;
        }
    }

    /// Another copier that sums may write anywhere: nothing is known any more.
    pub(super) fn forget_all(&mut self) {
        self.entries = Vec::new();
    }
}
