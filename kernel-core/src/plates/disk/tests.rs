//! The commit protocol on a simulated disk: a write cache that a crash loses in any part
//! (whole requests kept or lost, the last kept one torn at a sector), a crash at every
//! request of a write-out, and a check that a boot on fresh RAM always restores exactly
//! one committed checkpoint, the last one once its table's flush was done.

extern crate std;

use std::boxed::Box;
use std::collections::BTreeSet;
use std::vec;
use std::vec::Vec;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use zerocopy::{FromZeros, IntoBytes};

use nvram::disk::{DiskError, Superblock, AREA_START, SECTOR, SLOTS, SLOT_BYTES};
use nvram::plate::*;
use nvram::plate_check::Rejection;

use super::*;
use crate::frames::FrameBitmap;
use crate::plates::{make_plate, write_out};

/// Simulated RAM: regions from `BASE`, the slots' copies after them.
const RAM: u64 = 0x8_0000;
const BASE: u64 = 0x1000;
const FRAMES: u64 = 0x3f;
const SLOT_RAM: [u64; 2] = [0x4_0000, 0x4_0000 + SLOT_BYTES];
const AREA_PAGES: u64 = 64;
const DISK: u64 = AREA_START + AREA_PAGES * PAGE;

/// A disk behind a write cache: `view` is what reads see, `durable` what a crash keeps for
/// sure, `cache` the writes since the last flush. After `budget` requests the power is gone.
#[derive(Clone)]
struct SimDisk {
    ram: Vec<u8>,
    view: Vec<u8>,
    durable: Vec<u8>,
    cache: Vec<(u64, Vec<u8>)>,
    requests: usize,
    budget: usize,
    fail_read: Option<usize>,
}

impl SimDisk {
    fn new(image: Vec<u8>) -> Self {
        Self {
            ram: vec![0; RAM as usize],
            view: image.clone(),
            durable: image,
            cache: Vec::new(),
            requests: 0,
            budget: usize::MAX,
            fail_read: None,
        }
    }

    fn start(&mut self, request: Request, at: u64, len: u64) -> Result<(), IoError> {
        let error = Err(IoError { request, at });
        if self.requests >= self.budget || !at.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return error;
        }
        if at + len > self.view.len() as u64 {
            return error;
        }
        self.requests += 1;
        if request == Request::Read && self.fail_read.is_some_and(|n| n < self.requests) {
            return error;
        }
        Ok(())
    }

    fn store(&mut self, at: u64, data: Vec<u8>) {
        self.view[at as usize..at as usize + data.len()].copy_from_slice(&data);
        self.cache.push((at, data));
    }

    /// The disk after a power loss that kept the cached writes `kept` picks, the last one
    /// kept cut after `torn` sectors.
    fn crash_image(&self, kept: impl Fn(usize) -> bool, torn: Option<usize>) -> Vec<u8> {
        let mut image = self.durable.clone();
        let last = (0..self.cache.len()).rev().find(|&i| kept(i));
        for (i, (at, data)) in self.cache.iter().enumerate().filter(|(i, _)| kept(*i)) {
            let n = match torn {
                Some(s) if Some(i) == last => (s * SECTOR as usize).min(data.len()),
                _ => data.len(),
            };
            image[*at as usize..*at as usize + n].copy_from_slice(&data[..n]);
        }
        image
    }
}

impl Disk for SimDisk {
    fn write(&mut self, at: u64, ram: u64, len: u64) -> Result<(), IoError> {
        self.start(Request::Write, at, len)?;
        let data = self.ram[ram as usize..(ram + len) as usize].to_vec();
        self.store(at, data);
        Ok(())
    }

    fn write_bytes(&mut self, at: u64, bytes: &[u8]) -> Result<(), IoError> {
        self.start(Request::Write, at, bytes.len() as u64)?;
        self.store(at, bytes.to_vec());
        Ok(())
    }

    fn read(&mut self, at: u64, ram: u64, len: u64) -> Result<(), IoError> {
        self.start(Request::Read, at, len)?;
        self.ram[ram as usize..(ram + len) as usize].copy_from_slice(&self.view[at as usize..(at + len) as usize]);
        Ok(())
    }

    fn read_bytes(&mut self, at: u64, bytes: &mut [u8]) -> Result<(), IoError> {
        self.start(Request::Read, at, bytes.len() as u64)?;
        bytes.copy_from_slice(&self.view[at as usize..at as usize + bytes.len()]);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.start(Request::Flush, 0, 0)?;
        self.durable.copy_from_slice(&self.view);
        self.cache.clear();
        Ok(())
    }

