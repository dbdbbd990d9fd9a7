//! The persistence domain: which of the guest's stores are in the image after a power
//! failure.
//!
//! - eADR (the default): the CPU caches are inside the domain. Guest RAM is the image
//!   mapped `MAP_SHARED`, so every completed store is in the file.
//! - ADR: only the memory controller is. Guest RAM is the image mapped `MAP_PRIVATE`: the
//!   guest's stores stay in the VMM's private copy, as in a CPU cache, until the guest
//!   writes the lines back and says so with a persist barrier (`nvram::persist`); the domain
//!   then copies exactly those lines into the image. At a power failure the private copy is
//!   dropped, except a chosen fraction of its dirty lines, written to the image as cache
//!   evictions would have before the power went (`--crash-evict`).
//!
//! With `sync`, every barrier also `msync`s what it made durable, so that it survives a crash
//! of the host as well.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvram::persist::FlushedRange;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tracing::warn;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::dirty::{pages, DirtyTracker, DirtyView};
use crate::record::{lines_of, Line, Plant, Recorder, WriteOutRecord};

const LINE: u64 = 64;
const PAGE: u64 = 4096;

/// Where the guest's stores become durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PersistenceModel {
    /// Every store, once done (caches inside the persistence domain).
    #[default]
    Eadr,
    /// Only stores the guest wrote back and fenced.
    Adr,
}

/// Cache evictions at a power failure: `fraction` of the dirty, unflushed lines reach the
/// image, chosen by a generator seeded with `seed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrashEvict {
    pub fraction: f64,
    pub seed: u64,
}

/// What the domain has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PersistStats {
    pub barriers: u64,
    pub ranges: u64,
    /// Bytes copied into the image (ADR) or synced (eADR with `sync`).
    pub bytes: u64,
    pub write_back_alls: u64,
    pub rejected: u64,
}

/// What a power failure left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PowerFailure {
    /// Dirty lines not written back.
    pub dirty_lines: u64,
    /// Of those, the lines evicted into the image.
    pub evicted_lines: u64,
}

/// A range the guest announced is outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("range {index} ({range:x?}) is outside guest RAM")]
pub struct OutOfRam {
    pub index: usize,
    pub range: FlushedRange,
}

pub struct PersistenceDomain {
    model: PersistenceModel,
    /// Guest RAM, as the guest sees it.
    guest: GuestMemoryMmap<()>,
    /// The image, as it would be after a power failure (ADR: a shared mapping of its own;
    /// eADR: guest RAM itself).
    durable: GuestMemoryMmap<()>,
    sync: bool,
    /// Pages the guest may have dirtied since they were last written back (ADR).
    dirty: Option<(Arc<Mutex<DirtyTracker>>, DirtyView)>,
    evict: Option<CrashEvict>,
    stats: PersistStats,
    /// The barriers run, shared with whoever places a crash among them (the machine-control
    /// device notes it when a write-out starts and ends).
    barriers: BarrierCounter,
    /// The write-out `vmm explore` records, if any (ADR).
    recorder: Option<Recorder>,
}

/// A count of the persist barriers a domain has run, readable from other devices without
/// the domain's lock.
pub type BarrierCounter = Arc<AtomicU64>;

impl PersistenceDomain {
    /// eADR: guest RAM is a shared mapping of the image.
    pub fn eadr(guest: GuestMemoryMmap<()>, sync: bool) -> Self {
        let durable = guest.clone();
        Self {
            model: PersistenceModel::Eadr,
            guest,
            durable,
            sync,
            dirty: None,
            evict: None,
            stats: Default::default(),
            barriers: BarrierCounter::default(),
            recorder: None,
        }
    }

