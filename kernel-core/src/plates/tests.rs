//! The commit protocol under power loss: a simulated NVM whose cache a crash may partly
//! lose, a crash after every store of a write-out, and a check that recovery always gives
//! back exactly the last committed checkpoint.

extern crate std;

use std::boxed::Box;
use std::collections::BTreeSet;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};
use zerocopy::{FromZeros, IntoBytes};

use nvram::plate::*;

use super::*;

const LINE: u64 = 64;
/// Simulated physical memory: regions, save areas and the two slots.
const MEM: u64 = 0xa_0000;
const SLOTS: [u64; 2] = [0x4_0000, 0x6_0000];

/// NVM behind a write-back cache. Every store goes to `mem` (what the CPU sees) and dirties
/// its line; `flush` marks lines for write-back, `fence` makes marked lines durable. A crash
/// keeps `durable` plus any subset of the lines not yet durable. After `budget` stores the
/// power is gone: later stores do not happen.
struct SimNvm {
    mem: Vec<u8>,
    durable: Vec<u8>,
    dirty: BTreeSet<u64>,
    flushed: BTreeSet<u64>,
    stores: usize,
    budget: usize,
    /// Whether [`Persist::sum_in_place`] is offered (as with the copy engine; else areas
    /// are checked by reading them), and whether it then refuses every batch.
    in_place: bool,
    refuse_in_place: bool,
}

impl SimNvm {
    fn new() -> Self {
        Self {
            mem: vec![0; MEM as usize],
            durable: vec![0; MEM as usize],
            dirty: BTreeSet::new(),
            flushed: BTreeSet::new(),
            stores: 0,
            budget: usize::MAX,
            in_place: false,
            refuse_in_place: false,
        }
    }

    fn powered(&self) -> bool {
        self.stores < self.budget
    }

    /// One store of a whole line (stores never cross lines here).
    fn store_line(&mut self, addr: u64, bytes: &[u8]) {
        if !self.powered() {
            return;
        }
        self.stores += 1;
        self.mem[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes);
        self.dirty.insert(addr / LINE);
    }

    fn store(&mut self, addr: u64, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            let a = addr + at as u64;
            let n = ((LINE - a % LINE) as usize).min(bytes.len() - at);
            self.store_line(a, &bytes[at..at + n]);
            at += n;
        }
    }

    /// Lines whose latest contents are not durable.
    fn volatile_lines(&self) -> Vec<u64> {
        self.dirty.union(&self.flushed).copied().collect()
    }

    /// The image after a power loss that kept exactly the lines of `kept`.
    fn crash_image(&self, kept: &[u64]) -> Vec<u8> {
        let mut image = self.durable.clone();
        for &line in kept {
            let r = (line * LINE) as usize..((line + 1) * LINE) as usize;
            image[r.clone()].copy_from_slice(&self.mem[r]);
        }
        image
    }

    /// A machine booting on `image`: everything durable, nothing cached.
    fn from_image(image: Vec<u8>) -> Self {
        Self {
            mem: image.clone(),
            durable: image,
            dirty: BTreeSet::new(),
            flushed: BTreeSet::new(),
            stores: 0,
            budget: usize::MAX,
            in_place: false,
            refuse_in_place: false,
        }
    }

    /// Checks save areas by their sums in place, as the guest does with the copy engine.
    fn with_sums_in_place(mut self) -> Self {
        self.in_place = true;
        self
    }

    fn table(&self, addr: u64) -> Box<PlateTable> {
        let mut t = new_table();
        t.as_mut_bytes().copy_from_slice(&self.mem[addr as usize..addr as usize + TABLE_SIZE]);
        t
    }
}

impl Persist for SimNvm {
    fn copy(&mut self, ranges: &[CopyRange]) -> bool {
        for r in ranges {
            let data = self.mem[r.src as usize..(r.src + r.len) as usize].to_vec();
            self.store(r.dst, &data);
        }
        false
    }

    fn flush(&mut self, addr: u64, len: u64) {
        if !self.powered() {
            return;
        }
        for line in addr / LINE..(addr + len).div_ceil(LINE) {
            if self.dirty.remove(&line) {
                self.flushed.insert(line);
            }
        }
    }

    fn fence(&mut self) {
        if !self.powered() {
            return;
        }
        for line in std::mem::take(&mut self.flushed) {
            let r = (line * LINE) as usize..((line + 1) * LINE) as usize;
            let data = self.mem[r.clone()].to_vec();
            self.durable[r].copy_from_slice(&data);
        }
    }

