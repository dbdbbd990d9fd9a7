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
    let head = BatchHeader::durable(1, 0x1100, if sum.is_some() { 0x1200 } else { 0 });
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

/// Several copies of a batch, each page hashed just after its copy: each copy's sums are
/// nvram's of its own bytes, and a copy over a page that an earlier copy of the same batch
/// wrote overwrites (and sums) what that copy wrote.
#[test]
fn the_copies_of_a_batch_are_summed_each_for_itself() {
    let mut e = engine();
    // Five copies of three pages and one short one, then one over copy 2's second page.
    let mut descriptors: Vec<Descriptor> =
        (0..6u64).map(|i| Descriptor { src: 0x10000 + i * 0x4000, dst: AREA + i * 0x4000, len: 3 * PAGE }).collect();
    descriptors[5].len = 100;
    descriptors.push(Descriptor { src: 0x30000, dst: AREA + 2 * 0x4000 + PAGE, len: PAGE });
    let before: Vec<Vec<u8>> = descriptors.iter().map(|d| bytes_at(&e, d.dst, d.len)).collect();
    let sums = ring_batch(&mut e, &descriptors, 1);
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

/// A batch of `descriptors` (sources staged with `seed`'s patterns) rung with sums asked
/// for at `first_index + 10 * i`, overwritten sums too; returns the sums.
fn ring_batch(e: &mut CopyEngine, descriptors: &[Descriptor], seed: u64) -> Vec<RangeSum> {
    ring_batch_with(e, descriptors, seed, true)
}

/// [`ring_batch`], or with no sums asked for (`summed` false: none returned).
fn ring_batch_with(e: &mut CopyEngine, descriptors: &[Descriptor], seed: u64, summed: bool) -> Vec<RangeSum> {
    for (i, d) in descriptors.iter().enumerate() {
        e.mem.write_slice(&pattern(seed + i as u64, d.len), GuestAddress(d.src)).unwrap();
    }
    let requests: Vec<RangeSum> = (0..descriptors.len() as u64).map(|i| RangeSum::new(10 * i, true)).collect();
    let head = BatchHeader::durable(descriptors.len() as u32, 0x1100, if summed { 0x3000 } else { 0 });
    e.mem.write_slice(head.as_bytes(), GuestAddress(0x1000)).unwrap();
    e.mem.write_slice(descriptors.as_bytes(), GuestAddress(0x1100)).unwrap();
    e.mem.write_slice(requests.as_bytes(), GuestAddress(0x3000)).unwrap();
    e.write(0, &0x1000u32.to_le_bytes());
    let mut done = BatchHeader::default();
    e.mem.read_slice(done.as_mut_bytes(), GuestAddress(0x1000)).unwrap();
    assert_eq!(done.status, STATUS_DONE);
    let mut sums = vec![RangeSum::default(); if summed { descriptors.len() } else { 0 }];
    e.mem.read_slice(sums.as_mut_bytes(), GuestAddress(0x3000)).unwrap();
    sums
}

/// A write-out's batch (copies apart) is copied and hashed on two threads, a chunk of
/// pages each at a time, and on one alike: the bytes are the copies', each copy's sums
/// nvram's of its own bytes, written and overwritten, and the hashes kept are right for the
/// next batch's overwritten sums (taken from them, not from the pages: a scribble would
/// show).
#[test]
fn a_write_outs_batch_is_copied_and_summed_on_two_threads_as_on_one() {
    for two in [true, false] {
        write_outs_batch(two);
    }
}

fn write_outs_batch(two_threads: bool) {
    let mut e = big_engine();
    if !two_threads {
        e = e.single_threaded();
    }
    // 60 copies of 1 to 7 pages, every fifth one with a short last page, into 0x400000..
    let mut descriptors = Vec::new();
    let (mut src, mut dst) = (0x10000u64, 0x400000u64);
    for i in 0..60u64 {
        let len = (1 + i % 7) * PAGE - if i % 5 == 4 { 1000 } else { 0 };
        descriptors.push(Descriptor { src, dst, len });
        src += len.next_multiple_of(PAGE);
        dst += len.next_multiple_of(PAGE) + PAGE;
    }
    assert!(parallel::copies_apart(&descriptors));
    assert!(descriptors.iter().map(|d| d.len).sum::<u64>() >= parallel::WORTH_FROM);
    let before: Vec<Vec<u8>> = descriptors.iter().map(|d| bytes_at(&e, d.dst, d.len)).collect();
    let sums = ring_batch(&mut e, &descriptors, 1);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        eprintln!("one CPU here: the engine copies on one thread");
    }
    assert_eq!(lock(&e.stats).parallel, u64::from(two_threads && cpus > 1), "on two threads, if there are two");
    for (i, (d, sum)) in descriptors.iter().zip(&sums).enumerate() {
        let bytes = pattern(1 + i as u64, d.len);
        assert_eq!(bytes_at(&e, d.dst, d.len), bytes, "copy {i} made");
        assert_eq!(sum.written, area_sum(&bytes, 10 * i as u64), "copy {i} wrote");
        assert_eq!(sum.overwritten, area_sum(&before[i], 10 * i as u64), "copy {i} overwrote");
    }
    // The same batch again, from other bytes, after a scribble on a page the first wrote
    // whole: its overwritten sums are the hashes kept of what the first batch wrote.
    let whole = descriptors.iter().position(|d| d.len >= 2 * PAGE).unwrap();
    e.mem.write_slice(&[0xa5; 16], GuestAddress(descriptors[whole].dst + 8)).unwrap();
    let again = ring_batch(&mut e, &descriptors, 100);
    for (i, (d, sum)) in descriptors.iter().zip(&again).enumerate() {
        let bytes = pattern(100 + i as u64, d.len);
        assert_eq!(bytes_at(&e, d.dst, d.len), bytes, "copy {i} made again");
        assert_eq!(sum.written, area_sum(&bytes, 10 * i as u64), "copy {i} wrote again");
        // Pages hashed whole were kept; a short last page is read (with no scribble on it).
        let first = pattern(1 + i as u64, d.len);
        assert_eq!(sum.overwritten, area_sum(&first, 10 * i as u64), "copy {i} overwrote the first batch's");
    }
}