    /// ADR: `guest` a private mapping of the image, `durable` a shared one; `tracker` tells
    /// which pages the guest wrote.
    pub fn adr(
        guest: GuestMemoryMmap<()>,
        durable: GuestMemoryMmap<()>,
        tracker: Arc<Mutex<DirtyTracker>>,
        evict: Option<CrashEvict>,
        sync: bool,
    ) -> Self {
        let view = lock(&tracker).view();
        Self {
            model: PersistenceModel::Adr,
            guest,
            durable,
            sync,
            dirty: Some((tracker, view)),
            evict,
            stats: Default::default(),
            barriers: BarrierCounter::default(),
            recorder: None,
        }
    }

    /// Counts the barriers into `counter` (from now on, added to what it holds).
    pub fn with_barrier_counter(mut self, counter: BarrierCounter) -> Self {
        self.barriers = counter;
        self
    }

    /// Records the `nth` write-out to start (from 1) barrier by barrier, then makes nothing
    /// durable any more ([`crate::record`]); `plant` is a test's planted bug. ADR only:
    /// under eADR every store is durable at once, there is nothing to record.
    pub fn record_write_out(&mut self, nth: u64, plant: Option<Plant>) {
        if self.model == PersistenceModel::Adr {
            self.recorder = Some(Recorder::new(nth, plant));
        }
    }

    /// The guest announced the start of a write-out (the machine-control device says so).
    pub fn write_out_started(&mut self, generation: u64) {
        let Some(rec) = self.recorder.as_mut() else { return };
        rec.started += 1;
        if rec.started != rec.nth || rec.record.is_some() {
            return;
        }
        // A view of its own, emptied now: the pages written from the start on.
        if let Some((tracker, _)) = &self.dirty {
            let mut tracker = lock(tracker);
            let view = tracker.view();
            let _ = tracker.take(view);
            rec.view = Some(view);
        }
        rec.record = Some(WriteOutRecord { generation, ..WriteOutRecord::default() });
    }

    /// The guest reported a write-out committed: the recorded one ends.
    pub fn write_out_reported(&mut self) {
        if !self.recorder.as_ref().is_some_and(Recorder::recording) {
            return;
        }
        let pending = self.pending_lines();
        if let Some(record) = self.recorder.as_mut().and_then(|r| r.record.as_mut()) {
            record.pending_at_end = pending;
            record.done = true;
        }
    }

    /// The recorded write-out, once it has reported.
    pub fn write_out_record(&self) -> Option<&WriteOutRecord> {
        self.recorder.as_ref()?.record.as_ref().filter(|r| r.done)
    }

    fn frozen(&self) -> bool {
        self.recorder.as_ref().is_some_and(Recorder::frozen)
    }

    /// Lines written since the recorded write-out started whose durable copy differs.
    fn pending_lines(&mut self) -> Vec<Line> {
        let view = self.recorder.as_ref().and_then(|r| r.view);
        let candidates = match (&self.dirty, view) {
            (Some((tracker, _)), Some(view)) => lock(tracker).peek(view).map(|b| pages(b).collect::<Vec<_>>()),
            _ => None,
        };
        self.differing_lines(candidates)
    }

    /// The lines of `candidates` (pages; all of RAM when `None`) whose guest copy differs
    /// from the durable one, with the guest's contents: the lines stored and not written back.
    fn differing_lines(&self, candidates: Option<Vec<u64>>) -> Vec<Line> {
        let candidates = candidates.unwrap_or_else(|| (0..self.ram() / PAGE).collect());
        let mut lines = Vec::new();
        let (mut ours, mut image) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
        for page in candidates {
            let at = GuestAddress(page * PAGE);
            if self.guest.read_slice(&mut ours, at).is_err() || self.durable.read_slice(&mut image, at).is_err() {
                continue;
            }
            for (i, (a, b)) in ours.chunks(LINE as usize).zip(image.chunks(LINE as usize)).enumerate() {
                if a != b {
                    lines.push((page * PAGE + i as u64 * LINE, a.try_into().unwrap_or([0; LINE as usize])));
                }
            }
        }
        lines
    }

