//! A batch of copies that are apart (a write-out's, a restore's) copied, and hashed, on two
//! host threads at once.
//!
//! One thread copying 3 MB of a write-out in runs of a few pages reaches about half of
//! what the host's memory moves, and hashing what it copied, for the sums, took as long
//! again as a third of the copy: the guest's vCPU waits for both. When no copy of a batch
//! writes a byte that another copy reads or writes, the order of its pages makes no
//! difference to what the batch leaves, so the vCPU's thread and a second thread take the
//! pages a chunk at a time from the same counter, each copying its chunk and hashing it
//! while it is in its cache. The vCPU's thread never waits for the second one to start:
//! on a host with no core to spare it takes every chunk itself, as a single thread would.
//!
//! Waking a sleeping thread takes this host tens of microseconds, a good part of a batch:
//! the machine-control device tells the engine when a write-out starts ([`BatchAhead`]),
//! and the second thread then waits for the batch awake, for at most [`AHEAD_SPIN`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvram::engine::{Descriptor, RangeSum};
use nvram::plate::{page_hash, AreaSum};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::cache::SumCache;
use super::summed::{overwritten_sum, PAGE};

/// Pages a thread takes at once: a few microseconds of work, so that the vCPU's thread
/// waits little for the other's last chunk.
const CHUNK: usize = 16;

/// A batch is worth two threads from this many bytes (waking the second costs a few
/// microseconds).
pub(super) const WORTH_FROM: u64 = 256 << 10;

/// What a batch's pages get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Work {
    Copy,
    /// Copied, then what was written hashed.
    CopyAndHash,
    /// Only the source hashed (`nvram::engine::FLAG_SUM_ONLY`; `dst` is not used).
    Hash,
}

/// One page of a copy, or its short last part: where from, where to (host addresses), and
/// its index in its plate.
#[derive(Clone, Copy, Debug)]
pub(super) struct PageCopy {
    pub src: *const u8,
    pub dst: *mut u8,
    pub len: usize,
    pub index: u64,
}

/// A batch under way, shared by the two threads.
struct Shared {
    pages: Vec<PageCopy>,
    work: Work,
    /// Per page, its hash once its chunk is done (when hashed).
    hashes: Vec<AtomicU64>,
    /// The next chunk to take.
    next: AtomicUsize,
    /// Chunks done.
    done: AtomicUsize,
    /// Chunks the second thread did.
    second: AtomicUsize,
    /// The second thread panicked in a chunk: that chunk is not done.
    failed: AtomicBool,
}

// SAFETY: the pages' pointers are only dereferenced by the thread that took their chunk
// from `next`, and a chunk can be taken only while the batch's caller waits for `done` to
// count it (`Copier::run`): a second thread that wakes late finds nothing to take.
unsafe impl Send for Shared {}
// SAFETY: as for `Send`; everything else is atomics.
unsafe impl Sync for Shared {}

impl Shared {
    fn chunks(&self) -> usize {
        self.pages.len().div_ceil(CHUNK)
    }