    fn write_slot(&mut self, slot: usize, table: &PlateTable) {
        let all = table.as_bytes();
        for (at, len) in table.used_ranges() {
            let bytes = all[at..at + len].to_vec();
            self.store(SLOTS[slot] + at as u64, &bytes);
            self.flush(SLOTS[slot] + at as u64, len as u64);
        }
    }

    fn read(&self, addr: u64, len: u64) -> &[u8] {
        &self.mem[addr as usize..(addr + len) as usize]
    }

    fn sum_in_place(&mut self, ranges: &[CopyRange], sums: &mut [RangeSum]) -> bool {
        if !self.in_place || self.refuse_in_place {
            return false;
        }
        for (r, s) in ranges.iter().zip(sums.iter_mut()) {
            s.written = area_sum(self.read(r.src, r.len), s.first);
        }
        true
    }
}

fn new_table() -> Box<PlateTable> {
    let mut t = PlateTable::new_box_zeroed().expect("a plate table fits in memory");
    t.format();
    t
}

/// A machine with `sizes.len()` plates, as the kernel would keep it.
struct World {
    nvm: SimNvm,
    live: Box<PlateTable>,
    stale: Vec<u64>,
    committed: Option<(usize, u64)>,
    /// Region contents at each committed generation.
    history: Vec<(u64, Vec<Vec<u8>>)>,
}

impl World {
    fn new(sizes: &[u64]) -> Self {
        let mut live = new_table();
        let mut next = 0x1000u64;
        for (id, &pages) in sizes.iter().enumerate() {
            let src = next;
            let a = src + pages * PAGE;
            let b = a + pages * PAGE;
            next = b + pages * PAGE;
            live.add(Plate {
                kind: PlateKind::UserSpace as u32,
                id: id as u32,
                src,
                pages,
                area: [a, b],
                valid: 0,
                summed: 0,
                sum: [0; 2],
            })
            .unwrap();
        }
        assert!(next <= SLOTS[0]);
        let pages: u64 = sizes.iter().sum();
        Self {
            nvm: SimNvm::new(),
            live,
            stale: vec![u64::MAX; (pages as usize).div_ceil(64) + 1],
            committed: None,
            history: Vec::new(),
        }
    }

    fn regions(&self, mem: &[u8]) -> Vec<Vec<u8>> {
        self.live.plates().iter().map(|p| mem[p.src as usize..(p.src + p.pages * PAGE) as usize].to_vec()).collect()
    }

    /// The program writes `value` at the start of page `page` of plate `plate` (durably
    /// or not: the program's own stores follow the same cache model).
    fn touch(&mut self, plate: usize, page: u64, value: u8) {
        let p = self.live.plates()[plate];
        self.nvm.store(p.src + page * PAGE + (value as u64 % 64) * 8, &[value; 8]);
        self.nvm.fence();
    }

    fn stale_bases(&self) -> Vec<u64> {
        let mut base = 0;
        self.live
            .plates()
            .iter()
            .map(|p| {
                let b = base;
                base += p.pages;
                b
            })
            .collect()
    }

    /// A write-out; `dirty` are the (plate, page) pairs the program touched since the last.
    fn write_out(&mut self, dirty: &BTreeSet<(usize, u64)>) -> WriteOutStats {
        let bases = self.stale_bases();
        let slot = self.committed.map_or(0, |(s, _)| 1 - s);
        let generation = self.committed.map_or(0, |(_, g)| g);
        let ids: Vec<u32> = self.live.plates().iter().map(|p| p.id).collect();
        let snapshot = self.regions(&self.nvm.mem);
        let stats = write_out(
            &mut self.live,
            generation,
            slot,
            &mut self.stale,
            |p| bases[ids.iter().position(|&i| i == p.id).unwrap()],
            |p, first, n| {
                let plate = ids.iter().position(|&i| i == p.id).unwrap();
                (0..n).filter(|i| dirty.contains(&(plate, first + i))).fold(0, |w, i| w | 1 << i)
            },
            &mut self.nvm,
        );
        // A write-out cut short may still have committed: its copies were durable before
        // the table was written, and the table's lines may all have reached NVM by
        // eviction. Its state is a legitimate outcome; a mix of states never is.
        self.history.push((generation + 1, snapshot));
        if self.nvm.powered() {
            self.committed = Some((slot, generation + 1));
        }
        stats
    }
}