    fn ram(&self, addr: u64, len: u64) -> &[u8] {
        &self.ram[addr as usize..(addr + len) as usize]
    }
}

fn new_table() -> Box<PlateTable> {
    let mut t = PlateTable::new_box_zeroed().expect("a plate table fits in memory");
    t.format();
    t
}

/// A machine whose plates' save areas are on the simulated disk.
struct World {
    disk: SimDisk,
    live: Box<PlateTable>,
    area_words: Vec<u64>,
    stale: Vec<u64>,
    committed: Option<(usize, u64)>,
    /// Region contents at each generation a write-out tried to commit.
    history: Vec<(u64, Vec<Vec<u8>>)>,
}

impl World {
    fn new(sizes: &[u64]) -> Self {
        let mut disk = SimDisk::new(vec![0; DISK as usize]);
        let mut sector = [0u8; SECTOR as usize];
        let (_, formatted) = open(&mut disk, DISK, &mut sector).unwrap();
        assert!(formatted);
        let mut w = Self {
            disk,
            live: new_table(),
            area_words: vec![0; 1],
            stale: vec![u64::MAX; (FRAMES as usize).div_ceil(64)],
            committed: None,
            history: Vec::new(),
        };
        let mut next = BASE;
        for (id, &pages) in sizes.iter().enumerate() {
            w.add(id as u32, next, pages);
            next += pages * PAGE;
        }
        w
    }

    fn areas(&mut self) -> FrameBitmap<'_> {
        FrameBitmap::new(&mut self.area_words, AREA_START, AREA_PAGES).unwrap()
    }

    fn add(&mut self, id: u32, src: u64, pages: u64) {
        let mut words = core::mem::take(&mut self.area_words);
        let mut areas = FrameBitmap::new(&mut words, AREA_START, AREA_PAGES).unwrap();
        make_plate(&mut self.live, &mut areas, PlateKind::UserSpace, id, src, pages).unwrap();
        self.area_words = words;
    }

    fn regions(&self) -> Vec<Vec<u8>> {
        self.live.plates().iter().map(|p| self.disk.ram(p.src, p.pages * PAGE).to_vec()).collect()
    }

    fn touch(&mut self, plate: usize, page: u64, value: u8) {
        let p = self.live.plates()[plate];
        let at = (p.src + page * PAGE + (value as u64 % 64) * 8) as usize;
        self.disk.ram[at..at + 8].copy_from_slice(&[value; 8]);
    }

    /// A write-out; `dirty`: the (plate, page) pairs touched since the last one. Returns
    /// whether it completed (every request done).
    fn write_out(&mut self, dirty: &BTreeSet<(usize, u64)>) -> bool {
        let slot = self.committed.map_or(0, |(s, _)| 1 - s);
        let generation = self.committed.map_or(0, |(_, g)| g);
        let srcs: Vec<u64> = self.live.plates().iter().map(|p| p.src).collect();
        self.history.push((generation + 1, self.regions()));
        let mut bounce = vec![0u8; 2 * PAGE as usize];
        let mut p = DiskPersist::new(&mut self.disk, Direction::ToDisk, &mut bounce);
        write_out(
            &mut self.live,
            generation,
            slot,
            &mut self.stale,
            |p| (p.src - BASE) / PAGE,
            |p, first, n| {
                let plate = srcs.iter().position(|&s| s == p.src).unwrap();
                (0..n).filter(|i| dirty.contains(&(plate, first + i))).fold(0, |w, i| w | 1 << i)
            },
            &mut p,
        );
        let done = p.error.is_none();
        if done {
            self.committed = Some((slot, generation + 1));
            let pending: Vec<Pending> = self.live.pending().to_vec();
            let mut areas = self.areas();
            crate::plates::free_pending(&pending, &mut areas);
            self.live.pending_count = 0;
        }
        done
    }
}

/// A generation and its regions' contents.
type State = (u64, Vec<Vec<u8>>);

