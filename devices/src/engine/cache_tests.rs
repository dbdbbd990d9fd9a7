//! The hashes the engine keeps of what it wrote (`cache`): a copy's overwritten sum is what
//! the area's sum counted for the pages it overwrites.

use super::*;
use nvram::plate::area_sum;

const RAM: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// A save area of [`PAGES`] pages, as pages `0..` of its plate.
const AREA: u64 = 0x40000;
const PAGES: u64 = 19;

fn engine() -> CopyEngine {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let domain = Arc::new(Mutex::new(PersistenceDomain::eadr(mem.clone(), false)));
    // A dirty log that is always empty: the engine answers dirty-log requests.
    let words = (RAM / PAGE / 64) as usize;
    let tracker = DirtyTracker::new(RAM, Some(Box::new(move || Some(vec![0; words]))));
    CopyEngine::new(mem, domain).with_dirty_log(Arc::new(Mutex::new(tracker)))
}

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    (0..len).map(|i| ((i ^ seed << 20).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8).collect()
}

fn bytes_at(e: &CopyEngine, at: u64, len: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len as usize];
    e.mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
    bytes
}

/// Rings a one-descriptor batch at 0x1000 (sums at 0x1200 if `sum`); returns its status
/// and the sum left.
fn ring(e: &mut CopyEngine, d: Descriptor, sum: Option<RangeSum>) -> (u32, RangeSum) {
    let head = BatchHeader {
        magic: BATCH_MAGIC,
        count: 1,
        status: 0,
        failed: 0,
        flags: FLAG_DURABLE,
        descriptors: 0x1100,
        sums: if sum.is_some() { 0x1200 } else { 0 },
    };
    e.mem.write_slice(head.as_bytes(), GuestAddress(0x1000)).unwrap();
    e.mem.write_slice(d.as_bytes(), GuestAddress(0x1100)).unwrap();
    e.mem.write_slice(sum.unwrap_or_default().as_bytes(), GuestAddress(0x1200)).unwrap();
    e.write(0, &0x1000u32.to_le_bytes());
    let mut done = BatchHeader::default();
    e.mem.read_slice(done.as_mut_bytes(), GuestAddress(0x1000)).unwrap();
    let mut sum = RangeSum::default();
    e.mem.read_slice(sum.as_mut_bytes(), GuestAddress(0x1200)).unwrap();
    (done.status, sum)
}

/// A summed copy of `pages` pages of `seed`'s pattern (staged at 0x10000) over pages
/// `first..` of the area at `area`; returns the sums, the written one checked.
fn copy_pages(e: &mut CopyEngine, seed: u64, area: u64, first: u64, len: u64) -> RangeSum {
    e.mem.write_slice(&pattern(seed, len), GuestAddress(0x10000)).unwrap();
    let d = Descriptor { src: 0x10000, dst: area + first * PAGE, len };
    let (status, sum) = ring(e, d, Some(RangeSum::new(first, true)));
    assert_eq!(status, STATUS_DONE);
    assert_eq!(sum.written, area_sum(&pattern(seed, len), first), "the written sum is nvram's");
    assert_eq!(bytes_at(e, d.dst, len), pattern(seed, len), "the copy is made");
    sum
}

/// A store into the area that the engine has no word of (a stray store of the guest's, a
/// device's).
fn scribble(e: &CopyEngine, page: u64) -> Vec<u8> {
    let at = AREA + page * PAGE + 8;
    let before = bytes_at(e, at, 16);
    e.mem.write_slice(&[0xa5; 16], GuestAddress(at)).unwrap();
    before
}

/// A write-out's bookkeeping of the area's sum over the engine's copies (`kernel_core::
/// plates`): a whole copy sums it afresh, a partial one moves it by written less
/// overwritten. A scribble on a page that a later copy overwrites is gone, and the sum is
/// that of the area's bytes (no good area refused); a scribble that stays in the area
/// leaves the sum off (the restore refuses the area). Pages the engine wrote are not read
/// again (the scribble on page 11 would show).
#[test]
fn the_sum_kept_by_the_hashes_is_the_areas_and_a_scribble_that_stays_is_caught() {
    let mut e = engine();
    let mut sum = copy_pages(&mut e, 1, AREA, 0, PAGES * PAGE).written;
    assert_eq!(sum, area_sum(&bytes_at(&e, AREA, PAGES * PAGE), 0));
    let kept_3 = scribble(&e, 3);
    scribble(&e, 11);
    // Pages 8..16 again: page 11's scribble overwritten, page 3's left.
    let partial = copy_pages(&mut e, 2, AREA, 8, 8 * PAGE);
    assert_eq!(partial.overwritten, area_sum(&pattern(1, PAGES * PAGE)[8 * 4096..16 * 4096], 8), "as written");
    sum = sum.wrapping_add(partial.written).wrapping_sub(partial.overwritten);
    assert_ne!(sum, area_sum(&bytes_at(&e, AREA, PAGES * PAGE), 0), "page 3's scribble stays: refused");
    e.mem.write_slice(&kept_3, GuestAddress(AREA + 3 * PAGE + 8)).unwrap();
    assert_eq!(sum, area_sum(&bytes_at(&e, AREA, PAGES * PAGE), 0), "page 11's scribble is gone: accepted");
    // And again over pages the partial copy wrote, and some of the first.
    let again = copy_pages(&mut e, 3, AREA, 4, 9 * PAGE);
    sum = sum.wrapping_add(again.written).wrapping_sub(again.overwritten);
    assert_eq!(sum, area_sum(&bytes_at(&e, AREA, PAGES * PAGE), 0));
}

