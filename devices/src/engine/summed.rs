//! A batch's copies with their content checksums (`nvram::engine::RangeSum`).
//!
//! Each page a copy writes is hashed just after its copy, while it is in the host's cache.
//! What a copy overwrites is hashed before it is written: by the hash the engine kept of
//! what it wrote there (`cache`: what the area's sum counts for the page), else by reading
//! the page.

use nvram::engine::{Descriptor, RangeSum};
use nvram::layout::PAGE_SIZE;
use nvram::plate::{page_hash, AreaSum};
use vm_memory::VolatileSlice;

use super::cache::SumCache;

pub(super) const PAGE: usize = PAGE_SIZE as usize;

/// Sets `sum.overwritten` (when asked for) to the sum of what the copy to `dst` (at guest
/// address `at`) is about to overwrite: each page by the hash the engine kept of what it
/// wrote there, else read into `buffer` and hashed. `false` if a page could not be read.
pub(super) fn overwritten_sum(
    cache: &SumCache,
    buffer: &mut [u8; PAGE],
    at: u64,
    dst: &VolatileSlice<'_, ()>,
    sum: &mut RangeSum,
) -> bool {
    if !sum.wants_overwritten() {
        sum.overwritten = 0;
        return true;
    }
    let len = dst.len();
    let mut overwritten = AreaSum::new(sum.first);
    for k in 0..len.div_ceil(PAGE) {
        let page_len = (len - k * PAGE).min(PAGE);
        let page_at = at + (k * PAGE) as u64;
        let kept = (page_len == PAGE).then(|| cache.get(page_at, overwritten.next_index())).flatten();
        match (kept, dst.subslice(k * PAGE, page_len)) {
            (Some(hash), _) => overwritten.add_hash(hash),
            (None, Ok(old)) => {
                let bytes = &mut buffer[..page_len];
                old.copy_to(bytes);
                overwritten.page(bytes);
            }
            (None, Err(_)) => return false,
        }
    }
    sum.overwritten = overwritten.sum();
    true
}

/// `area_sum` of `src` (guest RAM, its first page page `first` of its plate), hashed in
/// place: a [`FLAG_SUM_ONLY`](nvram::engine::FLAG_SUM_ONLY) batch's descriptor on one
/// thread.
pub(super) fn source_sum(src: &VolatileSlice<'_, ()>, first: u64) -> u64 {
    let mut sum = AreaSum::new(first);
    let from = src.ptr_guard().as_ptr();
    for k in 0..src.len().div_ceil(PAGE) {
        let len = (src.len() - k * PAGE).min(PAGE);
        // SAFETY: `len` bytes of guest RAM inside the slice, mapped for as long as the
        // engine holds the memory, only read; nothing writes guest RAM while the batch runs
        // (the guest's one vCPU waits in the engine, the other devices run on its thread).
        let bytes = unsafe { core::slice::from_raw_parts(from.add(k * PAGE), len) };
        sum.page(bytes);
    }
    sum.sum()
}

/// The sums of a batch's copies under way.
pub(super) struct SummedCopies<'a> {
    cache: &'a mut SumCache,
    /// Where a page is read that cannot be hashed in place.
    buffer: &'a mut [u8; PAGE],
    /// Per copy, the sum of what it wrote.
    written: Vec<AreaSum>,
}

impl<'a> SummedCopies<'a> {
    pub(super) fn new(copies: usize, cache: &'a mut SumCache, buffer: &'a mut [u8; PAGE]) -> Self {
        Self { cache, buffer, written: vec![AreaSum::new(0); copies] }
    }

    /// Copies `src` to `dst` (descriptor `d`, copy number `i` of the batch; both slices as
    /// long, checked against RAM), with `sum`'s request: its overwritten sum before the
    /// copy, its written one after, page by page.
    pub(super) fn copy(
        &mut self,
        i: usize,
        d: &Descriptor,
        src: &VolatileSlice<'_, ()>,
        dst: &VolatileSlice<'_, ()>,
        sum: &mut RangeSum,
    ) {
        let mut written = AreaSum::new(sum.first);
        if !overwritten_sum(self.cache, self.buffer, d.dst, dst, sum) {
            return;
        }
        src.copy_to_volatile_slice(*dst);
        let len = src.len().min(dst.len());
        for k in 0..len.div_ceil(PAGE) {
            let page_len = (len - k * PAGE).min(PAGE);
            let Ok(page) = dst.subslice(k * PAGE, page_len) else { return };
            let (addr, index) = (d.dst + (k * PAGE) as u64, written.next_index());
            // SAFETY: `page_len` bytes of guest RAM just written, mapped for as long as the
            // engine holds the memory; nothing else writes guest RAM while the batch runs:
            // the guest's one vCPU waits in the engine, and the other devices run on its
            // thread.
            let bytes = unsafe { core::slice::from_raw_parts(page.ptr_guard().as_ptr(), page_len) };
            let hash = page_hash(index, bytes);
            written.add_hash(hash);
            if page_len == PAGE {
                self.cache.set(addr, index, hash);
            } else {
                // A short page is not what a plate's page hashes to: not kept.
                self.cache.forget(addr, page_len as u64);
            }
        }
        if let Some(sum) = self.written.get_mut(i) {
            *sum = written;
        }
    }

    /// The written sums, into the requests.
    pub(super) fn finish(self, sums: &mut [RangeSum]) {
        for (sum, written) in sums.iter_mut().zip(&self.written) {
            sum.written = written.sum();
        }
    }
}
