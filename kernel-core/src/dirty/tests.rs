use super::*;
use proptest::prelude::*;

const PTE: u64 = 0x1234_5000 | 0b111; // present, writable, user

/// The CPU's part: a write sets the dirty bit (it always does when the bit is clear in the
/// entry: the write-out flushes the TLB after clearing bits).
fn write(entry: &mut u64) {
    *entry |= DIRTY;
}

fn scan(entry: &mut u64, generation: u64) -> bool {
    let (dirty, new) = scan_entry(*entry, rearms_all(generation));
    if let Some(new) = new {
        *entry = new;
    }
    dirty
}

#[test]
fn a_page_dirty_at_two_scans_in_a_row_is_not_rearmed() {
    let mut e = PTE;
    write(&mut e);
    assert_eq!(scan_entry(e, false), (true, Some(PTE | SEEN)), "first time: re-armed");
    let e = PTE | SEEN | DIRTY;
    assert_eq!(scan_entry(e, false), (true, None), "hot: the entry is left as it is");
}

#[test]
fn every_page_is_rearmed_at_a_rearming_write_out() {
    assert_eq!(scan_entry(PTE | SEEN | DIRTY, true), (true, Some(PTE | SEEN)));
    assert!(rearms_all(REARM_EVERY) && rearms_all(0) && !rearms_all(REARM_EVERY + 1));
}

#[test]
fn a_quiet_page_is_forgotten_and_a_clean_one_untouched() {
    assert_eq!(scan_entry(PTE | SEEN, false), (false, Some(PTE)));
    assert_eq!(scan_entry(PTE, false), (false, None));
    assert_eq!(scan_entry(PTE, true), (false, None));
}

#[test]
fn a_hot_page_that_goes_quiet_is_copied_until_the_next_rearming_only() {
    let mut e = PTE;
    let mut generation = 1;
    for _ in 0..2 {
        write(&mut e);
        assert!(scan(&mut e, generation));
        generation += 1;
    }
    // No more writes: copied until the rearming write-out, then twice clean.
    let mut copied = 0;
    while scan(&mut e, generation) {
        copied += 1;
        generation += 1;
    }
    assert!(copied <= REARM_EVERY as usize, "{copied}");
    assert_eq!(e, PTE, "forgotten: the entry as it was mapped");
}

proptest! {
    /// Whatever the writes, every page written since a scan is reported by the next one,
    /// and the address and permission bits are never changed.
    #[test]
    fn no_write_is_missed(writes in proptest::collection::vec(any::<bool>(), 1..200), start in 0u64..64) {
        let mut e = PTE;
        for (i, w) in writes.iter().enumerate() {
            if *w {
                write(&mut e);
            }
            let dirty = scan(&mut e, start + i as u64);
            prop_assert!(dirty || !*w, "a write before scan {} was missed", i);
            prop_assert_eq!(e & !(DIRTY | SEEN), PTE);
        }
    }
}
