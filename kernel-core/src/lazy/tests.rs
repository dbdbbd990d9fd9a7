use super::*;

const WRITABLE: u64 = 1 << 1;
const TABLE: u64 = 0x0123_4000;

#[test]
fn a_table_entry_goes_away_and_comes_back_as_it_was() {
    let entry = TABLE | PRESENT | WRITABLE | USER;
    let gone = away(entry).expect("a present entry of a page table");
    assert_eq!(gone & PRESENT, 0, "the first access must fault");
    assert!(is_away(gone));
    assert!(!is_away(entry), "present: not away");
    assert_eq!(back(gone), entry);
}

#[test]
fn only_present_entries_of_page_tables_go_away() {
    assert_eq!(away(0), None, "not present: nothing mapped there");
    assert_eq!(away(TABLE | PRESENT | HUGE), None, "a 2 MiB page holds no user space");
    let gone = away(TABLE | PRESENT).unwrap();
    assert_eq!(away(gone), None, "away already");
    assert!(!is_away(0), "an empty entry is not away");
    assert!(!is_away(AWAY | PRESENT), "present wins");
}

#[test]
fn the_fault_of_2_mib_away_is_a_user_access_to_a_page_not_present() {
    assert!(is_user_not_present(0b100));
    assert!(is_user_not_present(0b110), "a write");
    assert!(is_user_not_present(0b10100), "an instruction fetch");
    assert!(!is_user_not_present(0b101), "present: a protection fault");
    assert!(!is_user_not_present(0b000), "from the kernel");
}

#[test]
fn a_user_space_is_cut_at_the_2_mib_boundaries() {
    let base = 0x80_0000_0000u64;
    // Wholly inside.
    assert_eq!(pages_in_span(base + 0x3000, 5, base), (0, 5));
    // Straddling the end: the pages before it.
    assert_eq!(pages_in_span(base + SPAN - 0x2000, 5, base), (0, 2));
    // The same user space seen from the next 2 MiB: the rest.
    assert_eq!(pages_in_span(base + SPAN - 0x2000, 5, base + SPAN), (2, 3));
    // Covering the whole span and more.
    assert_eq!(pages_in_span(base - 0x1000, 1024, base), (1, 512));
    // Outside.
    assert_eq!(pages_in_span(base + SPAN, 4, base), (0, 0));
    assert_eq!(pages_in_span(base - 0x4000, 4, base), (0, 0));
}