/// A large batch of copies apart without sums (a restore's) is copied on two threads too.
#[test]
fn a_large_batch_without_sums_is_copied_on_two_threads() {
    let mut e = big_engine();
    let descriptors: Vec<Descriptor> = (0..40u64)
        .map(|i| Descriptor { src: 0x10000 + i * 0x8000, dst: 0x400000 + i * 0x9000, len: 0x8000 - 8 * i })
        .collect();
    ring_batch_with(&mut e, &descriptors, 0, false);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(lock(&e.stats).parallel, u64::from(cpus > 1));
    for (i, d) in descriptors.iter().enumerate() {
        assert_eq!(bytes_at(&e, d.dst, d.len), pattern(i as u64, d.len), "copy {i}");
    }
}

/// A batch in which a copy reads what an earlier one writes is copied in order, one copy
/// after the other: the later copy copies (and sums) what the earlier one wrote.
#[test]
fn a_copy_that_reads_an_earlier_copys_bytes_sees_them() {
    let mut e = big_engine();
    let pages = 40;
    let descriptors = [
        Descriptor { src: 0x10000, dst: 0x400000, len: pages * PAGE },
        Descriptor { src: 0x400000 + 5 * PAGE, dst: 0x600000, len: 20 * PAGE },
    ];
    assert!(!parallel::copies_apart(&descriptors));
    // The second copy's source is overwritten by the first: `ring_batch` stages it, then
    // the first copy replaces it.
    let sums = ring_batch(&mut e, &descriptors, 1);
    assert_eq!(lock(&e.stats).parallel, 0, "one thread, in order");
    let first = pattern(1, pages * PAGE);
    let seen = &first[5 * 4096..25 * 4096];
    assert_eq!(bytes_at(&e, 0x600000, 20 * PAGE), seen, "the first copy's bytes, copied on");
    assert_eq!(sums[1].written, area_sum(seen, 10));
    assert_eq!(sums[0].written, area_sum(&first, 0));
}

/// Which batches may be copied in any order: none whose copies write a byte another reads
/// or writes (or that a copy reads of itself).
#[test]
fn only_copies_apart_are_grouped() {
    let d = |src: u64, dst: u64, len: u64| Descriptor { src, dst, len };
    let cases = [
        (vec![d(0, 0x10000, 0x2000), d(0x3000, 0x20000, 0x1000)], true),
        (vec![d(0, 0x10000, 0x2000), d(0x3000, 0x11fff, 0x1000)], false),
        (vec![d(0, 0x10000, 0x2000), d(0x11000, 0x20000, 0x1000)], false),
        (vec![d(0x20fff, 0x10000, 0x10), d(0x3000, 0x20000, 0x1000)], false),
        (vec![d(0x10000, 0x11000, 0x2000)], false),
        (vec![d(0x5000, 0x10000, 0x2000), d(0x30000, 0x4000, 0x1000), d(0x40000, 0x50000, 0)], true),
        (vec![d(0x12000, 0x10000, 0x2000), d(0, 0x12000, 0x1000)], false),
    ];
    for (i, (batch, apart)) in cases.iter().enumerate() {
        assert_eq!(parallel::copies_apart(batch), *apart, "case {i}");
    }
}

