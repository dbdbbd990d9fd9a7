//! The plate table's own checks: every bit of its meaningful part is guarded by the
//! checksum, and the committed slot is the valid one with the highest generation. (The
//! commit protocol under power loss is `kernel_core::plates`'s test.)

extern crate std;

use std::boxed::Box;
use std::vec::Vec;

use zerocopy::FromZeros;

use super::*;

fn new_table() -> Box<PlateTable> {
    let mut t = PlateTable::new_box_zeroed().expect("a plate table fits in memory");
    t.format();
    t
}

#[test]
fn tables_round_trip_and_every_bit_flip_is_caught() {
    let mut t = new_table();
    t.add(Plate { valid: 1, ..Plate::new(PlateKind::UserSpace, 5, 0x1000, 2, [0x3000, 0x5000]) }).unwrap();
    t.add(Plate { valid: 2, ..Plate::new(PlateKind::KernelSpace, 0, 0x9000, 1, [0xa000, 0xb000]) }).unwrap();
    assert_eq!(t.remove(PlateKind::UserSpace, 5), Ok(Removed::Pending));
    assert_eq!(t.remove(PlateKind::UserSpace, 5), Ok(Removed::NoPlate));
    assert_eq!(t.pending(), &[Pending { area: [0x3000, 0x5000], pages: 2 }]);
    assert!(t.is_plated(PlateKind::KernelSpace, 0) && !t.is_plated(PlateKind::UserSpace, 5));
    t.generation = 7;
    t.seal();
    assert_eq!(t.check(), Ok(()));
    let [(_, head), (plates_at, plates_len)] = t.used_ranges();
    for byte in (0..head).chain(plates_at..plates_at + plates_len) {
        for bit in 0..8 {
            let mut copy = new_table();
            copy.copy_from(&t);
            copy.as_mut_bytes()[byte] ^= 1 << bit;
            assert!(copy.check().is_err(), "flip of byte {byte} bit {bit} not caught");
        }
    }
}

#[test]
fn the_sealed_checksum_is_checksum64_of_the_meaningful_words() {
    let mut t = new_table();
    t.add(Plate { valid: 1, ..Plate::new(PlateKind::UserSpace, 2, 0x1000, 2, [0x3000, 0x5000]) }).unwrap();
    t.add(Plate { valid: 2, ..Plate::new(PlateKind::PageTables, 1, 0x9000, 1, [0xa000, 0xb000]) }).unwrap();
    assert_eq!(t.remove(PlateKind::PageTables, 1), Ok(Removed::Pending));
    t.generation = 9;
    t.seal();
    let words = t.as_words();
    let pending_at = HEADER_WORDS + PLATED_WORDS;
    let plates_at = pending_at + PENDING_WORDS * MAX_PENDING;
    let meaningful: Vec<u64> = words[..4]
        .iter()
        .chain(&words[HEADER_WORDS..pending_at + PENDING_WORDS])
        .chain(&words[plates_at..plates_at + PLATE_WORDS])
        .copied()
        .collect();
    assert_eq!(t.checksum, checksum64(meaningful.into_iter()));
}

#[test]
fn the_committed_slot_is_the_valid_one_with_the_highest_generation() {
    let (mut a, mut b) = (new_table(), new_table());
    a.generation = 3;
    a.seal();
    b.generation = 4;
    b.seal();
    assert_eq!(committed([&a, &b]), Some(1));
    b.plates[0].src = 1; // not covered: count is 0
    b.count = 1; // now covered, checksum stale: torn
    assert_eq!(committed([&a, &b]), Some(0));
    a.magic = 0;
    assert_eq!(committed([&a, &b]), None);
}

#[test]
fn a_torn_slot_claiming_a_higher_generation_is_passed_over() {
    let (mut a, mut b) = (new_table(), new_table());
    a.generation = 7;
    a.seal();
    b.generation = 6;
    b.seal();
    assert_eq!(committed([&a, &b]), Some(0), "the newer valid slot, whichever its index");
    b.generation = 6;
    a.generation = 6;
    a.seal();
    assert_eq!(committed([&a, &b]), Some(0), "equal generations: slot 0");
    b.generation = u64::MAX; // torn: a garbage generation, a stale checksum
    assert_eq!(committed([&a, &b]), Some(0));
    a.checksum ^= 1;
    assert_eq!(committed([&a, &b]), None);
}

