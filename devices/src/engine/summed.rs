//! A batch's copies with their content checksums (`nvram::engine::RangeSum`).
//!
//! Each page a copy writes is hashed just after it is written, while it is in the host's
//! cache, and [`GROUP`] pages at a time: a write-out's copies are mostly runs of a few
//! pages, so the pages of several copies of the batch wait in a group together (the vector
//! path needs eight to be fast). What a copy overwrites is hashed before it is written: by
//! the hash the engine kept of what it wrote there (`cache`: what the area's sum counts for
//! the page), else by reading the page.

use nvram::engine::{Descriptor, RangeSum};
use nvram::layout::PAGE_SIZE;
use nvram::plate::{page_hash, AreaSum};
use vm_memory::VolatileSlice;
use zerocopy::IntoBytes;

use super::cache::SumCache;
use super::hash::{hash_group, GROUP, PAGE_WORDS};

const PAGE: usize = PAGE_SIZE as usize;

/// A page written and not hashed yet.
#[derive(Clone, Copy)]
struct Waiting {
    /// Where the host maps it (word-aligned).
    host: *const [u64; PAGE_WORDS],
    /// Its guest address, and its index in its plate.
    addr: u64,
    index: u64,
    /// The copy that wrote it.
    copy: usize,
}

/// What fills the unused places of a group.
static NO_PAGE: [u64; PAGE_WORDS] = [0; PAGE_WORDS];
const NOT_WAITING: Waiting = Waiting { host: &NO_PAGE, addr: 0, index: 0, copy: usize::MAX };

/// Sets `sum.overwritten` (when asked for) to the sum of what the copy to `dst` (at guest
/// address `at`) is about to overwrite: each page by the hash the engine kept of what it
/// wrote there, else read into `buffer` and hashed. `false` if a page could not be read.
pub(super) fn overwritten_sum(
    cache: &SumCache,
    buffer: &mut [u64; PAGE_WORDS],
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
                let bytes = &mut buffer.as_mut_bytes()[..page_len];
                old.copy_to(bytes);
                overwritten.page(bytes);
            }
            (None, Err(_)) => return false,
        }
    }
    sum.overwritten = overwritten.sum();
    true
}

/// The sums of a batch's copies under way.
pub(super) struct SummedCopies<'a> {
    cache: &'a mut SumCache,
    /// Where a page is read that cannot be hashed in place.
    buffer: &'a mut [u64; PAGE_WORDS],
    /// Per copy, the sum of what it wrote so far.
    written: Vec<AreaSum>,
    waiting: [Waiting; GROUP],
    count: usize,
}

impl<'a> SummedCopies<'a> {
    pub(super) fn new(copies: usize, cache: &'a mut SumCache, buffer: &'a mut [u64; PAGE_WORDS]) -> Self {
        Self { cache, buffer, written: vec![AreaSum::new(0); copies], waiting: [NOT_WAITING; GROUP], count: 0 }
    }

    /// Copies `src` to `dst` (descriptor `d`, copy number `i` of the batch; both slices as
    /// long, checked against RAM), with `sum`'s request: its overwritten sum now, its written
    /// one in [`SummedCopies::finish`].
    pub(super) fn copy(
        &mut self,
        i: usize,
        d: &Descriptor,
        src: &VolatileSlice<'_, ()>,
        dst: &VolatileSlice<'_, ()>,
        sum: &mut RangeSum,
    ) {
        // A page waiting in the group that this copy overwrites is hashed first.
        if self.waiting[..self.count].iter().any(|w| w.addr < d.dst + d.len && d.dst < w.addr + PAGE as u64) {
            self.hash_waiting();
        }
        if let Some(written) = self.written.get_mut(i) {
            *written = AreaSum::new(sum.first);
        }
        let len = src.len().min(dst.len());
        let pages = len.div_ceil(PAGE);
        let page_at = |k: usize| d.dst + (k * PAGE) as u64;
        if !overwritten_sum(self.cache, self.buffer, d.dst, dst, sum) {
            return;
        }
        src.copy_to_volatile_slice(*dst);
        for k in 0..pages {
            let page_len = (len - k * PAGE).min(PAGE);
            let Ok(page) = dst.subslice(k * PAGE, page_len) else { return };
            let host: *const [u64; PAGE_WORDS] = page.ptr_guard().as_ptr().cast();
            // The guest's first index, any value: it wraps as `AreaSum`'s count does.
            let index = sum.first.wrapping_add(k as u64);
            if page_len == PAGE && host.cast::<u64>().is_aligned() {
                self.wait(Waiting { host, addr: page_at(k), index, copy: i });
                continue;
            }
            // A short page, or one not aligned for words: hashed now, and not kept.
            let bytes = &mut self.buffer.as_mut_bytes()[..page_len];
            page.copy_to(bytes);
            let hash = page_hash(index, bytes);
            if let Some(written) = self.written.get_mut(i) {
                written.add_hash(hash);
            }
            self.cache.forget(page_at(k), page_len as u64);
        }
    }

    fn wait(&mut self, page: Waiting) {
        if self.count == GROUP {
            self.hash_waiting();
        }
        self.waiting[self.count] = page;
        self.count += 1;
    }

    /// Hashes the pages waiting, adds each to its copy's sum, and keeps the hashes.
    fn hash_waiting(&mut self) {
        let n = core::mem::take(&mut self.count);
        let waiting = self.waiting;
        let waiting = &waiting[..n];
        if waiting.is_empty() {
            return;
        }
        let mut pages = [&NO_PAGE; GROUP];
        let mut indices = [0; GROUP];
        for (k, w) in waiting.iter().enumerate() {
            // SAFETY: each page is a whole page of guest RAM, word-aligned, mapped for as
            // long as the engine holds the memory (the whole batch); none was written since
            // its copy (a copy over a waiting page hashes it first), and nothing else writes
            // guest RAM while the batch runs: the guest's one vCPU waits in the engine, and
            // the other devices run on its thread.
            pages[k] = unsafe { &*w.host };
            indices[k] = w.index;
        }
        let mut hashes = [0; GROUP];
        let n = waiting.len();
        hash_group(&pages[..n], &indices[..n], &mut hashes[..n]);
        for (w, &hash) in waiting.iter().zip(&hashes) {
            if let Some(written) = self.written.get_mut(w.copy) {
                written.add_hash(hash);
            }
            self.cache.set(w.addr, w.index, hash);
        }
    }

    /// The written sums, into the requests.
    pub(super) fn finish(mut self, sums: &mut [RangeSum]) {
        self.hash_waiting();
        for (sum, written) in sums.iter_mut().zip(&self.written) {
            sum.written = written.sum();
        }
    }
}