/// Boots fresh RAM on `image`: reads the slots, restores; the generation and the regions.
fn boot(image: Vec<u8>, fail_read: Option<usize>) -> (Restored, Option<State>, SimDisk) {
    let mut disk = SimDisk::new(image);
    let sb = Superblock::new(DISK).unwrap();
    read_slots(&mut disk, SLOT_RAM).unwrap();
    disk.fail_read = fail_read.map(|n| n + disk.requests);
    let slots = SLOT_RAM.map(|at| {
        let mut t = new_table();
        t.as_mut_bytes().copy_from_slice(disk.ram(at, TABLE_SIZE as u64));
        t
    });
    let mut scratch = [0u64; 2];
    let mut bounce = [0u8; 4096];
    let r = restore([&slots[0], &slots[1]], BASE, FRAMES, &sb, &mut scratch, &mut disk, &mut bounce);
    let got = r.choice.index.map(|i| {
        let t = &slots[i];
        (t.generation, t.plates().iter().map(|p| disk.ram(p.src, p.pages * PAGE).to_vec()).collect())
    });
    (r, got, disk)
}

fn check(image: Vec<u8>, history: &[(u64, Vec<Vec<u8>>)], at_least: u64) {
    let (r, got, _) = boot(image, None);
    let Some((generation, regions)) = got else {
        assert_eq!(at_least, 0, "a committed checkpoint was lost: {:?}", r.choice);
        return;
    };
    assert!(generation >= at_least, "restored generation {generation} < committed {at_least}: {:?}", r.choice);
    assert!(!r.choice.damaged(), "a crash only tears: {:?}", r.choice);
    let (_, expected) = history.iter().find(|(g, _)| *g == generation).expect("a generation that was tried");
    assert_eq!(&regions, expected, "generation {generation} restored with wrong contents");
}

const SIZES: [u64; 3] = [1, 3, 2];
const ROUNDS: [&[(usize, u64)]; 3] = [&[], &[(0, 0), (1, 1), (2, 1)], &[(1, 0), (1, 1), (2, 0)]];

fn run_rounds(cut: Option<usize>) -> World {
    let mut w = World::new(&SIZES);
    for (round, set) in ROUNDS.iter().enumerate() {
        for &(p, page) in *set {
            w.touch(p, page, round as u8 + 1);
        }
        if round == ROUNDS.len() - 1 {
            if let Some(cut) = cut {
                w.disk.budget = w.disk.requests + cut;
            }
        }
        w.write_out(&set.iter().copied().collect());
    }
    w
}

#[test]
fn a_crash_at_every_request_restores_exactly_the_last_committed_checkpoint() {
    // The requests of the last write-out, uninterrupted: its writes, two flushes, the slot.
    let total = {
        let w = run_rounds(None);
        let before = run_rounds(Some(0)).disk.requests;
        w.disk.requests - before
    };
    assert!(total >= 5, "{total} requests");
    let mut images = 0;
    for cut in 0..=total {
        let w = run_rounds(Some(cut));
        // Done: the table's flush came back, so its generation is the one to restore.
        let at_least = if cut == total { 3 } else { 2 };
        let n = w.disk.cache.len();
        let mut rng = SmallRng::seed_from_u64(cut as u64);
        let mut subsets: Vec<Vec<bool>> = vec![vec![false; n], vec![true; n]];
        subsets.extend((0..8).map(|_| (0..n).map(|_| rng.random::<bool>()).collect()));
        for kept in &subsets {
            for torn in [None, Some(0), Some(1), Some(100)] {
                check(w.disk.crash_image(|i| kept[i], torn), &w.history, at_least);
                images += 1;
            }
        }
    }
    assert!(images > 100, "{images} crash images");
}

#[test]
fn a_write_out_stops_at_the_first_failed_request_and_commits_nothing() {
    let w = run_rounds(Some(1));
    // The first write went through, nothing after it: no slot write, no flush.
    let slot_writes = w.disk.cache.iter().filter(|(at, _)| SLOTS.contains(at)).count();
    assert_eq!(slot_writes, 0);
    assert_eq!(w.committed.map(|(_, g)| g), Some(2));
    check(w.disk.view.clone(), &w.history, 2);
}

#[test]
fn a_damaged_newest_area_rolls_back_to_the_older_slot_and_says_why() {
    let mut w = run_rounds(None);
    let (slot, generation) = w.committed.unwrap();
    assert_eq!(generation, 3);
    // Plate 1 was copied by the last write-out: its valid area holds generation 3 only.
    let p = w.live.plates()[1];
    let area = p.area[(p.valid - 1) as usize];
    w.disk.durable[area as usize + 5] ^= 0x40;
    let (r, got, _) = boot(w.disk.durable.clone(), None);
    assert_eq!(r.choice.rejected[slot], Some(Rejection::Content(1)));
    assert!(r.choice.damaged());
    let (g, regions) = got.unwrap();
    assert_eq!(g, 2);
    assert_eq!(regions, w.history.iter().find(|(h, _)| *h == 2).unwrap().1);
}