/// Boots `image`: recovers the committed table and restores it; returns the generation and
/// the regions' contents.
fn recover_and_restore(image: Vec<u8>) -> Option<(u64, Vec<Vec<u8>>)> {
    let mut nvm = SimNvm::from_image(image);
    let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
    let i = choose_slot(&slots, &mut nvm).index?;
    let table = &slots[i];
    restore(table, &mut nvm, &[], |_| false);
    let regions =
        table.plates().iter().map(|p| nvm.mem[p.src as usize..(p.src + p.pages * PAGE) as usize].to_vec()).collect();
    Some((table.generation, regions))
}

/// [`choose`] over the simulated memory: its frame area is all of it.
fn choose_slot(slots: &[Box<PlateTable>; 2], nvm: &mut SimNvm) -> Choice {
    let mut scratch = [0u64; (MEM / PAGE).div_ceil(64) as usize];
    choose([&slots[0], &slots[1]], 0, MEM / PAGE, &mut scratch, nvm)
}

/// Checks that `image` recovers to exactly one of the committed checkpoints in `history`,
/// the newest whose table is durable, and never older than `at_least`.
fn check_recovery(image: Vec<u8>, history: &[(u64, Vec<Vec<u8>>)], at_least: u64) {
    match recover_and_restore(image) {
        None => assert_eq!(at_least, 0, "a committed checkpoint was lost"),
        Some((generation, regions)) => {
            assert!(generation >= at_least, "recovered generation {generation} < committed {at_least}");
            let (_, expected) =
                history.iter().find(|(g, _)| *g == generation).expect("a generation that was committed");
            assert_eq!(&regions, expected, "generation {generation} restored with wrong contents");
        }
    }
}

#[test]
fn bit_windows_read_and_write_across_words() {
    let mut bits = [0u64; 3];
    set_bits_at(&mut bits, 60, 10, 0b11_0110_1011);
    assert_eq!(bits_at(&bits, 60, 10), 0b11_0110_1011);
    assert_eq!(bits[0] >> 60, 0b1011);
    assert_eq!(bits[1] & 0b11_1111, 0b11_0110);
    assert_eq!(bits_at(&bits, 0, 64), bits[0]);
    assert_eq!(bits_at(&bits, 190, 4), 0b1100, "past the end reads as ones");
    set_bits_at(&mut bits, 64, 64, u64::MAX);
    assert_eq!(bits[1], u64::MAX);
}

/// The word-wise planner agrees with a page-by-page model on random plates.
#[test]
fn plan_copies_agrees_with_a_page_by_page_model() {
    let mut rng = SmallRng::seed_from_u64(0x1234_5678);
    let mut rnd = || rng.next_u64();
    for _ in 0..500 {
        let pages = 1 + rnd() % 300;
        let base = rnd() % 200;
        let plate = Plate {
            kind: 3,
            id: 0,
            src: 0x100000,
            pages,
            area: [0x400000, 0x800000],
            valid: 1 + (rnd() % 2) as u32,
            summed: 0,
            sum: [0; 2],
        };
        let dirty: Vec<bool> = (0..pages).map(|_| rnd() % 3 == 0).collect();
        let mut stale: Vec<u64> = (0..10).map(|_| rnd()).collect();
        let stale_before: Vec<bool> = (0..pages).map(|i| bits_at(&stale, base + i, 1) == 1).collect();
        let mut ranges = Vec::new();
        let copied = plan_copies(
            &plate,
            |first, n| (0..n).filter(|i| dirty[(first + i) as usize]).fold(0, |w, i| w | 1 << i),
            &mut stale,
            base,
            |r| ranges.push(r),
        );
        let expect: Vec<u64> = (0..pages).filter(|&i| dirty[i as usize] || stale_before[i as usize]).collect();
        assert_eq!(copied, expect.len() as u64);
        let got: Vec<u64> =
            ranges.iter().flat_map(|r| (0..r.len / PAGE).map(move |k| (r.src - plate.src) / PAGE + k)).collect();
        assert_eq!(got, expect);
        for w in ranges.windows(2) {
            assert!(w[0].src + w[0].len < w[1].src, "adjacent ranges are merged");
        }
        for i in 0..pages {
            assert_eq!(bits_at(&stale, base + i, 1) == 1, dirty[i as usize], "stale becomes dirty");
        }
    }
}