    /// Takes chunks and does them until none is left (`second`: on the second thread).
    fn work(&self, second: bool) {
        loop {
            let chunk = self.next.fetch_add(1, Ordering::AcqRel);
            if chunk >= self.chunks() {
                return;
            }
            let start = chunk * CHUNK;
            let end = (start + CHUNK).min(self.pages.len());
            // No hashes without sums.
            let hashes = self.hashes.get(start..end).unwrap_or_default();
            // SAFETY: what `Copier::run`'s caller promises of the pages; this thread took
            // the chunk, so no other touches its pages.
            unsafe { do_chunk(&self.pages[start..end], self.work, hashes) };
            if second {
                self.second.fetch_add(1, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// Copies `pages`, then hashes what each wrote into `out` while the chunk is in the cache;
/// or only hashes their sources.
///
/// # Safety
///
/// As [`Copier::run`]'s.
unsafe fn do_chunk(pages: &[PageCopy], work: Work, out: &[AtomicU64]) {
    if work != Work::Hash {
        for p in pages {
            // SAFETY: as the caller promises: readable `src`, writable `dst`, apart.
            unsafe { core::ptr::copy_nonoverlapping(p.src, p.dst, p.len) };
        }
    }
    for (p, out) in pages.iter().zip(out) {
        let at = if work == Work::Hash { p.src } else { p.dst.cast_const() };
        // SAFETY: `len` bytes just written (or read), that no one writes until the batch is
        // done.
        let bytes = unsafe { core::slice::from_raw_parts(at, p.len) };
        out.store(page_hash(p.index, bytes), Ordering::Relaxed);
    }
}

/// The longest the second thread waits awake for a batch after a write-out started: a
/// write-out's copies come within a millisecond of its start.
pub(super) const AHEAD_SPIN: Duration = Duration::from_millis(1);

/// What the second thread is told.
enum Message {
    Batch(Arc<Shared>),
    /// A write-out started: its batch comes soon.
    Soon,
    /// The engine is gone: end (the machine-control device may still hold a sender).
    Stop,
}

/// Tells the copy engine's second thread that a write-out started, so that it is awake
/// when the write-out's batch comes (`MachineControl::with_batch_ahead`).
#[derive(Clone)]
pub struct BatchAhead {
    messages: Sender<Message>,
    /// Whether the engine has had a batch for two threads yet: a machine whose write-outs
    /// do not use the engine (the CPU copier, a disk) never wakes the thread.
    used: Arc<AtomicBool>,
    /// A `Soon` is in the thread's inbox: a guest that reports starts faster than the thread
    /// takes them queues one, not one per report.
    soon: Arc<AtomicBool>,
}

impl BatchAhead {
    /// A write-out started; returns whether the second thread was told (not before the
    /// engine's first batch for two threads, nor while it has not taken the last word yet,
    /// nor once it is gone).
    pub fn write_out_started(&self) -> bool {
        self.used.load(Ordering::Relaxed)
            && !self.soon.swap(true, Ordering::AcqRel)
            && self.messages.send(Message::Soon).is_ok()
    }
}

/// The second thread.
pub(super) struct Copier {
    messages: Option<Sender<Message>>,
    thread: Option<JoinHandle<()>>,
    used: Arc<AtomicBool>,
    soon: Arc<AtomicBool>,
}

/// The second thread's life: batches as they come, and after a write-out's start, awake
/// until its batch (or [`AHEAD_SPIN`]).
fn second_thread(inbox: Receiver<Message>, soon: &AtomicBool) {
    while let Ok(message) = inbox.recv() {
        if matches!(message, Message::Soon) {
            soon.store(false, Ordering::Release);
        }
        let batch = match message {
            Message::Stop => return,
            Message::Batch(batch) => Some(batch),
            Message::Soon => {
                let until = Instant::now() + AHEAD_SPIN;
                loop {
                    match inbox.try_recv() {
                        Ok(Message::Batch(batch)) => break Some(batch),
                        Ok(Message::Soon) => soon.store(false, Ordering::Release),
                        Ok(Message::Stop) => return,
                        Err(TryRecvError::Disconnected) => return,
                        Err(TryRecvError::Empty) if Instant::now() >= until => break None,
                        Err(TryRecvError::Empty) => std::hint::spin_loop(),
                    }
                }
            }
        };
        if let Some(batch) = batch {
            // A panic here would leave the batch's caller waiting for the chunk forever.
            let work = std::panic::AssertUnwindSafe(|| batch.work(true));
            if std::panic::catch_unwind(work).is_err() {
                batch.failed.store(true, Ordering::Release);
            }
        }
    }
}

impl Copier {
    /// Starts the second thread; `None` when the host has one CPU or cannot start it.
    pub(super) fn spawn() -> Option<Self> {
        if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
            return None;
        }
        let (messages, inbox) = channel();
        let soon = Arc::new(AtomicBool::new(false));
        let flag = soon.clone();
        let thread =
            std::thread::Builder::new().name("copy-engine".into()).spawn(move || second_thread(inbox, &flag)).ok()?;
        Some(Self { messages: Some(messages), thread: Some(thread), used: Arc::default(), soon })
    }

    /// A handle that wakes this thread ahead of a write-out's batch.
    pub(super) fn ahead(&self) -> Option<BatchAhead> {
        let messages = self.messages.clone()?;
        Some(BatchAhead { messages, used: self.used.clone(), soon: self.soon.clone() })
    }

    /// Does `work` to every page, on this thread and the second, and returns each page's
    /// hash (`page_hash` of what was written, or of the source, with the page's index) unless
    /// the work is a plain copy, and the chunks done, of them by the second thread.
    ///
    /// # Safety
    ///
    /// Every `src` is `len` readable bytes and, unless only hashed, every `dst` `len`
    /// writable bytes, and no page's `dst` overlaps any page's `src` or `dst` (the copies are
    /// apart); nothing else writes them until this returns.
    pub(super) unsafe fn run(&mut self, pages: Vec<PageCopy>, work: Work) -> (Vec<u64>, [u64; 2]) {
        let hashes =
            if work == Work::Copy { Vec::new() } else { (0..pages.len()).map(|_| AtomicU64::new(0)).collect() };
        let (next, done, second) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
        let failed = AtomicBool::new(false);
        let batch = Arc::new(Shared { pages, work, hashes, next, done, second, failed });
        self.used.store(true, Ordering::Relaxed);
        if let Some(messages) = &self.messages {
            let _ = messages.send(Message::Batch(batch.clone()));
        }
        batch.work(false);
        // Every chunk is taken: wait for the one the second thread may still be copying.
        let chunks = batch.chunks();
        let mut spins = 0u32;
        while batch.done.load(Ordering::Acquire) < chunks {
            if batch.failed.load(Ordering::Acquire) {
                // The second thread died in a chunk (not seen): every page again, here. The
                // copies are apart, so copying a page twice leaves what copying it once does.
                for (pages, hashes) in
                    batch.pages.chunks(CHUNK).zip(batch.hashes.chunks(CHUNK).chain(std::iter::repeat(&[][..])))
                {
                    // SAFETY: as this function's caller promises; the second thread has left
                    // this batch (its `work` ended with the panic).
                    unsafe { do_chunk(pages, batch.work, hashes) };
                }
                break;
            }
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
            spins = spins.saturating_add(1);
        }
        let hashes = batch.hashes.iter().map(|h| h.load(Ordering::Relaxed)).collect();
        (hashes, [chunks as u64, batch.second.load(Ordering::Relaxed) as u64])
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        // The thread's inbox has other senders (`BatchAhead`s, which the machine-control
        // device may drop after this): tell it to end rather than wait for them all.
        if let Some(messages) = self.messages.take() {
            let _ = messages.send(Message::Stop);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether no copy writes a byte that a copy (another, or itself) reads or writes: then
/// the order of the batch's pages makes no difference to what it leaves.
pub(super) fn copies_apart(descriptors: &[Descriptor]) -> bool {
    let range = |at: u64, len: u64| (at, at.saturating_add(len));
    let mut writes: Vec<(u64, u64)> = descriptors.iter().filter(|d| d.len > 0).map(|d| range(d.dst, d.len)).collect();
    writes.sort_unstable();
    if writes.windows(2).any(|w| w[1].0 < w[0].1) {
        return false;
    }
    // The writes are apart and sorted: a read can overlap only the last one starting at or
    // before its start, and those starting inside it.
    !descriptors.iter().filter(|d| d.len > 0).any(|d| {
        let (start, end) = range(d.src, d.len);
        let first = writes.partition_point(|w| w.0 <= start).saturating_sub(1);
        writes[first..].iter().take_while(|w| w.0 < end).any(|w| start < w.1)
    })
}

/// Copies a batch whose copies are apart (`copies_apart`, checked against RAM) on both
/// threads, with their sums when `sums` has one per copy: the overwritten halves first,
/// from the hashes kept or the bytes there before anything is copied, then the written
/// halves from the pages' hashes, which are kept. Gives the chunks done and, of them, by
/// the second thread; `None` if a page could not be read (nothing copied then).
pub(super) fn copy_apart(
    mem: &GuestMemoryMmap<()>,
    cache: &mut SumCache,
    buffer: &mut [u8; PAGE],
    copier: &mut Copier,
    descriptors: &[Descriptor],
    mut sums: Option<&mut [RangeSum]>,
) -> Option<[u64; 2]> {
    let mut pages = Vec::new();
    // Per page: its copy and its guest address.
    let mut owners = Vec::new();
    for (i, d) in descriptors.iter().enumerate() {
        let (Ok(src), Ok(dst)) =
            (mem.get_slice(GuestAddress(d.src), d.len as usize), mem.get_slice(GuestAddress(d.dst), d.len as usize))
        else {
            return None;
        };
        let first = match sums.as_deref_mut().map(|s| s.get_mut(i)) {
            Some(Some(sum)) => {
                if !overwritten_sum(cache, buffer, d.dst, &dst, sum) {
                    return None;
                }
                sum.first
            }
            Some(None) => return None,
            None => 0,
        };
        let (from, to) = (src.ptr_guard().as_ptr(), dst.ptr_guard_mut().as_ptr());
        let len = src.len().min(dst.len());
        for k in 0..len.div_ceil(PAGE) {
            let (at, page_len) = (k * PAGE, (len - k * PAGE).min(PAGE));
            // SAFETY: offsets inside the two slices, which map guest RAM.
            let (src, dst) = unsafe { (from.add(at), to.add(at)) };
            // The guest's first index, any value: it wraps as `AreaSum`'s count does.
            pages.push(PageCopy { src, dst, len: page_len, index: first.wrapping_add(k as u64) });
            owners.push((i, d.dst + at as u64));
        }
    }
    let summed = sums.is_some();
    // SAFETY: every page is inside guest RAM (the slices above), which stays mapped while
    // the engine holds the memory; the copies are apart (the caller checked); and nothing
    // else writes guest RAM while the batch runs: the guest's one vCPU waits in the engine,
    // the other devices run on its thread.
    let (hashes, chunks) = unsafe { copier.run(pages.clone(), if summed { Work::CopyAndHash } else { Work::Copy }) };
    let Some(sums) = sums else {
        return Some(chunks);
    };
    let mut written: Vec<AreaSum> = sums.iter().map(|s| AreaSum::new(s.first)).collect();
    for ((page, &(copy, addr)), &hash) in pages.iter().zip(&owners).zip(&hashes) {
        written[copy].add_hash(hash);
        if page.len == PAGE {
            cache.set(addr, page.index, hash);
        } else {
            cache.forget(addr, page.len as u64);
        }
    }
    for (sum, written) in sums.iter_mut().zip(&written) {
        sum.written = written.sum();
    }
    Some(chunks)
}

/// The sums of a [`FLAG_SUM_ONLY`](nvram::engine::FLAG_SUM_ONLY) batch's sources (checked
/// against RAM), hashed on both threads: `sums[i].written`. `None` if a source could not be
/// mapped (no sum written then).
pub(super) fn sum_apart(
    mem: &GuestMemoryMmap<()>,
    copier: &mut Copier,
    descriptors: &[Descriptor],
    sums: &mut [RangeSum],
) -> Option<[u64; 2]> {
    let mut pages = Vec::new();
    for (d, sum) in descriptors.iter().zip(sums.iter()) {
        let src = mem.get_slice(GuestAddress(d.src), d.len as usize).ok()?;
        let from = src.ptr_guard().as_ptr();
        for k in 0..src.len().div_ceil(PAGE) {
            let (at, len) = (k * PAGE, (src.len() - k * PAGE).min(PAGE));
            // SAFETY: an offset inside the slice, which maps guest RAM.
            let src = unsafe { from.add(at) };
            pages.push(PageCopy { src, dst: core::ptr::null_mut(), len, index: sum.first.wrapping_add(k as u64) });
        }
    }
    // SAFETY: every page is inside guest RAM (the slices above), mapped while the engine
    // holds the memory, only read; nothing writes guest RAM while the batch runs (as for
    // `copy_apart`).
    let (hashes, chunks) = unsafe { copier.run(pages, Work::Hash) };
    let mut hashes = hashes.into_iter();
    for (d, sum) in descriptors.iter().zip(sums.iter_mut()) {
        let mut written = AreaSum::new(sum.first);
        for hash in hashes.by_ref().take((d.len as usize).div_ceil(PAGE)) {
            written.add_hash(hash);
        }
        (sum.written, sum.overwritten) = (written.sum(), 0);
    }
    Some(chunks)
}