/// Where the engine wrote a page otherwise than as a whole page of a plate, or where
/// another copier that sums may have written it (the guest's, after a batch the engine
/// refused), the overwritten sum is that of the bytes there, read (a scribble the engine has
/// no word of shows it).
#[test]
fn a_page_written_otherwise_is_read_again() {
    type Writer = fn(&mut CopyEngine) -> (u64, u64);
    // Each writes over the area (pages 0..19, written whole by the engine first) and
    // returns the page index and address the next copy starts at.
    let writers: [(&str, Writer); 6] = [
        ("the engine's copy without sums", |e| {
            e.mem.write_slice(&[0x5a; 16], GuestAddress(0x30000)).unwrap();
            let (status, _) = ring(e, Descriptor { src: 0x30000, dst: AREA + 11 * PAGE, len: 16 }, None);
            assert_eq!(status, STATUS_DONE);
            (0, AREA)
        }),
        ("the engine's dirty-log bitmap", |e| {
            let request = nvram::engine::DirtyRequest {
                magic: nvram::engine::DIRTY_MAGIC,
                status: 0,
                first_page: 0,
                pages: 128,
                out: AREA + 11 * PAGE,
            };
            e.mem.write_slice(request.as_bytes(), GuestAddress(0x3000)).unwrap();
            e.write(REG_DIRTY, &0x3000u32.to_le_bytes());
            assert_eq!(bytes_at(e, AREA + 11 * PAGE, 16), [0; 16], "the bitmap is written there");
            (0, AREA)
        }),
        ("a short page", |e| {
            copy_pages(e, 7, AREA, 11, 100);
            (0, AREA)
        }),
        ("a batch refused", |e| {
            let (status, _) =
                ring(e, Descriptor { src: 0x10000, dst: RAM - 10, len: PAGE }, Some(RangeSum::new(0, true)));
            assert_eq!(status, STATUS_BAD_DESCRIPTOR);
            (0, AREA)
        }),
        ("hashed as other pages of a plate", |_| (1, AREA - PAGE)),
        ("a destination not page-aligned", |_| (0, AREA + 8)),
    ];
    for (what, write) in writers {
        let mut e = engine();
        copy_pages(&mut e, 1, AREA, 0, PAGES * PAGE);
        let (first, at) = write(&mut e);
        scribble(&e, 11);
        let old = bytes_at(&e, at + first * PAGE, PAGES * PAGE);
        let sum = copy_pages(&mut e, 2, at, first, PAGES * PAGE);
        assert_eq!(sum.overwritten, area_sum(&old, first), "{what}: the bytes overwritten, read");
    }
}

/// The pages of several copies of a batch are hashed in groups together: each copy's sums
/// are still nvram's of its own bytes, and a copy over a page that an earlier copy of the
/// same batch wrote overwrites (and sums) what that copy wrote.
#[test]
fn the_copies_of_a_batch_are_summed_each_for_itself() {
    let mut e = engine();
    // Five copies of three pages and one short one, then one over copy 2's second page.
    let mut descriptors: Vec<Descriptor> =
        (0..6u64).map(|i| Descriptor { src: 0x10000 + i * 0x4000, dst: AREA + i * 0x4000, len: 3 * PAGE }).collect();
    descriptors[5].len = 100;
    descriptors.push(Descriptor { src: 0x30000, dst: AREA + 2 * 0x4000 + PAGE, len: PAGE });
    for (i, d) in descriptors.iter().enumerate() {
        e.mem.write_slice(&pattern(i as u64 + 1, d.len), GuestAddress(d.src)).unwrap();
    }
    let before: Vec<Vec<u8>> = descriptors.iter().map(|d| bytes_at(&e, d.dst, d.len)).collect();
    let requests: Vec<RangeSum> = (0..descriptors.len() as u64).map(|i| RangeSum::new(10 * i, true)).collect();
    let head = BatchHeader {
        magic: BATCH_MAGIC,
        count: descriptors.len() as u32,
        status: 0,
        failed: 0,
        flags: FLAG_DURABLE,
        descriptors: 0x1100,
        sums: 0x1400,
    };
    e.mem.write_slice(head.as_bytes(), GuestAddress(0x1000)).unwrap();
    e.mem.write_slice(descriptors.as_bytes(), GuestAddress(0x1100)).unwrap();
    e.mem.write_slice(requests.as_bytes(), GuestAddress(0x1400)).unwrap();
    e.write(0, &0x1000u32.to_le_bytes());
    let mut sums = vec![RangeSum::default(); descriptors.len()];
    e.mem.read_slice(sums.as_mut_bytes(), GuestAddress(0x1400)).unwrap();
    for (i, (d, sum)) in descriptors.iter().zip(&sums).enumerate() {
        let first = 10 * i as u64;
        assert_eq!(sum.written, area_sum(&pattern(i as u64 + 1, d.len), first), "copy {i} wrote");
        let overwritten = if i == 6 { pattern(3, 2 * PAGE)[PAGE as usize..].to_vec() } else { before[i].clone() };
        assert_eq!(sum.overwritten, area_sum(&overwritten, first), "copy {i} overwrote");
    }
    assert_eq!(bytes_at(&e, AREA + 2 * 0x4000 + PAGE, PAGE), pattern(7, PAGE), "the last copy stands");
    // Over them again as pages 0..3 of a plate: hashed as other pages, read.
    let again = copy_pages(&mut e, 9, AREA + 2 * 0x4000, 0, 3 * PAGE);
    let now = [pattern(3, PAGE), pattern(7, PAGE), pattern(3, 3 * PAGE)[2 * PAGE as usize..].to_vec()].concat();
    assert_eq!(again.overwritten, area_sum(&now, 0));
}