    /// A barrier of the recorded write-out: what was pending, what it writes back (as the
    /// plant allows), each line's durable contents before and after.
    fn write_back_recorded(&mut self, ranges: &[FlushedRange]) {
        let pending = self.pending_lines();
        let ram = self.ram();
        let Some(rec) = self.recorder.as_mut() else { return };
        let index = rec.record.as_ref().map_or(0, |r| r.barriers.len());
        let intended = lines_of(ranges, ram)
            .into_iter()
            .map(|addr| {
                let mut line = [0u8; LINE as usize];
                let _ = self.guest.read_slice(&mut line, GuestAddress(addr));
                (addr, line)
            })
            .collect();
        let applied = rec.applied(index, ranges);
        let mut lines = Vec::new();
        for addr in lines_of(&applied, ram) {
            let mut before = [0u8; LINE as usize];
            let _ = self.durable.read_slice(&mut before, GuestAddress(addr));
            self.persist(addr, LINE);
            let mut after = [0u8; LINE as usize];
            let _ = self.durable.read_slice(&mut after, GuestAddress(addr));
            lines.push((addr, before, after));
        }
        self.stats.ranges += ranges.len() as u64;
        let record = crate::record::BarrierRecord { announced: ranges.to_vec(), lines, pending, intended };
        if let Some(r) = self.recorder.as_mut().and_then(|r| r.record.as_mut()) {
            r.barriers.push(record);
        }
    }

    pub fn model(&self) -> PersistenceModel {
        self.model
    }

    /// Whether the guest must announce its barriers.
    pub fn wants_barriers(&self) -> bool {
        self.model == PersistenceModel::Adr || self.sync
    }

    pub fn stats(&self) -> PersistStats {
        self.stats
    }

    fn ram(&self) -> u64 {
        self.guest.last_addr().0 + 1
    }

    /// A persist barrier: every line of `ranges` becomes durable. The ranges are checked
    /// first; one outside guest RAM refuses them all, and nothing is written back.
    pub fn write_back(&mut self, ranges: &[FlushedRange]) -> Result<(), OutOfRam> {
        let ram = self.ram();
        if let Some((index, &range)) = ranges.iter().enumerate().find(|(_, r)| !r.inside(ram)) {
            self.stats.rejected += 1;
            return Err(OutOfRam { index, range });
        }
        self.stats.barriers += 1;
        self.barriers.fetch_add(1, Ordering::Relaxed);
        if self.frozen() {
            return Ok(());
        }
        if self.recorder.as_ref().is_some_and(Recorder::recording) {
            self.write_back_recorded(ranges);
            return Ok(());
        }
        for r in ranges.iter().filter(|r| r.len > 0) {
            // Caches write back whole lines.
            let start = r.addr & !(LINE - 1);
            let end = (r.addr + r.len).next_multiple_of(LINE).min(ram);
            self.persist(start, end - start);
            self.stats.ranges += 1;
        }
        Ok(())
    }

    /// Makes `addr..addr + len` (inside guest RAM) durable.
    fn persist(&mut self, addr: u64, len: u64) {
        if self.model == PersistenceModel::Adr {
            self.copy_to_image(addr, len);
        }
        if self.sync {
            self.sync_range(addr, len);
        }
        self.stats.bytes += len;
    }

    fn copy_to_image(&self, addr: u64, len: u64) {
        let (Ok(from), Ok(to)) = (
            self.guest.get_slice(GuestAddress(addr), len as usize),
            self.durable.get_slice(GuestAddress(addr), len as usize),
        ) else {
            warn!("persistence: cannot write back {addr:#x}+{len:#x}");
            return;
        };
        from.copy_to_volatile_slice(to);
    }

    fn sync_range(&self, addr: u64, len: u64) {
        let start = addr & !(PAGE - 1);
        let end = (addr + len).next_multiple_of(PAGE).min(self.ram());
        let Ok(host) = self.durable.get_host_address(GuestAddress(start)) else { return };
        // SAFETY: `start..end` is page-aligned and inside the durable mapping (checked
        // against guest RAM, which it covers whole); msync only writes pages back.
        let rc = unsafe { libc::msync(host.cast(), (end - start) as usize, libc::MS_SYNC) };
        if rc != 0 {
            warn!("persistence: msync of {start:#x}..{end:#x} failed: {}", std::io::Error::last_os_error());
        }
    }