#[test]
fn the_checksum_is_the_same_however_the_words_are_split() {
    let words: Vec<u64> = (0..37u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 7)).collect();
    let whole = checksum64(words.iter().copied());
    for a in 0..words.len() {
        for b in a..words.len() {
            let mut c = Checksum::new();
            for part in [&words[..a], &words[a..b], &words[b..]] {
                c.words(part);
            }
            assert_eq!(c.finish(), whole, "split at {a}, {b}");
        }
    }
    // Every single-bit change and every swap of two different words is seen.
    for i in 0..words.len() {
        let mut flipped = words.clone();
        flipped[i] ^= 1 << (i % 64);
        assert_ne!(checksum64(flipped.into_iter()), whole);
        let mut swapped = words.clone();
        swapped.swap(i, (i + 1) % words.len());
        assert_ne!(checksum64(swapped.into_iter()), whole);
    }
}

/// Every resource that can exist at once, as (kind, id): the two fixed tables, every kernel
/// space, every space's page tables, every user space.
fn every_resource() -> Vec<(PlateKind, u32)> {
    use crate::resources::{KERNEL_SPACES, SPACES, USER_SPACES};
    let fixed = [FIXED_RESOURCES, FIXED_FRAME_BITMAP].map(|id| (PlateKind::Fixed, id));
    let kernel = (0..KERNEL_SPACES as u32).map(|id| (PlateKind::KernelSpace, id));
    let tables = (0..SPACES as u32).map(|id| (PlateKind::PageTables, id));
    let user = (0..USER_SPACES as u32).map(|id| (PlateKind::UserSpace, id));
    fixed.into_iter().chain(kernel).chain(tables).chain(user).collect()
}

fn plate_of(kind: PlateKind, id: u32, n: u64) -> Plate {
    let src = 0x100_0000 + n * 0x3000;
    Plate::new(kind, id, src, 1, [src + 0x1000, src + 0x2000])
}

#[test]
fn a_table_holds_a_plate_for_every_resource_that_can_exist() {
    let mut t = new_table();
    for (n, (kind, id)) in every_resource().into_iter().enumerate() {
        assert!(t.add(plate_of(kind, id, n as u64)).is_some(), "no room for the plate of {kind:?} {id} (plate {n})");
    }
    assert!(t.add(plate_of(PlateKind::UserSpace, 0, 0)).is_none(), "one plate per resource");
}

#[test]
fn deleting_every_committed_plate_between_two_write_outs_never_fills_the_pending_list() {
    let mut t = new_table();
    let all = every_resource();
    for (n, &(kind, id)) in all.iter().enumerate() {
        let mut plate = plate_of(kind, id, n as u64);
        plate.valid = 1; // committed by a write-out
        t.add(plate).unwrap();
    }
    for &(kind, id) in all.iter().filter(|(kind, _)| *kind != PlateKind::Fixed) {
        assert!(t.removal_fits(kind, id));
        assert_eq!(t.remove(kind, id), Ok(Removed::Pending), "the pending list is full at {kind:?} {id}");
        assert!(!t.is_plated(kind, id), "{kind:?} {id} keeps no stale plate");
    }
    assert_eq!(t.pending().len(), all.len() - 2);
    assert_eq!(t.count, 2, "the fixed plates stay");
}

#[test]
fn a_plate_made_since_the_last_commit_is_freed_at_once_not_pending() {
    let mut t = new_table();
    let fresh = plate_of(PlateKind::UserSpace, 3, 1);
    t.add(fresh).unwrap();
    assert!(!t.has_room(PlateKind::UserSpace, 3), "already plated");
    assert!(t.has_room(PlateKind::UserSpace, 4));
    assert_eq!(t.remove(PlateKind::UserSpace, 3), Ok(Removed::FreeNow(Pending { area: fresh.area, pages: 1 })));
    assert!(t.pending().is_empty() && t.count == 0 && !t.is_plated(PlateKind::UserSpace, 3));
}