#[test]
fn plan_copies_merges_and_tracks_what_the_inactive_area_lacks() {
    let plate =
        Plate { kind: 3, id: 0, src: 0x10000, pages: 6, area: [0x20000, 0x30000], valid: 1, summed: 0, sum: [0; 2] };
    let mut stale = [0b000_011u64];
    let mut ranges = Vec::new();
    let copied = plan_copies(
        &plate,
        |first, n| (0..n).filter(|i| first + i == 2 || first + i == 4).fold(0, |w, i| w | 1 << i),
        &mut stale,
        0,
        |r| ranges.push(r),
    );
    assert_eq!(copied, 4);
    assert_eq!(
        ranges,
        [CopyRange { dst: 0x30000, src: 0x10000, len: 3 * PAGE }, CopyRange { dst: 0x34000, src: 0x14000, len: PAGE }]
    );
    assert_eq!(stale[0], 0b010_100, "the other area now lacks pages 2 and 4");
}

/// Two checkpoints, then a third write-out cut after every store, with every subset of the
/// slot's lines (the commit record) lost or kept, and the data lines all kept, all lost, or
/// alternating.
#[test]
fn a_crash_at_every_store_recovers_exactly_the_last_committed_checkpoint() {
    let sizes = [1u64, 2, 1];
    let dirty_sets: [&[(usize, u64)]; 3] = [&[], &[(0, 0), (1, 1)], &[(1, 0), (2, 0), (1, 1)]];
    // Count the stores of the third write-out on an uninterrupted run.
    let total = {
        let mut w = World::new(&sizes);
        let mut last = 0;
        for (round, set) in dirty_sets.iter().enumerate() {
            for &(p, page) in *set {
                w.touch(p, page, round as u8 + 1);
            }
            let before = w.nvm.stores;
            w.write_out(&set.iter().copied().collect());
            last = w.nvm.stores - before;
        }
        last
    };
    assert!(total > 10);
    let mut checked = 0u64;
    for cut in 0..=total {
        let mut w = World::new(&sizes);
        for (round, set) in dirty_sets.iter().enumerate() {
            for &(p, page) in *set {
                w.touch(p, page, round as u8 + 1);
            }
            if round == 2 {
                w.nvm.budget = w.nvm.stores + cut;
            }
            w.write_out(&set.iter().copied().collect());
        }
        let at_least = 2;
        let volatile = w.nvm.volatile_lines();
        let slot_lines: Vec<u64> = volatile.iter().copied().filter(|&l| l * LINE >= SLOTS[0]).collect();
        let data_lines: Vec<u64> = volatile.iter().copied().filter(|&l| l * LINE < SLOTS[0]).collect();
        assert!(slot_lines.len() <= 16, "{} slot lines", slot_lines.len());
        let data_choices: [Vec<u64>; 3] =
            [Vec::new(), data_lines.clone(), data_lines.iter().copied().step_by(2).collect()];
        for data in &data_choices {
            for mask in 0u32..(1 << slot_lines.len()) {
                let mut kept = data.clone();
                kept.extend(slot_lines.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, l)| *l));
                check_recovery(w.nvm.crash_image(&kept), &w.history, at_least);
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "{checked} crash images checked");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random plates, random writes, random crash points, random lost lines.
    #[test]
    fn random_crashes_never_lose_or_mix_a_checkpoint(
        sizes in proptest::collection::vec(1u64..4, 1..5),
        rounds in proptest::collection::vec(proptest::collection::vec((0usize..5, 0u64..4), 0..6), 1..5),
        cut_frac in 0.0f64..1.1,
        keep_seed in any::<u64>(),
    ) {
        let mut w = World::new(&sizes);
        let last = rounds.len() - 1;
        let mut at_least = 0;
        for (round, writes) in rounds.iter().enumerate() {
            let set: BTreeSet<(usize, u64)> =
                writes.iter().map(|&(p, page)| (p % sizes.len(), page % sizes[p % sizes.len()])).collect();
            for &(p, page) in &set {
                w.touch(p, page, round as u8 + 1);
            }
            if round == last {
                w.nvm.budget = w.nvm.stores + ((cut_frac * 400.0) as usize);
            } else {
                at_least = round as u64 + 1;
            }
            w.write_out(&set);
        }
        let volatile = w.nvm.volatile_lines();
        let mut rng = SmallRng::seed_from_u64(keep_seed);
        let kept: Vec<u64> = volatile.into_iter().filter(|_| rng.random::<bool>()).collect();
        check_recovery(w.nvm.crash_image(&kept), &w.history, at_least);
    }

    /// Without crashes, after every write-out the committed areas equal the regions.
    #[test]
    fn committed_areas_always_equal_the_regions(
        sizes in proptest::collection::vec(1u64..5, 1..4),
        rounds in proptest::collection::vec(proptest::collection::vec((0usize..4, 0u64..5), 0..8), 1..8),
    ) {
        let mut w = World::new(&sizes);
        for (round, writes) in rounds.iter().enumerate() {
            let set: BTreeSet<(usize, u64)> =
                writes.iter().map(|&(p, page)| (p % sizes.len(), page % sizes[p % sizes.len()])).collect();
            for &(p, page) in &set {
                w.touch(p, page, round as u8 + 7);
            }
            w.write_out(&set);
            for p in w.live.plates() {
                let area = p.area[(p.valid - 1) as usize];
                let len = (p.pages * PAGE) as usize;
                prop_assert_eq!(&w.nvm.mem[area as usize..area as usize + len], &w.nvm.mem[p.src as usize..p.src as usize + len]);
            }
        }
    }
}

