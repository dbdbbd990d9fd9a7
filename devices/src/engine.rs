//! The copy engine (`nvram::engine`): copies guest memory for the guest at the host's
//! memory speed. Everything in a batch is checked before anything is copied, so a bad batch
//! changes nothing but its status; nothing outside guest RAM is ever touched. Asked to, it
//! returns the content checksums of what it wrote and overwrote, computed as it copies
//! (`nvram::plate::AreaSum`): a write-out then never reads a page a second time. It hashes
//! sixteen pages at a time in vector lanes (`hash`), and keeps the hash of what it wrote last
//! at each page (`cache`): what a copy overwrites is mostly that, and is then neither read
//! nor hashed again. A large batch whose copies are apart (a write-out's, a restore's) is
//! copied and hashed on two host threads at once (`parallel`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use nvram::engine::{
    BatchHeader, Completion, Descriptor, DirtyRequest, RangeSum, BATCH_MAGIC, COMPLETION_OFFSET, DIRTY_MAGIC,
    DIRTY_STATUS_OFFSET, ENGINE_ID, FLAG_DURABLE, FLAG_SUM_ONLY, MAX_DESCRIPTORS, REG_DIRTY, STATUS_BAD_BATCH,
    STATUS_BAD_DESCRIPTOR, STATUS_DONE, STATUS_UNSUPPORTED, SUM_OVERWRITTEN,
};
use nvram::persist::FlushedRange;
use tracing::{warn, Level};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::dirty::{DirtyTracker, DirtyView};
use crate::persistence::PersistenceDomain;
use crate::{BusDevice, LogLimit};
use cache::SumCache;
pub use parallel::BatchAhead;
use parallel::{copies_apart, copy_apart, sum_apart, Copier};
use summed::{source_sum, SummedCopies, PAGE};

/// What the engine has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub batches: u64,
    pub copies: u64,
    pub bytes: u64,
    pub rejected: u64,
    /// Batches copied (and hashed) on two threads (`parallel`), their chunks of pages, and
    /// of those the chunks the second thread did.
    pub parallel: u64,
    pub chunks: u64,
    pub second_thread_chunks: u64,
    /// Bytes summed by batches of sums alone (`FLAG_SUM_ONLY`), not in `bytes`.
    pub summed_only: u64,
    /// Host time spent in batches, from the doorbell to the status (checks, copies,
    /// persistence): what the engine costs, apart from the guest's side of it.
    pub busy: std::time::Duration,
}

pub struct CopyEngine {
    mem: GuestMemoryMmap<()>,
    stats: Arc<Mutex<EngineStats>>,
    /// Where the copies become durable.
    domain: Arc<Mutex<PersistenceDomain>>,
    dirty_log: Option<(Arc<Mutex<DirtyTracker>>, DirtyView)>,
    /// A pause halfway through every batch (tests: a crash then leaves a batch half done).
    pause: Option<std::time::Duration>,
    rejects_log: LogLimit,
    /// The hash of what the engine last wrote at each page (`cache`: why it is sound).
    cache: SumCache,
    /// Where a summed copy reads a page that it cannot hash in place.
    buffer: Box<[u8; PAGE]>,
    /// The second thread that copies and hashes a large batch whose copies are apart,
    /// started at the first such batch (`None` after that: one CPU, or no thread).
    copier: Option<Copier>,
    /// Whether it was started (or is not wanted).
    copier_tried: bool,
}

impl CopyEngine {
    pub fn new(mem: GuestMemoryMmap<()>, domain: Arc<Mutex<PersistenceDomain>>) -> Self {
        let rejects_log = LogLimit::per_second("copy engine refused request", Level::WARN, 16);
        let ram = mem.last_addr().0 + 1;
        Self {
            mem,
            stats: Arc::default(),
            domain,
            dirty_log: None,
            pause: None,
            rejects_log,
            cache: SumCache::new(ram),
            buffer: Box::new([0; PAGE]),
            copier: None,
            copier_tried: false,
        }
    }

    /// Copies and hashes on the vCPU's thread alone, never on a second one (to measure
    /// what the second saves; the copies and sums are the same).
    pub fn single_threaded(mut self) -> Self {
        self.copier_tried = true;
        self.copier = None;
        self
    }

