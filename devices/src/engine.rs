//! The copy engine (`nvram::engine`): copies guest memory for the guest at the host's
//! memory speed. Everything in a batch is checked before anything is copied, so a bad batch
//! changes nothing but its status; nothing outside guest RAM is ever touched.

use std::sync::{Arc, Mutex};

use nvram::engine::{
    BatchHeader, Completion, Descriptor, DirtyRequest, BATCH_MAGIC, COMPLETION_OFFSET, DIRTY_MAGIC,
    DIRTY_STATUS_OFFSET, ENGINE_ID, FLAG_DURABLE, MAX_DESCRIPTORS, REG_DIRTY, STATUS_BAD_BATCH, STATUS_BAD_DESCRIPTOR,
    STATUS_DONE, STATUS_UNSUPPORTED,
};
use nvram::persist::FlushedRange;
use tracing::{warn, Level};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::dirty::{DirtyTracker, DirtyView};
use crate::persistence::PersistenceDomain;
use crate::{BusDevice, LogLimit};

/// What the engine has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub batches: u64,
    pub copies: u64,
    pub bytes: u64,
    pub rejected: u64,
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
}

impl CopyEngine {
    pub fn new(mem: GuestMemoryMmap<()>, domain: Arc<Mutex<PersistenceDomain>>) -> Self {
        let rejects_log = LogLimit::per_second("copy engine refused request", Level::WARN, 16);
        Self { mem, stats: Arc::default(), domain, dirty_log: None, pause: None, rejects_log }
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
    fn store(&self, bytes: &[u8], addr: u64) -> bool {
        let ok = self.mem.write_slice(bytes, GuestAddress(addr)).is_ok();
        if ok {
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
        let started = std::time::Instant::now();
        let mut header = BatchHeader::default();
        if !addr.is_multiple_of(8) || self.mem.read_slice(header.as_mut_bytes(), GuestAddress(addr)).is_err() {
            // No header to write a status into.
            return None;
        }
        if header.magic != BATCH_MAGIC
            || header.count > MAX_DESCRIPTORS
            || header.flags & !FLAG_DURABLE != 0
            || !header.descriptors.is_multiple_of(8)
        {
            return Some((STATUS_BAD_BATCH, 0));
        }
        let mut descriptors = vec![Descriptor::default(); header.count as usize];
        if self.mem.read_slice(descriptors.as_mut_bytes(), GuestAddress(header.descriptors)).is_err() {
            return Some((STATUS_BAD_BATCH, 0));
        }
        let ram = self.ram();
        for (i, &d) in descriptors.iter().enumerate() {
            if let Err(e) = d.check(ram) {
                self.reject(&format_args!(
                    "copy engine: descriptor {i} of the batch at {addr:#x} refused ({e:?}): {d:x?}"
                ));
                return Some((STATUS_BAD_DESCRIPTOR, i as u32));
            }
        }
        let mut bytes = 0;
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
            src.copy_to_volatile_slice(dst);
            bytes += d.len;
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
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.batches += 1;
        stats.copies += descriptors.len() as u64;
        stats.bytes += bytes;
        stats.busy += started.elapsed();
        Some((STATUS_DONE, 0))
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
        match self.run(addr) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use nvram::engine::FLAG_DURABLE;

    fn engine_on(mem: GuestMemoryMmap<()>) -> CopyEngine {
        let domain = Arc::new(Mutex::new(PersistenceDomain::eadr(mem.clone(), false)));
        CopyEngine::new(mem, domain)
    }

    fn engine() -> CopyEngine {
        engine_on(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
    }

    /// A batch header at `at`, its descriptors right after it.
    fn put_batch(e: &CopyEngine, at: u64, descriptors: &[Descriptor]) {
        put_batch_with(e, at, FLAG_DURABLE, at + nvram::engine::HEADER_SIZE, descriptors);
    }

    fn put_batch_with(e: &CopyEngine, at: u64, flags: u64, array: u64, descriptors: &[Descriptor]) {
        let head = BatchHeader {
            magic: BATCH_MAGIC,
            count: descriptors.len() as u32,
            status: 0,
            failed: 0,
            flags,
            descriptors: array,
        };
        e.mem.write_slice(head.as_bytes(), GuestAddress(at)).unwrap();
        e.mem.write_slice(descriptors.as_bytes(), GuestAddress(array)).unwrap();
    }

    /// The batch header at `at`, as the engine left it.
    fn header(e: &CopyEngine, at: u64) -> BatchHeader {
        let mut head = BatchHeader::default();
        e.mem.read_slice(head.as_mut_bytes(), GuestAddress(at)).unwrap();
        head
    }

    fn status(e: &CopyEngine, at: u64) -> (u32, u32) {
        let head = header(e, at);
        (head.status, head.failed)
    }

    /// Writes one field of the batch header at `at` (a test's corruption).
    fn poke(e: &CopyEngine, at: u64, change: impl FnOnce(&mut BatchHeader)) {
        let mut head = header(e, at);
        change(&mut head);
        e.mem.write_slice(head.as_bytes(), GuestAddress(at)).unwrap();
    }

    #[test]
    fn copies_a_batch_and_reports_done() {
        let mut e = engine();
        e.mem.write_slice(&[7u8; 8192], GuestAddress(0x10000)).unwrap();
        e.mem.write_slice(&[9u8; 100], GuestAddress(0x30000)).unwrap();
        put_batch(
            &e,
            0x1000,
            &[
                Descriptor { src: 0x10000, dst: 0x20000, len: 8192 },
                Descriptor { src: 0x30000, dst: 0x40000, len: 100 },
            ],
        );
        e.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(status(&e, 0x1000), (STATUS_DONE, 0));
        let mut out = [0u8; 8192];
        e.mem.read_slice(&mut out, GuestAddress(0x20000)).unwrap();
        assert!(out.iter().all(|&b| b == 7));
        let stats = *e.stats.lock().unwrap();
        assert_eq!((stats.batches, stats.copies, stats.bytes), (1, 2, 8292));
    }

    /// Under ADR a durable batch's destinations are in the image when the status says done;
    /// a batch without the flag leaves them as stores, which a power failure loses.
    #[test]
    fn a_durable_batch_reaches_the_image_and_a_plain_one_waits_for_a_barrier() {
        use crate::persistence::tests::setup;
        let mut s = setup("engine-durable", None);
        let adr = std::mem::replace(&mut s.domain, PersistenceDomain::eadr(s.guest.clone(), false));
        let domain = Arc::new(Mutex::new(adr));
        let mut e = CopyEngine::new(s.guest.clone(), domain.clone());
        s.store(0x1000, &[5; 4096]);
        for (flags, dst) in [(FLAG_DURABLE, 0x4000), (0, 0x6000)] {
            put_batch_with(&e, 0x8000, flags, 0x8040, &[Descriptor { src: 0x1000, dst, len: 4096 }]);
            e.write(0, &0x8000u32.to_le_bytes());
            assert_eq!(status(&e, 0x8000), (STATUS_DONE, 0), "flags {flags}");
        }
        let image = s.image();
        assert!(image[0x4000..0x5000].iter().all(|&b| b == 5), "the durable copy is in the image");
        assert!(image[0x6000..0x7000].iter().all(|&b| b == 0xee), "the plain copy is not, yet");
        domain.lock().unwrap().power_fail();
        assert!(s.image()[0x6000..0x7000].iter().all(|&b| b == 0xee), "and a power failure loses it");
        // A plain copy is in the caches, where a barrier (here: write back everything) finds
        // it: the engine told the domain what it stored.
        put_batch_with(&e, 0x8000, 0, 0x8040, &[Descriptor { src: 0x1000, dst: 0x6000, len: 4096 }]);
        e.write(0, &0x8000u32.to_le_bytes());
        assert_eq!(status(&e, 0x8000), (STATUS_DONE, 0));
        domain.lock().unwrap().write_back_all();
        assert!(s.image()[0x6000..0x7000].iter().all(|&b| b == 5), "after a barrier the plain copy is in the image");
    }

    #[test]
    fn a_bad_descriptor_fails_the_whole_batch_and_copies_nothing() {
        let mut e = engine();
        e.mem.write_slice(&[7u8; 4096], GuestAddress(0x10000)).unwrap();
        put_batch(
            &e,
            0x1000,
            &[
                Descriptor { src: 0x10000, dst: 0x20000, len: 4096 },
                Descriptor { src: 0x10000, dst: (1 << 20) - 10, len: 4096 },
            ],
        );
        e.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(status(&e, 0x1000), (STATUS_BAD_DESCRIPTOR, 1));
        let mut out = [0u8; 4096];
        e.mem.read_slice(&mut out, GuestAddress(0x20000)).unwrap();
        assert!(out.iter().all(|&b| b == 0), "the good descriptor was not applied either");
        // The array may be anywhere in RAM, but not misaligned nor past its end; no unknown flag.
        let d = [Descriptor { src: 0x10000, dst: 0x20000, len: 4096 }];
        put_batch_with(&e, 0x1000, 0, 0x8000, &d);
        e.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(status(&e, 0x1000), (STATUS_DONE, 0), "an array away from its header");
        for (flags, array) in [(2, 0x8000), (FLAG_DURABLE, 0x8004), (FLAG_DURABLE, (1 << 20) - 8)] {
            put_batch_with(&e, 0x1000, flags, 0x8000, &d);
            poke(&e, 0x1000, |h| h.descriptors = array);
            e.write(0, &0x1000u32.to_le_bytes());
            assert_eq!(status(&e, 0x1000).0, STATUS_BAD_BATCH, "flags {flags}, array at {array:#x}");
        }
        for bad in [
            Descriptor { src: 0x10000, dst: 0x10800, len: 4096 },
            Descriptor { src: 0x10000, dst: 0x20000, len: 0 },
            Descriptor { src: u64::MAX - 4, dst: 0x20000, len: 8 },
        ] {
            put_batch(&e, 0x1000, &[bad]);
            e.write(0, &0x1000u32.to_le_bytes());
            assert_eq!(status(&e, 0x1000), (STATUS_BAD_DESCRIPTOR, 0), "{bad:?}");
        }
    }

    fn put_request(e: &CopyEngine, at: u64, first: u64, pages: u64, out: u64) {
        let request = DirtyRequest { magic: DIRTY_MAGIC, status: 0, first_page: first, pages, out };
        e.mem.write_slice(request.as_bytes(), GuestAddress(at)).unwrap();
    }

    fn request_status(e: &CopyEngine, at: u64) -> u32 {
        let mut request = DirtyRequest::default();
        e.mem.read_slice(request.as_mut_bytes(), GuestAddress(at)).unwrap();
        request.status
    }

    #[test]
    fn dirty_log_requests_extract_the_asked_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // Pages 3, 64, 70 and 200 written.
        let mut log = vec![0u64; 4];
        for page in [3u64, 64, 70, 200] {
            log[(page / 64) as usize] |= 1 << (page % 64);
        }
        let tracker = DirtyTracker::new(1 << 20, Some(Box::new(move || Some(log.clone()))));
        let mut e = engine_on(mem).with_dirty_log(Arc::new(Mutex::new(tracker)));
        put_request(&e, 0x1000, 64, 140, 0x2000);
        e.write(REG_DIRTY, &0x1000u32.to_le_bytes());
        assert_eq!(request_status(&e, 0x1000), STATUS_DONE);
        assert_eq!(e.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 1 | 1 << 6);
        assert_eq!(e.mem.read_obj::<u64>(GuestAddress(0x2008)).unwrap(), 0);
        assert_eq!(e.mem.read_obj::<u64>(GuestAddress(0x2010)).unwrap(), 1 << (200 - 64 - 128));
        put_request(&e, 0x1000, 3, 5, 0x2000);
        e.write(REG_DIRTY, &0x1000u32.to_le_bytes());
        assert_eq!(e.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 1, "unaligned start");
        for (first, pages, out) in [(250, 10, 0x2000), (0, 8, (1 << 20) - 4), (0, 8, 0x2004)] {
            put_request(&e, 0x1000, first, pages, out);
            e.write(REG_DIRTY, &0x1000u32.to_le_bytes());
            assert_eq!(request_status(&e, 0x1000), STATUS_BAD_BATCH);
        }
        let mut plain = engine();
        put_request(&plain, 0x1000, 0, 8, 0x2000);
        plain.write(REG_DIRTY, &0x1000u32.to_le_bytes());
        assert_eq!(request_status(&plain, 0x1000), STATUS_UNSUPPORTED);
    }

    #[test]
    fn bad_batches_are_refused_without_harm() {
        let mut e = engine();
        put_batch(&e, 0x1000, &[]);
        poke(&e, 0x1000, |h| h.magic = 0xdead);
        e.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(status(&e, 0x1000).0, STATUS_BAD_BATCH, "bad magic");
        put_batch(&e, 0x1000, &[]);
        poke(&e, 0x1000, |h| h.count = MAX_DESCRIPTORS + 1);
        e.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(status(&e, 0x1000).0, STATUS_BAD_BATCH, "too many descriptors");
        put_batch_with(&e, 0x1000, FLAG_DURABLE, (1 << 20) - 48, &[]);
        poke(&e, 0x1000, |h| h.count = 10);
        e.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(status(&e, 0x1000).0, STATUS_BAD_BATCH, "descriptors past the end of RAM");
        e.write(0, &(((1u32 << 20) - 16).to_le_bytes())); // a header past the end of RAM
        e.write(0, &0x1004u32.to_le_bytes()); // misaligned: no status to write
        e.write(0, &u32::MAX.to_le_bytes()); // outside RAM
        e.write(0, &[1, 2]); // wrong width
        let mut id = [0u8; 4];
        e.read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), ENGINE_ID);
        assert_eq!(e.stats.lock().unwrap().batches, 0);
    }
}
