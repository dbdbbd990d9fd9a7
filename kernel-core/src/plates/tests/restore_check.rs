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

#[test]
fn a_flipped_bit_in_a_save_area_falls_back_to_the_older_generation_or_is_refused() {
    let (image, history) = flipped_area_image(false);
    let nvm = SimNvm::from_image(image.clone());
    let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
    let choice = choose_slot(&slots, &nvm);
    assert_eq!(choice.index, Some(0), "generation 1, in slot 0, is intact");
    assert_eq!(choice.rejected[1], Some(Rejection::Content(1)), "generation 2's plate 1 is named");
    assert!(choice.damaged());
    // What is restored is generation 1 exactly.
    check_recovery(image, &history, 1);
    let (image, _) = flipped_area_image(true);
    let nvm = SimNvm::from_image(image);
    let slots = [nvm.table(SLOTS[0]), nvm.table(SLOTS[1])];
    let choice = choose_slot(&slots, &nvm);
    assert_eq!(choice.index, None, "neither generation is intact: refused");
    assert_eq!(choice.rejected, [Some(Rejection::Content(1)), Some(Rejection::Content(1))]);
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
    let choice = choose_slot(&slots, &nvm);
    assert!(
        matches!(choice.rejected[1], Some(Rejection::Entry(e)) if matches!(e.problem, nvram::plate_check::Problem::Overlap(..))),
        "{choice:?}"
    );
    assert_eq!(choice.index, Some(0), "generation 1 is intact");
    let area = slots[0].plates[1].area;
    let before = nvm.mem.clone();
    restore(&slots[0], &mut nvm);
    for a in area {
        let r = a as usize..(a + 2 * PAGE) as usize;
        assert_eq!(nvm.mem[r.clone()], before[r], "plate 1's save areas untouched");
    }
}