    /// A handle for the machine-control device, which tells the engine when a write-out
    /// starts so that its second thread is awake for the batch (`parallel`). `None` when
    /// the engine copies on one thread. Starts the second thread.
    pub fn batch_ahead(&mut self) -> Option<BatchAhead> {
        self.start_second_thread();
        self.copier.as_ref().and_then(Copier::ahead)
    }

    /// Starts the second thread, once (it stays `None` on a host with one CPU, or after
    /// [`CopyEngine::single_threaded`]).
    fn start_second_thread(&mut self) {
        if !self.copier_tried {
            self.copier_tried = true;
            self.copier = Copier::spawn();
        }
    }

    /// Pauses halfway through every batch: a slow engine, for crash tests.
    pub fn with_pause(mut self, pause: std::time::Duration) -> Self {
        self.pause = Some(pause);
        self
    }

    /// Also answers dirty-log requests, from a view of its own of `tracker`.
    pub fn with_dirty_log(mut self, tracker: Arc<Mutex<DirtyTracker>>) -> Self {
        let view = lock(&tracker).view();
        self.dirty_log = Some((tracker, view));
        self
    }

    fn domain(&self) -> std::sync::MutexGuard<'_, PersistenceDomain> {
        lock(&self.domain)
    }

    /// Writes `bytes` into guest RAM at `addr` for the guest (a status, a bitmap): a store
    /// like the CPU's, not durable until the guest writes it back.
    fn store(&mut self, bytes: &[u8], addr: u64) -> bool {
        let ok = self.mem.write_slice(bytes, GuestAddress(addr)).is_ok();
        if ok {
            self.cache.forget(addr, bytes.len() as u64);
            self.domain().stored(addr, bytes.len() as u64);
        }
        ok
    }

    /// Answers the dirty-log request at `addr`; returns its status (`None`: no request there).
    fn dirty(&mut self, addr: u64) -> Option<u32> {
        let mut request = DirtyRequest::default();
        if !addr.is_multiple_of(8) || self.mem.read_slice(request.as_mut_bytes(), GuestAddress(addr)).is_err() {
            return None;
        }
        let DirtyRequest { magic, first_page: first, pages, out, .. } = request;
        let ram_pages = self.ram() / 4096;
        let words = pages.div_ceil(64);
        let fits = first.checked_add(pages).is_some_and(|end| end <= ram_pages)
            && out.checked_add(words * 8).is_some_and(|end| end <= self.ram())
            && out.is_multiple_of(8);
        if magic != DIRTY_MAGIC || !fits {
            return Some(STATUS_BAD_BATCH);
        }
        let Some(log) = self.dirty_log.as_ref().and_then(|(tracker, view)| lock(tracker).take(*view)) else {
            return Some(STATUS_UNSUPPORTED);
        };
        let bit = |page: u64| log.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0);
        let mut bitmap = vec![0u64; words as usize];
        for (w, word) in bitmap.iter_mut().enumerate() {
            let base = first + w as u64 * 64;
            // Whole words of the log when aligned; bit by bit otherwise.
            if base.is_multiple_of(64) && pages - w as u64 * 64 >= 64 {
                *word = log.get((base / 64) as usize).copied().unwrap_or(0);
            } else {
                for i in 0..(pages - w as u64 * 64).min(64) {
                    if bit(base + i) {
                        *word |= 1 << i;
                    }
                }
            }
        }
        if !self.store(bitmap.as_bytes(), out) {
            return Some(STATUS_BAD_BATCH);
        }
        Some(STATUS_DONE)
    }

    pub fn stats(&self) -> Arc<Mutex<EngineStats>> {
        self.stats.clone()
    }

    fn ram(&self) -> u64 {
        self.mem.last_addr().0 + 1
    }

    /// Runs the batch at `addr`; returns its status and failing index.
    fn run(&mut self, addr: u64) -> Option<(u32, u32)> {
        let started = Instant::now();
        let mut header = BatchHeader::default();
        if !addr.is_multiple_of(8) || self.mem.read_slice(header.as_mut_bytes(), GuestAddress(addr)).is_err() {
            // No header to write a status into.
            return None;
        }
        let sum_only = header.flags & FLAG_SUM_ONLY != 0;
        if header.magic != BATCH_MAGIC
            || header.count > MAX_DESCRIPTORS
            || header.flags & !(FLAG_DURABLE | FLAG_SUM_ONLY) != 0
            || !header.descriptors.is_multiple_of(8)
            || (sum_only && header.sums == 0)
        {
            return Some((STATUS_BAD_BATCH, 0));
        }
        let mut descriptors = vec![Descriptor::default(); header.count as usize];
        if self.mem.read_slice(descriptors.as_mut_bytes(), GuestAddress(header.descriptors)).is_err() {
            return Some((STATUS_BAD_BATCH, 0));
        }
        // The sums asked for, one per descriptor (none: `sums` is 0).
        let summed = header.sums != 0;
        let mut sums = vec![RangeSum::default(); if summed { descriptors.len() } else { 0 }];
        if summed
            && (!header.sums.is_multiple_of(8)
                || self.mem.read_slice(sums.as_mut_bytes(), GuestAddress(header.sums)).is_err())
        {
            return Some((STATUS_BAD_BATCH, 0));
        }
        let ram = self.ram();
        // Sums alone read only the sources, and move nothing that they could overwrite.
        let known_flags = if sum_only { 0 } else { SUM_OVERWRITTEN };
        for (i, &d) in descriptors.iter().enumerate() {
            let unknown_flags = sums.get(i).is_some_and(|s| s.flags & !known_flags != 0);
            if let Err(e) = if sum_only { d.check_source(ram) } else { d.check(ram) } {
                self.reject(&format_args!(
                    "copy engine: descriptor {i} of the batch at {addr:#x} refused ({e:?}): {d:x?}"
                ));
                return Some((STATUS_BAD_DESCRIPTOR, i as u32));
            }
            if unknown_flags {
                self.reject(&format_args!("copy engine: sum {i} of the batch at {addr:#x} has an unknown flag"));
                return Some((STATUS_BAD_DESCRIPTOR, i as u32));
            }
        }
        let bytes: u64 = descriptors.iter().map(|d| d.len).sum();
        if sum_only {
            return Some(self.sums_alone(&header, &descriptors, &mut sums, bytes, started));
        }
        // The pause cuts a batch in two halves, copied in order: one thread for it.
        let apart = bytes >= parallel::WORTH_FROM && self.pause.is_none() && copies_apart(&descriptors);
        if apart {
            self.start_second_thread();
        }
        let mut chunks = None;
        if let (true, Some(copier)) = (apart, self.copier.as_mut()) {
            let sums = summed.then_some(&mut sums[..]);
            chunks = copy_apart(&self.mem, &mut self.cache, &mut self.buffer, copier, &descriptors, sums);
            if chunks.is_none() {
                return Some((STATUS_BAD_BATCH, 0));
            }
        } else {
            let mut summing = SummedCopies::new(sums.len(), &mut self.cache, &mut self.buffer);
            for (i, d) in descriptors.iter().enumerate() {
                if i == descriptors.len() / 2 {
                    if let Some(pause) = self.pause {
                        std::thread::sleep(pause);
                    }
                }
                // Checked above: both ranges are inside the one RAM region.
                let (Ok(src), Ok(dst)) = (
                    self.mem.get_slice(GuestAddress(d.src), d.len as usize),
                    self.mem.get_slice(GuestAddress(d.dst), d.len as usize),
                ) else {
                    return Some((STATUS_BAD_BATCH, 0));
                };
                match sums.get_mut(i) {
                    Some(sum) => summing.copy(i, d, &src, &dst, sum),
                    None => src.copy_to_volatile_slice(dst),
                }
            }
            summing.finish(&mut sums);
        }
        if !summed {
            for d in &descriptors {
                self.cache.forget(d.dst, d.len);
            }
        }
        // After the copies: a sums array that a copy overwrote gets the sums all the same.
        if summed && !self.store(sums.as_bytes(), header.sums) {
            return Some((STATUS_BAD_BATCH, 0));
        }
        // Durable copies count as written back (under eADR they are already in the image);
        // the others are stores like the CPU's.
        let mut domain = self.domain();
        if header.flags & FLAG_DURABLE != 0 {
            let durable: Vec<FlushedRange> =
                descriptors.iter().map(|d| FlushedRange { addr: d.dst, len: d.len }).collect();
            if let Err(e) = domain.write_back(&durable) {
                // Checked above: every destination is inside guest RAM.
                warn!("copy engine: {e}");
            }
        } else {
            for d in &descriptors {
                domain.stored(d.dst, d.len);
            }
        }
        drop(domain);
        self.count_batch(descriptors.len(), [bytes, 0], chunks, started);
        Some((STATUS_DONE, 0))
    }

    /// Counts a batch done: its descriptors, its bytes `[copied, summed alone]`, its chunks
    /// on two threads (all, the second thread's) if it ran there, its host time.
    fn count_batch(&self, copies: usize, [copied, summed]: [u64; 2], chunks: Option<[u64; 2]>, started: Instant) {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.batches += 1;
        stats.copies += copies as u64;
        stats.bytes += copied;
        stats.summed_only += summed;
        if let Some([all, second]) = chunks {
            stats.parallel += 1;
            stats.chunks += all;
            stats.second_thread_chunks += second;
        }
        stats.busy += started.elapsed();
    }

    /// A checked [`FLAG_SUM_ONLY`] batch: the sums of its sources, on both threads when it is
    /// large (nothing is written, so the descriptors are always apart), into the batch's
    /// sums array; its status.
    fn sums_alone(
        &mut self,
        header: &BatchHeader,
        descriptors: &[Descriptor],
        sums: &mut [RangeSum],
        bytes: u64,
        started: Instant,
    ) -> (u32, u32) {
        let large = bytes >= parallel::WORTH_FROM;
        if large {
            self.start_second_thread();
        }
        let mut chunks = None;
        match self.copier.as_mut().filter(|_| large) {
            Some(copier) => {
                chunks = sum_apart(&self.mem, copier, descriptors, sums);
                if chunks.is_none() {
                    return (STATUS_BAD_BATCH, 0);
                }
            }
            None => {
                for (d, sum) in descriptors.iter().zip(sums.iter_mut()) {
                    // Checked above: the source is inside RAM.
                    let Ok(src) = self.mem.get_slice(GuestAddress(d.src), d.len as usize) else {
                        return (STATUS_BAD_BATCH, 0);
                    };
                    (sum.written, sum.overwritten) = (source_sum(&src, sum.first), 0);
                }
            }
        }
        if !self.store(sums.as_bytes(), header.sums) {
            return (STATUS_BAD_BATCH, 0);
        }
        self.count_batch(descriptors.len(), [0, bytes], chunks, started);
        (STATUS_DONE, 0)
    }

    fn reject(&mut self, why: &dyn std::fmt::Display) {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.rejected += 1;
        if self.rejects_log.allow_now() {
            warn!("{why}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice<u16> for CopyEngine {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&ENGINE_ID.to_le_bytes()),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (REG_DIRTY, &[a, b, c, d]) = (offset, data) {
            let addr = u64::from(u32::from_le_bytes([a, b, c, d]));
            match self.dirty(addr) {
                Some(status) => {
                    if status != STATUS_DONE {
                        self.reject(&format_args!(
                            "copy engine: dirty-log request at {addr:#x} failed with status {status}"
                        ));
                    }
                    self.store(status.as_bytes(), addr + DIRTY_STATUS_OFFSET);
                }
                None => self.reject(&format_args!("copy engine: no dirty-log request at {addr:#x}")),
            }
            return;
        }
        let (0, &[a, b, c, d]) = (offset, data) else {
            self.reject(&format_args!("copy engine: write of {} bytes at offset {offset} ignored", data.len()));
            return;
        };
        let addr = u64::from(u32::from_le_bytes([a, b, c, d]));
        let outcome = self.run(addr);
        if outcome.is_none_or(|(status, _)| status != STATUS_DONE) {
            // The guest copies a batch the engine refused by itself, its CPU copier summing
            // too: the hashes kept may no longer be what the save areas' sums count.
            self.cache.forget_all();
        }
        match outcome {
            Some((status, failed)) => {
                if status != STATUS_DONE {
                    self.reject(&format_args!("copy engine: batch at {addr:#x} failed with status {status}"));
                }
                self.store(Completion { status, failed }.as_bytes(), addr + COMPLETION_OFFSET);
            }
            None => self.reject(&format_args!("copy engine: no batch at {addr:#x}")),
        }
    }
}

mod cache;
#[cfg(test)]
mod cache_tests;
mod parallel;
#[cfg(test)]
mod parallel_tests;
mod summed;
#[cfg(test)]
mod tests;
