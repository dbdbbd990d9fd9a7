//! A lazy restore on the simulated NVM: the plates it leaves in their save areas are not
//! copied, and bringing them back (page by page here; the kernel does 2 MiB at first touch) never
//! writes a committed area, so a crash at any store of it, or after the program wrote pages
//! already back, restores the same generation again.

use super::*;

/// Three plates, two commits; the program then wrote on after the last one, so the regions
/// hold newer bytes than any commit (what RAM holds at a crash).
fn crashed_world() -> World {
    let mut w = World::new(&[2, 3, 1]);
    for (p, page, v) in [(0, 0, 1), (1, 2, 2), (2, 0, 3)] {
        w.touch(p, page, v);
    }
    w.write_out(&[(0, 0), (1, 2), (2, 0)].into_iter().collect());
    w.touch(1, 0, 4);
    w.touch(1, 1, 5);
    w.write_out(&[(1, 0), (1, 1)].into_iter().collect());
    w.touch(1, 0, 6);
    w.touch(0, 1, 7);
    w
}

/// Boots on `image` and restores lazily, leaving the user plates with ids in `leave`.
/// Returns the machine, the committed table and the pages copied.
fn lazy_boot(image: Vec<u8>, leave: &[u32]) -> (SimNvm, Box<PlateTable>, u64) {
    let mut nvm = SimNvm::from_image(image);
    let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
    let i = choose_slot(&slots, &mut nvm).index.expect("a commit");
    let table = nvm.table(SLOTS[i]);
    let copied = restore(&table, &mut nvm, &[], |p| leave.contains(&p.id));
    (nvm, table, copied)
}

/// Page `page` of `plate` back from its committed area, as the kernel's copy back does.
fn bring_back(nvm: &mut SimNvm, plate: &Plate, page: u64) {
    let area = plate.area[(plate.valid - 1) as usize];
    nvm.copy(&[CopyRange { dst: plate.src + page * PAGE, src: area + page * PAGE, len: PAGE }]);
}

#[test]
fn the_plates_left_are_not_copied_and_the_others_are() {
    let w = crashed_world();
    let image = w.nvm.durable.clone();
    let (nvm, table, copied) = lazy_boot(image.clone(), &[1]);
    assert_eq!(copied, 2 + 1, "plates 0 and 2 copied, plate 1 left");
    let (_, committed) = w.history.last().unwrap();
    let plates = table.plates();
    let region = |nvm: &SimNvm, p: &Plate| nvm.mem[p.src as usize..(p.src + p.pages * PAGE) as usize].to_vec();
    assert_eq!(region(&nvm, &plates[0]), committed[0]);
    assert_eq!(region(&nvm, &plates[2]), committed[2]);
    assert_eq!(region(&nvm, &plates[1]), image[plates[1].src as usize..][..(3 * PAGE) as usize], "untouched");
    assert_ne!(region(&nvm, &plates[1]), committed[1], "the crash left newer bytes there");
    let area = plates[1].area[(plates[1].valid - 1) as usize];
    assert_eq!(nvm.mem[area as usize..][..(3 * PAGE) as usize], committed[1][..], "the program reads its area");
}

#[test]
fn a_crash_at_every_store_of_the_copy_back_restores_the_same_generation() {
    let w = crashed_world();
    let image = w.nvm.durable.clone();
    let generation = w.history.last().unwrap().0;
    let total = {
        let (mut nvm, table, _) = lazy_boot(image.clone(), &[0, 1, 2]);
        let before = nvm.stores;
        for p in table.plates() {
            (0..p.pages).for_each(|page| bring_back(&mut nvm, p, page));
        }
        nvm.stores - before
    };
    assert!(total as u64 >= 6 * PAGE / LINE);
    for cut in (0..=total).step_by(7) {
        let (mut nvm, table, _) = lazy_boot(image.clone(), &[0, 1, 2]);
        nvm.budget = nvm.stores + cut;
        for p in table.plates() {
            for page in 0..p.pages {
                bring_back(&mut nvm, p, page);
                // The program writes the page it just got back (never durable, or durable:
                // either way it is newer than the commit).
                nvm.store(p.src + page * PAGE + 8, &[0xee; 8]);
            }
        }
        for areas_kept in [Vec::new(), nvm.volatile_lines()] {
            let crashed = nvm.crash_image(&areas_kept);
            for p in table.plates() {
                for area in p.area {
                    let r = area as usize..(area + p.pages * PAGE) as usize;
                    assert_eq!(crashed[r.clone()], image[r], "a save area was written");
                }
            }
            check_recovery(crashed, &w.history, generation);
        }
    }
}

#[test]
fn once_every_page_is_back_the_regions_are_the_commit() {
    let w = crashed_world();
    let (mut nvm, table, _) = lazy_boot(w.nvm.durable.clone(), &[1, 2]);
    for p in table.plates().iter().filter(|p| p.id != 0) {
        (0..p.pages).rev().for_each(|page| bring_back(&mut nvm, p, page));
    }
    let regions: Vec<Vec<u8>> =
        table.plates().iter().map(|p| nvm.mem[p.src as usize..(p.src + p.pages * PAGE) as usize].to_vec()).collect();
    assert_eq!(&regions, &w.history.last().unwrap().1);
}

#[test]
fn the_extra_ranges_are_copied_with_the_kernels_plates() {
    let w = crashed_world();
    let mut nvm = SimNvm::from_image(w.nvm.durable.clone());
    let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
    let i = choose_slot(&slots, &mut nvm).index.expect("a commit");
    // The committed slot's first line, copied to a spare page (as the live table is).
    let spare = SLOTS[0] - PAGE;
    // With an empty one beside it (a table of no pending entry has one), left out.
    let also = [CopyRange { dst: spare, src: SLOTS[i], len: LINE }, CopyRange { dst: spare, src: SLOTS[i], len: 0 }];
    let copied = restore(&slots[i], &mut nvm, &also, |_| true);
    assert_eq!(copied, 0, "every plate left");
    assert_eq!(nvm.mem[spare as usize..][..LINE as usize], nvm.mem[SLOTS[i] as usize..][..LINE as usize]);
}