/// A plate's area B is filled for the first time at the write-out after its creation: it
/// must get every page then, not only the pages dirtied since (its old bytes are whatever
/// its frames held), or a restore from B brings those old bytes back.
#[test]
fn the_first_copy_into_either_area_is_whole() {
    let mut w = World::new(&[3]);
    // The region's pages as the program left them before the first write-out, and garbage
    // in the save areas (frames used before).
    for page in 0..3 {
        w.touch(0, page, 0x11 + page as u8);
    }
    let p = w.live.plates()[0];
    w.nvm.store(p.area[1], &vec![0xee; (3 * PAGE) as usize]);
    w.nvm.fence();
    w.write_out(&BTreeSet::new());
    w.touch(0, 1, 0x42);
    w.write_out(&[(0, 1)].into_iter().collect());
    assert_eq!(w.live.plates()[0].valid, 2, "area B holds the last commit");
    let image = w.nvm.durable.clone();
    check_recovery(image, &w.history, 2);
}

/// A write-out cut short by a crash scribbles on the area it fills after the commit that
/// recorded that area's sum. The restore marks every page stale, so the next write-out
/// copies the whole area again: its sum must be that of the pages it writes, not the
/// recorded one moved by what the scribbled pages hash to (the restore after it would
/// refuse its own good copy and roll back).
#[test]
fn after_a_crash_inside_a_write_out_the_next_one_sums_the_scribbled_area_afresh() {
    let mut w = World::new(&[2]);
    w.touch(0, 0, 1);
    w.write_out(&[(0, 0), (0, 1)].into_iter().collect());
    w.touch(0, 1, 2);
    w.write_out(&[(0, 1)].into_iter().collect());
    w.touch(0, 0, 3);
    // Write-out 3, into area A: the power goes after a few of its stores.
    w.nvm.budget = w.nvm.stores + 3;
    w.write_out(&[(0, 0)].into_iter().collect());
    let image = w.nvm.crash_image(&w.nvm.volatile_lines());
    let mut nvm = SimNvm::from_image(image);
    let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
    let i = choose_slot(&slots, &mut nvm).index.expect("generation 2 is intact");
    assert_eq!(slots[i].generation, 2);
    restore(&slots[i], &mut nvm, &[], |_| false);
    let mut live = new_table();
    live.copy_from(&slots[i]);
    let stale = vec![u64::MAX; w.stale.len()];
    let mut w = World { nvm, live, stale, committed: Some((i, 2)), history: Vec::new() };
    w.history.push((2, w.regions(&w.nvm.mem)));
    w.touch(0, 1, 4);
    w.write_out(&[(0, 1)].into_iter().collect());
    let image = w.nvm.durable.clone();
    let mut nvm = SimNvm::from_image(image.clone());
    let choice = {
        let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
        choose_slot(&slots, &mut nvm)
    };
    assert_eq!(choice.rejected, [None, None], "both generations intact");
    check_recovery(image, &w.history, 3);
}

mod lazy_restore;
mod restore_check;