#[test]
fn an_unreadable_newest_commit_falls_back_to_the_older() {
    let w = run_rounds(None);
    let (slot, _) = w.committed.unwrap();
    // The newest slot's first read fails; the older's reads (later requests) too, so
    // fail only the first: a failing sector under the newest's areas.
    let (r, got, _) = boot(w.disk.durable.clone(), Some(0));
    assert_eq!(r.choice.rejected[slot], Some(Rejection::Unreadable));
    assert!(r.choice.index.is_none(), "the failing disk fails the older slot's reads too");
    assert!(got.is_none());
}

#[test]
fn the_area_allocation_is_rebuilt_from_the_committed_table_pending_deletions_included() {
    let mut w = run_rounds(None);
    let (_, generation) = w.committed.unwrap();
    // Delete plate 2 after the commit: its areas wait for the next commit.
    assert_eq!(w.live.remove(PlateKind::UserSpace, 2), Ok(Removed::Pending));
    let pending = w.live.pending()[0];
    // A new plate made now cannot get the pending areas.
    let before = w.area_words.clone();
    w.add(7, BASE + 20 * PAGE, pending.pages);
    let new = *w.live.plates().last().unwrap();
    assert!(!pending.area.contains(&new.area[0]) && !pending.area.contains(&new.area[1]));
    w.area_words = before;
    let _ = w.live.remove(PlateKind::UserSpace, 7);
    // Crash before the next commit: the committed table still names plate 2's areas.
    let (_, got, _) = boot(w.disk.durable.clone(), None);
    assert_eq!(got.unwrap().0, generation);
    // Commit, with the deletion: the table restored then has the pending entry, whose areas
    // the rebuilt allocation holds until they are freed.
    assert!(w.write_out(&BTreeSet::new()));
    let (r, _, disk) = boot(w.disk.durable.clone(), None);
    let i = r.choice.index.unwrap();
    let mut t = new_table();
    t.as_mut_bytes().copy_from_slice(disk.ram(SLOT_RAM[i], TABLE_SIZE as u64));
    assert_eq!(t.pending(), [pending], "the commit records what it dropped, freed after it");
    let mut words = vec![0u64; 1];
    let mut rebuilt = FrameBitmap::new(&mut words, AREA_START, AREA_PAGES).unwrap();
    take_areas(&t, &mut rebuilt).unwrap();
    // Taken until the restore frees them (the paper's restore, step 6): then the rebuilt
    // allocation is the running one.
    assert!(rebuilt.free(pending.area[0], pending.pages).is_ok());
    assert!(rebuilt.free(pending.area[1], pending.pages).is_ok());
    assert_eq!(words, w.area_words, "the rebuilt allocation is the running one");
}

#[test]
fn a_blank_disk_is_formatted_and_a_foreign_one_refused() {
    let mut disk = SimDisk::new(vec![0; DISK as usize]);
    let mut sector = [0u8; SECTOR as usize];
    let (sb, formatted) = open(&mut disk, DISK, &mut sector).unwrap();
    assert!(formatted);
    assert_eq!(open(&mut disk, DISK, &mut sector), Ok((sb, false)));
    let mut foreign = SimDisk::new(vec![0; DISK as usize]);
    foreign.view[..4].copy_from_slice(b"\x7fELF");
    assert!(matches!(open(&mut foreign, DISK, &mut sector), Err(OpenError::Disk(DiskError::Foreign { .. }))));
    assert_eq!(foreign.view[..4], *b"\x7fELF", "nothing was written");
    let mut small = SimDisk::new(vec![0; 64 << 10]);
    assert!(matches!(open(&mut small, 64 << 10, &mut sector), Err(OpenError::Disk(DiskError::TooSmall { .. }))));
}

#[test]
fn a_disk_too_small_for_the_plates_refuses_the_plate_and_changes_nothing() {
    let mut w = World::new(&[1]);
    let before = w.area_words.clone();
    let mut words = core::mem::take(&mut w.area_words);
    let mut areas = FrameBitmap::new(&mut words, AREA_START, AREA_PAGES).unwrap();
    let r = make_plate(&mut w.live, &mut areas, PlateKind::UserSpace, 9, BASE, AREA_PAGES);
    assert_eq!(r, Err(crate::plates::NoRoom));
    assert_eq!(words, before);
}
