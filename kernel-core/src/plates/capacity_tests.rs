//! Plate-ification at the limits: a table or a frame allocator with no room refuses a plate
//! without losing a frame, however often a write-out retries.

extern crate std;

use std::boxed::Box;
use std::vec;

use zerocopy::FromZeros;

use nvram::plate::{PlateKind, PlateTable, MAX_PLATES};

use super::*;

const BASE: u64 = 0x100_0000;

fn new_table() -> Box<PlateTable> {
    let mut t = PlateTable::new_box_zeroed().expect("a plate table fits in memory");
    t.format();
    t
}

/// A full table (as a table smaller than the resources that can exist filled up): every
/// retry is refused and the free frames stay what they were.
#[test]
fn a_full_table_refuses_a_plate_at_every_retry_without_losing_frames() {
    let mut words = vec![0u64; 64];
    let mut frames = FrameBitmap::new(&mut words, BASE, 4096).unwrap();
    let mut live = new_table();
    for id in 0..MAX_PLATES as u32 {
        let kind = [PlateKind::KernelSpace, PlateKind::PageTables, PlateKind::UserSpace][id as usize % 3];
        let plate = Plate { valid: 1, ..Plate::new(kind, id / 3, 0, 1, [0, 0]) };
        live.add(plate).expect("room for the filler plates");
    }
    let used = frames.used();
    for retry in 0..10 {
        assert_eq!(make_plate(&mut live, &mut frames, PlateKind::UserSpace, 1000, BASE, 4), Err(NoRoom));
        assert_eq!(frames.used(), used, "frames lost at retry {retry}");
    }
}

#[test]
fn no_frames_for_the_second_area_gives_the_first_back() {
    let mut words = vec![0u64; 1];
    let mut frames = FrameBitmap::new(&mut words, BASE, 64).unwrap();
    let mut live = new_table();
    frames.alloc(40).unwrap();
    let used = frames.used();
    for _ in 0..3 {
        assert_eq!(make_plate(&mut live, &mut frames, PlateKind::UserSpace, 0, BASE, 16), Err(NoRoom));
        assert_eq!(frames.used(), used);
    }
    assert_eq!(live.count, 0);
    let plate = make_plate(&mut live, &mut frames, PlateKind::UserSpace, 0, BASE, 8).expect("room for 2 x 8");
    assert_eq!((live.count, frames.used()), (1, used + 16));
    assert!(live.is_plated(PlateKind::UserSpace, 0) && plate.valid == 0);
    assert_eq!(make_plate(&mut live, &mut frames, PlateKind::UserSpace, 0, BASE, 1), Err(NoRoom), "one per resource");
    assert_eq!(frames.used(), used + 16);
}
