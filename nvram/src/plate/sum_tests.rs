//! The page hash and the area sums: the CRC on every path, what changes a hash, how sums
//! of runs add up.

extern crate std;

use std::vec::Vec;

use super::*;

/// A save area's sum: split at any page into runs (as a write-out copies them, each run with
/// the index of its first page), the runs' sums add up to the whole area's, page by page
/// ([`AreaSum`], what the copiers use) as over the bytes ([`area_sum`]); a flipped bit or two
/// pages swapped change it; a short last page counts its bytes.
#[test]
fn an_area_sum_is_the_sum_of_its_runs_and_sees_any_change() {
    let page = PAGE_BYTES;
    let bytes: Vec<u8> =
        (0..5 * page + 100).map(|i| (i as u64).wrapping_mul(0x9e37_79b9) as u8 ^ (i >> 12) as u8).collect();
    let whole = area_sum(&bytes, 0);
    let mut by_page = AreaSum::new(0);
    bytes.chunks(page).for_each(|p| by_page.page(p));
    assert_eq!(by_page.sum(), whole);
    for cut in 0..=6 {
        let at = (cut * page).min(bytes.len());
        let runs = area_sum(&bytes[..at], 0).wrapping_add(area_sum(&bytes[at..], cut as u64));
        assert_eq!(runs, whole, "cut at page {cut}");
    }
    let mut flipped = bytes.clone();
    flipped[3 * page + 17] ^= 4;
    assert_ne!(area_sum(&flipped, 0), whole);
    let mut swapped = bytes.clone();
    swapped[..2 * page].rotate_left(page);
    assert_ne!(area_sum(&swapped, 0), whole);
    let mut tail = bytes.clone();
    tail[5 * page + 99] ^= 1;
    assert_ne!(area_sum(&tail, 0), whole);
    assert_eq!(area_sum(&[], 7), 0, "no page, no hash");
}

/// A run's first index is the guest's to choose (a copy engine's sum request): the last
/// index there is wraps to 0 instead of overflowing, the same for every copier.
#[test]
fn a_run_may_start_at_any_index() {
    let page = [7u8; PAGE_BYTES];
    let mut sum = AreaSum::new(u64::MAX);
    sum.page(&page);
    sum.page(&page);
    assert_eq!(sum.next_index(), 1);
    assert_eq!(sum.sum(), page_hash(u64::MAX, &page).wrapping_add(page_hash(0, &page)));
}

/// The page hash's CRC is the catalogued CRC-32C (its check value), and the host's vector
/// path (`crc-fast`, with `std`), the guest's `crc32` instruction and the table for a CPU
/// without it agree on every length up to a page and past it, at every alignment: a page
/// the engine hashed on the host is checked in the guest by another.
#[test]
fn the_page_crc_is_crc32c_on_every_path() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    let bytes: Vec<u8> =
        (0..2 * PAGE_BYTES + 64).map(|i| (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) as u8).collect();
    let instruction = has_crc32_instruction();
    if !instruction {
        std::eprintln!("no SSE4.2 here: the crc32 instruction's path is not compared");
    }
    for len in (0..=PAGE_BYTES + 200).step_by(37).chain([PAGE_BYTES - 1, PAGE_BYTES, PAGE_BYTES + 1]) {
        for at in [0, 1, 8, 63] {
            let part = &bytes[at..at + len];
            assert_eq!(crc32c(part), CRC32C_TABLE.checksum(part), "{len} bytes at offset {at}");
            if instruction {
                // SAFETY: checked above.
                assert_eq!(unsafe { crc32c_by_instruction(part) }, crc32c(part), "{len} bytes at offset {at}");
            }
        }
    }
}

/// Every single-bit flip anywhere in a page, and two-bit flips of bit 63 of two words (where
/// a sum of words would lose the carry: the kind of change a wrapping checksum misses), change the page's hash; so does its index, and a swap of two pages
/// changes their area's sum.
#[test]
fn any_flip_of_one_bit_or_two_changes_the_page_hash() {
    let page: Vec<u8> =
        (0..PAGE_BYTES).map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17) as u8).collect();
    let hash = page_hash(3, &page);
    let mut flipped = page.clone();
    for bit in 0..8 * PAGE_BYTES {
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert_ne!(page_hash(3, &flipped), hash, "bit {bit}");
        flipped[bit / 8] ^= 1 << (bit % 8);
    }
    // Bit 63 of two words: a sum of words misses it.
    for (a, b) in [(7, 15), (7, 4095), (4087, 4095), (0, 4088)] {
        flipped[a] ^= 0x80;
        flipped[b] ^= 0x80;
        assert_ne!(page_hash(3, &flipped), hash, "bytes {a} and {b}");
        flipped[a] ^= 0x80;
        flipped[b] ^= 0x80;
    }
    assert_ne!(page_hash(4, &page), hash, "the index is folded in");
    let other: Vec<u8> = page.iter().map(|b| b ^ 0x5a).collect();
    let two = |first: &[u8], second: &[u8]| page_hash(0, first).wrapping_add(page_hash(1, second));
    assert_ne!(two(&page, &other), two(&other, &page), "a swap is seen");
}