/// Copies apart whose addresses are not word-aligned, nor their lengths whole pages, go on
/// two threads too, their pages hashed one by one: the sums are still nvram's, the bytes
/// the copies', and nothing is kept of pages not hashed whole.
#[test]
fn unaligned_copies_apart_are_summed_on_two_threads() {
    let mut e = big_engine();
    let descriptors: Vec<Descriptor> = (0..30u64)
        .map(|i| Descriptor { src: 0x10003 + i * 0x9000, dst: 0x400005 + i * 0xa000, len: 0x8000 + 13 * i })
        .collect();
    let before: Vec<Vec<u8>> = descriptors.iter().map(|d| bytes_at(&e, d.dst, d.len)).collect();
    let sums = ring_batch(&mut e, &descriptors, 7);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(lock(&e.stats).parallel, u64::from(cpus > 1));
    for (i, (d, sum)) in descriptors.iter().zip(&sums).enumerate() {
        let bytes = pattern(7 + i as u64, d.len);
        assert_eq!(bytes_at(&e, d.dst, d.len), bytes, "copy {i} made");
        assert_eq!(sum.written, area_sum(&bytes, 10 * i as u64), "copy {i} wrote");
        assert_eq!(sum.overwritten, area_sum(&before[i], 10 * i as u64), "copy {i} overwrote");
        assert_eq!(e.cache.get(d.dst & !(PAGE - 1), 10 * i as u64), None, "copy {i}: nothing kept");
    }
}

/// The second thread is told of a write-out's start only once the engine has had a batch
/// for two threads (a machine whose write-outs never use it is never woken), and is then
/// told at every start; a batch after a start is copied as any other.
#[test]
fn a_write_outs_start_wakes_the_second_thread_once_the_engine_uses_it() {
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        eprintln!("one CPU here: no second thread to wake");
        return;
    }
    let mut e = big_engine();
    let ahead = e.batch_ahead().expect("a second thread");
    assert!(!ahead.write_out_started(), "no batch for two threads yet");
    let descriptors: Vec<Descriptor> = (0..20u64)
        .map(|i| Descriptor { src: 0x10000 + i * 0x10000, dst: 0x400000 + i * 0x10000, len: 0x10000 })
        .collect();
    ring_batch(&mut e, &descriptors, 1);
    assert!(ahead.write_out_started(), "told once the engine used it");
    let sums = ring_batch(&mut e, &descriptors, 50);
    assert_eq!(lock(&e.stats).parallel, 2);
    for (i, (d, sum)) in descriptors.iter().zip(&sums).enumerate() {
        assert_eq!(bytes_at(&e, d.dst, d.len), pattern(50 + i as u64, d.len));
        assert_eq!(sum.written, area_sum(&pattern(50 + i as u64, d.len), 10 * i as u64));
    }
    assert!(CopyEngine::new(e.mem.clone(), Arc::new(Mutex::new(PersistenceDomain::eadr(e.mem.clone(), false))))
        .single_threaded()
        .batch_ahead()
        .is_none());
}

/// An engine dropped while a `BatchAhead` of its second thread lives on (the machine-control
/// device, dropped after it when a machine's set-up fails) ends the thread and returns:
/// it used to wait for the thread, which waited for the other sender, forever.
#[test]
fn an_engine_dropped_before_its_batch_ahead_returns() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let domain = Arc::new(Mutex::new(PersistenceDomain::eadr(mem.clone(), false)));
        let mut e = CopyEngine::new(mem, domain);
        let ahead = e.batch_ahead();
        drop(e);
        let _ = done.send(());
        drop(ahead);
    });
    finished.recv_timeout(std::time::Duration::from_secs(20)).expect("the engine's drop returned");
}

/// An engine over 8 MiB of guest RAM, room for batches large enough for two threads.
fn big_engine() -> CopyEngine {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let domain = Arc::new(Mutex::new(PersistenceDomain::eadr(mem.clone(), false)));
    CopyEngine::new(mem, domain)
}
