//! The restore's own check of a commit, on the simulated NVM: a flipped save-area bit falls
//! back to the older generation (or is refused with both damaged), and an entry rewritten
//! with its checksum recomputed is refused before anything is copied.

use super::*;

/// Region contents at each committed generation.
type History = Vec<(u64, Vec<Vec<u8>>)>;

/// Two commits of two plates; a bit of plate 1's valid area flipped in the image (and of
/// its other area, if `both`).
fn flipped_area_image(both: bool) -> (Vec<u8>, History) {
    let mut w = World::new(&[1, 2]);
    w.touch(1, 0, 1);
    w.write_out(&[(1, 0)].into_iter().collect());
    w.touch(1, 1, 2);
    w.write_out(&[(1, 1)].into_iter().collect());
    let mut image = w.nvm.durable.clone();
    let p = w.live.plates()[1];
    let valid = (p.valid - 1) as usize;
    image[(p.area[valid] + PAGE + 100) as usize] ^= 4;
    if both {
        image[(p.area[1 - valid] + 7) as usize] ^= 1;
    }
    (image, w.history)
}

/// The image as a machine boots on it: save areas checked by reading them, or (`in_place`)
/// by their sums in place, as with the copy engine.
fn booting(image: Vec<u8>, in_place: bool) -> SimNvm {
    let nvm = SimNvm::from_image(image);
    if in_place {
        nvm.with_sums_in_place()
    } else {
        nvm
    }
}

#[test]
fn a_flipped_bit_in_a_save_area_falls_back_to_the_older_generation_or_is_refused() {
    for in_place in [false, true] {
        let (image, history) = flipped_area_image(false);
        let mut nvm = booting(image.clone(), in_place);
        let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
        let choice = choose_slot(&slots, &mut nvm);
        assert_eq!(choice.index, Some(0), "generation 1, in slot 0, is intact (in place {in_place})");
        assert_eq!(choice.rejected[1], Some(Rejection::Content(1)), "generation 2's plate 1 is named");
        assert!(choice.damaged());
        // What is restored is generation 1 exactly.
        check_recovery(image, &history, 1);
        let (image, _) = flipped_area_image(true);
        let mut nvm = booting(image, in_place);
        let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
        let choice = choose_slot(&slots, &mut nvm);
        assert_eq!(choice.index, None, "neither generation is intact: refused (in place {in_place})");
        assert_eq!(choice.rejected, [Some(Rejection::Content(1)), Some(Rejection::Content(1))]);
    }
}

/// The check by sums in place adds up an area's pieces: a flip in the second page of a
/// two-page area is caught, and intact areas of one and two pages pass, with pieces of a
/// page and of two; a copier that refuses leaves the check to reading, which catches it too.
#[test]
fn the_check_in_place_sums_an_area_piece_by_piece_or_leaves_it_to_reading() {
    let (image, _) = flipped_area_image(false);
    let mut nvm = booting(image.clone(), true);
    let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
    assert_eq!(slots[1].plates()[1].pages, 2, "the flipped plate spans two pieces of a page");
    for piece in [1, 2] {
        assert_eq!(verify_in_place(&slots[1], &mut nvm, piece), Some(Err(1)), "pieces of {piece}");
        assert_eq!(verify_in_place(&slots[0], &mut nvm, piece), Some(Ok(())), "pieces of {piece}");
    }
    nvm.refuse_in_place = true;
    assert_eq!(verify_in_place(&slots[1], &mut nvm, 1), None, "refused: no verdict");
    let choice = choose_slot(&slots, &mut nvm);
    assert_eq!(choice.index, Some(0), "read instead, generation 2's flip is still caught");
    assert_eq!(choice.rejected[1], Some(Rejection::Content(1)));
}

#[test]
fn a_wrong_entry_with_its_checksum_recomputed_is_refused_before_anything_is_copied() {
    let mut w = World::new(&[1, 2]);
    w.write_out(&BTreeSet::new());
    w.write_out(&BTreeSet::new());
    let mut nvm = SimNvm::from_image(w.nvm.durable.clone());
    // Slot 1 (generation 2) made to copy plate 0 over plate 1's save area A (the
    // simulation's stand-in for the kernel or a slot: its frame area is the whole memory),
    // consistently resealed.
    let mut bad = nvm.table(SLOTS[1]);
    assert_eq!(bad.generation, 2);
    bad.plates[0].src = bad.plates[1].area[0];
    bad.seal();
    nvm.mem[SLOTS[1] as usize..][..TABLE_SIZE].copy_from_slice(bad.as_bytes());
    let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
    let choice = choose_slot(&slots, &mut nvm);
    assert!(
        matches!(choice.rejected[1], Some(Rejection::Entry(e)) if matches!(e.problem, nvram::plate_check::Problem::Overlap(..))),
        "{choice:?}"
    );
    assert_eq!(choice.index, Some(0), "generation 1 is intact");
    let area = slots[0].plates[1].area;
    let before = nvm.mem.clone();
    restore(&slots[0], &mut nvm, &[], |_| false);
    for a in area {
        let r = a as usize..(a + 2 * PAGE) as usize;
        assert_eq!(nvm.mem[r.clone()], before[r], "plate 1's save areas untouched");
    }
}