    /// Records a store the VMM made into guest RAM for the guest (not yet durable).
    pub fn stored(&mut self, addr: u64, len: u64) {
        if let Some((tracker, _)) = &self.dirty {
            lock(tracker).mark(addr, len);
        }
    }

    /// Writes every cache line back, as `wbinvd` does: every page written since the last
    /// time (the whole of RAM if the host keeps no dirty log).
    pub fn write_back_all(&mut self) {
        self.stats.write_back_alls += 1;
        if self.frozen() {
            return;
        }
        if let Some((tracker, view)) = &self.dirty {
            let taken = lock(tracker).take(*view);
            match taken {
                Some(bitmap) => {
                    for page in pages(&bitmap) {
                        self.copy_to_image(page * PAGE, PAGE);
                        self.stats.bytes += PAGE;
                    }
                }
                None => {
                    self.copy_to_image(0, self.ram());
                    self.stats.bytes += self.ram();
                }
            }
        }
        if self.sync {
            // One msync of the whole image: only its dirty pages cost anything.
            self.sync_range(0, self.ram());
        }
    }

    /// The power fails: what is not durable is lost, but for the lines evicted by chance.
    /// Returns what was lost and evicted (nothing under eADR).
    pub fn power_fail(&mut self) -> PowerFailure {
        let Some((tracker, view)) = &self.dirty.as_ref().filter(|_| !self.frozen()) else {
            return PowerFailure::default();
        };
        let candidates = lock(tracker).peek(*view).map(|bitmap| pages(bitmap).collect::<Vec<_>>());
        // A line is dirty and unflushed when the guest's copy differs from the image's.
        let lines: Vec<u64> = self.differing_lines(candidates).into_iter().map(|(addr, _)| addr).collect();
        let mut failure = PowerFailure { dirty_lines: lines.len() as u64, evicted_lines: 0 };
        if let Some(CrashEvict { fraction, seed }) = self.evict {
            let count = ((lines.len() as f64 * fraction.clamp(0.0, 1.0)).round() as usize).min(lines.len());
            let mut rng = StdRng::seed_from_u64(seed);
            for i in rand::seq::index::sample(&mut rng, lines.len(), count) {
                self.copy_to_image(lines[i], LINE);
            }
            failure.evicted_lines = count as u64;
            if self.sync {
                self.sync_range(0, self.ram());
            }
        }
        failure
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::FileOffset;

    pub(crate) const RAM: u64 = 64 * PAGE;

    /// Guest RAM privately mapped over a file, the file shared, and a dirty log that reports
    /// every page the test says it wrote. The other tests of the crate use it for ADR too.
    pub(crate) struct Setup {
        file: std::path::PathBuf,
        log: Arc<Mutex<Vec<u64>>>,
        pub(crate) domain: PersistenceDomain,
        pub(crate) guest: GuestMemoryMmap<()>,
    }

    pub(crate) fn setup(name: &str, evict: Option<CrashEvict>) -> Setup {
        let file = std::env::temp_dir().join(format!("persistence-{name}-{}", std::process::id()));
        let mut f = std::fs::File::create(&file).unwrap();
        f.write_all(&vec![0xeeu8; RAM as usize]).unwrap();
        let open = || std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
        let private = vm_memory::MmapRegion::<()>::build(
            Some(FileOffset::new(open(), 0)),
            RAM as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .unwrap();
        let guest =
            GuestMemoryMmap::from_regions(vec![vm_memory::GuestRegionMmap::new(private, GuestAddress(0)).unwrap()])
                .unwrap();
        let durable = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            RAM as usize,
            Some(FileOffset::new(open(), 0)),
        )])
        .unwrap();
        let log = Arc::new(Mutex::new(vec![0u64; 1]));
        let source = log.clone();
        let fetch = Box::new(move || Some(std::mem::replace(&mut *source.lock().unwrap(), vec![0; 1])));
        let tracker = Arc::new(Mutex::new(DirtyTracker::new(RAM, Some(fetch))));
        let domain = PersistenceDomain::adr(guest.clone(), durable, tracker, evict, false);
        Setup { file, log, domain, guest }
    }

    impl Setup {
        /// A guest store: into the private copy, and into the dirty log.
        pub(crate) fn store(&self, addr: u64, bytes: &[u8]) {
            self.guest.write_slice(bytes, GuestAddress(addr)).unwrap();
            self.log.lock().unwrap()[0] |= 1 << (addr / PAGE);
        }

        pub(crate) fn image(&self) -> Vec<u8> {
            std::fs::read(&self.file).unwrap()
        }
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.file);
        }
    }

    #[test]
    fn only_announced_lines_reach_the_image() {
        let mut s = setup("announced", None);
        s.store(0x1000, &[1; 256]);
        s.store(0x3000, &[2; 8]);
        assert!(s.image()[0x1000..0x1100].iter().all(|&b| b == 0xee), "a store alone is not durable");
        s.domain.write_back(&[FlushedRange { addr: 0x1010, len: 8 }]).unwrap();
        let image = s.image();
        assert!(image[0x1000..0x1040].iter().all(|&b| b == 1), "the whole line is written back");
        assert!(image[0x1040..0x1100].iter().all(|&b| b == 0xee), "the next line is not");
        let lost = s.domain.power_fail();
        assert_eq!(lost, PowerFailure { dirty_lines: 3 + 1, evicted_lines: 0 });
        assert!(s.image()[0x3000..0x3008].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn a_range_outside_ram_refuses_the_barrier() {
        let mut s = setup("outside", None);
        s.store(0x1000, &[1; 64]);
        let bad = [FlushedRange { addr: 0x1000, len: 64 }, FlushedRange { addr: RAM - 8, len: 64 }];
        assert_eq!(s.domain.write_back(&bad).unwrap_err().index, 1);
        let wraps = [FlushedRange { addr: u64::MAX - 8, len: 64 }];
        assert_eq!(s.domain.write_back(&wraps).unwrap_err().index, 0);
        assert!(s.image()[0x1000..0x1040].iter().all(|&b| b == 0xee), "nothing of a refused barrier");
        assert_eq!(s.domain.stats().rejected, 2);
    }

    #[test]
    fn write_back_all_makes_every_written_page_durable() {
        let mut s = setup("all", None);
        s.store(0x2000, &[3; 100]);
        s.guest.write_slice(&[4; 10], GuestAddress(0x5000)).unwrap();
        s.domain.stored(0x5000, 10);
        s.domain.write_back_all();
        let image = s.image();
        assert!(image[0x2000..0x2064].iter().all(|&b| b == 3));
        assert!(image[0x5000..0x500a].iter().all(|&b| b == 4), "the VMM's own stores too");
        assert_eq!(s.domain.power_fail().dirty_lines, 0);
    }

    #[test]
    fn a_power_failure_evicts_the_asked_fraction_of_dirty_lines_reproducibly() {
        let evicted_image = |seed| {
            let mut s = setup(&format!("evict{seed}"), Some(CrashEvict { fraction: 0.25, seed }));
            for page in 0..8 {
                s.store(page * PAGE, &[page as u8 + 1; PAGE as usize]);
            }
            let lost = s.domain.power_fail();
            assert_eq!(lost, PowerFailure { dirty_lines: 8 * 64, evicted_lines: 128 });
            let image = s.image();
            let written = image[..8 * PAGE as usize].chunks(LINE as usize).filter(|l| l[0] != 0xee).count();
            assert_eq!(written, 128);
            image
        };
        assert_eq!(evicted_image(7), evicted_image(7), "the seed decides");
        assert_ne!(evicted_image(7), evicted_image(8));
    }
}
