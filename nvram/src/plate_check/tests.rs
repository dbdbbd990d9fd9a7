//! Every kind of wrong entry is refused before a restore copies anything, and a sound
//! table passes.

extern crate std;

use std::boxed::Box;

use zerocopy::FromZeros;

use super::*;
use crate::plate::{Pending, Plate};

const FRAMES: u64 = 1024;
const F: u64 = layout::FRAMES_BASE;
const P: u64 = PAGE_SIZE;

fn sound() -> Box<PlateTable> {
    let mut t = PlateTable::new_box_zeroed().expect("a plate table fits in memory");
    t.format();
    t.add(Plate::new(PlateKind::Fixed, FIXED_RESOURCES, layout::RESOURCES, 20, layout::RESOURCES_SAVE)).unwrap();
    t.add(Plate::new(PlateKind::Fixed, FIXED_FRAME_BITMAP, layout::FRAME_BITMAP, 1, layout::FRAME_BITMAP_SAVE))
        .unwrap();
    t.add(Plate::new(PlateKind::KernelSpace, 0, F, 4, [F + 4 * P, F + 8 * P])).unwrap();
    t.add(Plate::new(PlateKind::UserSpace, 3, F + 12 * P, 2, [F + 14 * P, F + 16 * P])).unwrap();
    // Committed once, then deleted: its areas wait in the pending list (an uncommitted
    // plate's would be freed at once).
    t.add(Plate { valid: 1, ..Plate::new(PlateKind::UserSpace, 4, F + 18 * P, 1, [F + 19 * P, F + 20 * P]) }).unwrap();
    assert_eq!(t.remove(PlateKind::UserSpace, 4), Ok(crate::plate::Removed::Pending));
    t.seal();
    t
}

fn check(t: &PlateTable) -> Result<(), EntryError> {
    check_entries(t, F, FRAMES, &mut [u64::MAX; 16])
}

#[test]
fn a_sound_table_passes() {
    assert_eq!(check(&sound()), Ok(()));
}

/// What is damaged, how, and the verdict it must give.
type Case = (&'static str, fn(&mut PlateTable), Result<(), EntryError>);

#[test]
fn each_wrong_entry_is_named() {
    let plate = |i: usize, problem| Err(EntryError { entry: Entry::Plate(i), problem });
    let cases: [Case; 12] = [
        ("unknown kind", |t| t.plates[2].kind = 9, plate(2, Problem::Kind(9))),
        ("valid index", |t| t.plates[3].valid = 3, plate(3, Problem::Valid(3))),
        ("a fixed plate of no pages", |t| t.plates[1].pages = 0, plate(1, Problem::Pages(0))),
        ("more pages than frames", |t| t.plates[3].pages = FRAMES + 1, plate(3, Problem::Pages(FRAMES + 1))),
        // The copier would overwrite the kernel image, the header or a slot.
        (
            "region over the kernel",
            |t| t.plates[2].src = layout::KERNEL_START,
            plate(2, Problem::Outside(Range::Region, layout::KERNEL_START)),
        ),
        (
            "area over the root header",
            |t| t.plates[3].area[1] = layout::ROOT_HEADER,
            plate(3, Problem::Outside(Range::AreaB, layout::ROOT_HEADER)),
        ),
        (
            "region over a slot",
            |t| t.plates[3].src = layout::PLATE_SLOTS[1],
            plate(3, Problem::Outside(Range::Region, layout::PLATE_SLOTS[1])),
        ),
        (
            "past the frames",
            |t| t.plates[3].area[0] = F + (FRAMES - 1) * P,
            plate(3, Problem::Outside(Range::AreaA, F + (FRAMES - 1) * P)),
        ),
        ("unaligned", |t| t.plates[3].src += 8, plate(3, Problem::Outside(Range::Region, F + 12 * P + 8))),
        ("areas overlap", |t| t.plates[3].area[1] = F + 15 * P, plate(3, Problem::Overlap(Range::AreaB, F + 15 * P))),
        ("a fixed plate elsewhere", |t| t.plates[0].area[0] = F, plate(0, Problem::Fixed)),
        (
            "a fixed plate too large",
            |t| t.plates[1].pages = FIXED_PAGES_MAX + 1,
            plate(1, Problem::Pages(FIXED_PAGES_MAX + 1)),
        ),
    ];
    for (what, damage, expected) in cases {
        let mut t = sound();
        damage(&mut t);
        t.seal();
        assert_eq!(t.check(), Ok(()), "{what}: the checksum alone lets it through");
        assert_eq!(check(&t), expected, "{what}");
    }
}

#[test]
fn pending_deletions_and_overlaps_across_plates_are_checked() {
    let mut t = sound();
    // A pending area that is also a live plate's region: freeing it would free the region.
    t.pending[0] = Pending { area: [F + 12 * P, F + 30 * P], pages: 1 };
    assert_eq!(
        check(&t),
        Err(EntryError { entry: Entry::Pending(0), problem: Problem::Overlap(Range::AreaA, F + 12 * P) })
    );
    let mut t = sound();
    t.pending[0].pages = FRAMES + 1;
    assert_eq!(check(&t), Err(EntryError { entry: Entry::Pending(0), problem: Problem::Pages(FRAMES + 1) }));
    let mut t = sound();
    t.plates[3].src = F + 2 * P;
    assert_eq!(
        check(&t),
        Err(EntryError { entry: Entry::Plate(3), problem: Problem::Overlap(Range::Region, F + 2 * P) })
    );
    assert_eq!(check_entries(&sound(), F, FRAMES, &mut [0; 2]).unwrap_err().problem, Problem::Scratch);
    let e = check(&t).unwrap_err();
    assert_eq!(
        std::format!("{e}"),
        std::format!("plate 3: region at {:#x} overlaps another plate's frames", F + 2 * P)
    );
}

#[test]
fn frames_are_marked_across_words() {
    let mut b = [0u64; 4];
    assert!(mark_frames(&mut b, 60, 70));
    assert_eq!(b[0], 0xf << 60);
    assert_eq!(b[1], u64::MAX);
    assert_eq!(b[2], 0x3);
    assert!(!mark_frames(&mut b, 129, 1));
    assert!(mark_frames(&mut b, 130, 2));
    assert!(!mark_frames(&mut b, 250, 10), "past the end");
}
