//! The copy engine's checks, copies, sums and dirty-log requests.

use super::*;
use nvram::engine::FLAG_DURABLE;

fn engine_on(mem: GuestMemoryMmap<()>) -> CopyEngine {
    let domain = Arc::new(Mutex::new(PersistenceDomain::eadr(mem.clone(), false)));
    CopyEngine::new(mem, domain)
}

fn engine() -> CopyEngine {
    engine_on(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

/// A batch header at `at`, its descriptors right after it.
fn put_batch(e: &CopyEngine, at: u64, descriptors: &[Descriptor]) {
    put_batch_with(e, at, FLAG_DURABLE, at + nvram::engine::HEADER_SIZE, descriptors);
}

fn put_batch_with(e: &CopyEngine, at: u64, flags: u64, array: u64, descriptors: &[Descriptor]) {
    let head = BatchHeader {
        magic: BATCH_MAGIC,
        count: descriptors.len() as u32,
        status: 0,
        failed: 0,
        flags,
        descriptors: array,
        sums: 0,
    };
    e.mem.write_slice(head.as_bytes(), GuestAddress(at)).unwrap();
    e.mem.write_slice(descriptors.as_bytes(), GuestAddress(array)).unwrap();
}

/// The batch header at `at`, as the engine left it.
fn header(e: &CopyEngine, at: u64) -> BatchHeader {
    let mut head = BatchHeader::default();
    e.mem.read_slice(head.as_mut_bytes(), GuestAddress(at)).unwrap();
    head
}

fn status(e: &CopyEngine, at: u64) -> (u32, u32) {
    let head = header(e, at);
    (head.status, head.failed)
}

/// Writes one field of the batch header at `at` (a test's corruption).
fn poke(e: &CopyEngine, at: u64, change: impl FnOnce(&mut BatchHeader)) {
    let mut head = header(e, at);
    change(&mut head);
    e.mem.write_slice(head.as_bytes(), GuestAddress(at)).unwrap();
}

#[test]
fn copies_a_batch_and_reports_done() {
    let mut e = engine();
    e.mem.write_slice(&[7u8; 8192], GuestAddress(0x10000)).unwrap();
    e.mem.write_slice(&[9u8; 100], GuestAddress(0x30000)).unwrap();
    put_batch(
        &e,
        0x1000,
        &[Descriptor { src: 0x10000, dst: 0x20000, len: 8192 }, Descriptor { src: 0x30000, dst: 0x40000, len: 100 }],
    );
    e.write(0, &0x1000u32.to_le_bytes());
    assert_eq!(status(&e, 0x1000), (STATUS_DONE, 0));
    let mut out = [0u8; 8192];
    e.mem.read_slice(&mut out, GuestAddress(0x20000)).unwrap();
    assert!(out.iter().all(|&b| b == 7));
    let stats = *e.stats.lock().unwrap();
    assert_eq!((stats.batches, stats.copies, stats.bytes), (1, 2, 8292));
}

/// Under ADR a durable batch's destinations are in the image when the status says done;
/// a batch without the flag leaves them as stores, which a power failure loses.
#[test]
fn a_durable_batch_reaches_the_image_and_a_plain_one_waits_for_a_barrier() {
    use crate::persistence::tests::setup;
    let mut s = setup("engine-durable", None);
    let adr = std::mem::replace(&mut s.domain, PersistenceDomain::eadr(s.guest.clone(), false));
    let domain = Arc::new(Mutex::new(adr));
    let mut e = CopyEngine::new(s.guest.clone(), domain.clone());
    s.store(0x1000, &[5; 4096]);
    for (flags, dst) in [(FLAG_DURABLE, 0x4000), (0, 0x6000)] {
        put_batch_with(&e, 0x8000, flags, 0x8040, &[Descriptor { src: 0x1000, dst, len: 4096 }]);
        e.write(0, &0x8000u32.to_le_bytes());
        assert_eq!(status(&e, 0x8000), (STATUS_DONE, 0), "flags {flags}");
    }
    let image = s.image();
    assert!(image[0x4000..0x5000].iter().all(|&b| b == 5), "the durable copy is in the image");
    assert!(image[0x6000..0x7000].iter().all(|&b| b == 0xee), "the plain copy is not, yet");
    domain.lock().unwrap().power_fail();
    assert!(s.image()[0x6000..0x7000].iter().all(|&b| b == 0xee), "and a power failure loses it");
    // A plain copy is in the caches, where a barrier (here: write back everything) finds
    // it: the engine told the domain what it stored.
    put_batch_with(&e, 0x8000, 0, 0x8040, &[Descriptor { src: 0x1000, dst: 0x6000, len: 4096 }]);
    e.write(0, &0x8000u32.to_le_bytes());
    assert_eq!(status(&e, 0x8000), (STATUS_DONE, 0));
    domain.lock().unwrap().write_back_all();
    assert!(s.image()[0x6000..0x7000].iter().all(|&b| b == 5), "after a barrier the plain copy is in the image");
}

#[test]
fn a_bad_descriptor_fails_the_whole_batch_and_copies_nothing() {
    let mut e = engine();
    e.mem.write_slice(&[7u8; 4096], GuestAddress(0x10000)).unwrap();
    put_batch(
        &e,
        0x1000,
        &[
            Descriptor { src: 0x10000, dst: 0x20000, len: 4096 },
            Descriptor { src: 0x10000, dst: (1 << 20) - 10, len: 4096 },
        ],
    );
    e.write(0, &0x1000u32.to_le_bytes());
    assert_eq!(status(&e, 0x1000), (STATUS_BAD_DESCRIPTOR, 1));
    let mut out = [0u8; 4096];
    e.mem.read_slice(&mut out, GuestAddress(0x20000)).unwrap();
    assert!(out.iter().all(|&b| b == 0), "the good descriptor was not applied either");
    // The array may be anywhere in RAM, but not misaligned nor past its end; no unknown flag.
    let d = [Descriptor { src: 0x10000, dst: 0x20000, len: 4096 }];
    put_batch_with(&e, 0x1000, 0, 0x8000, &d);
    e.write(0, &0x1000u32.to_le_bytes());
    assert_eq!(status(&e, 0x1000), (STATUS_DONE, 0), "an array away from its header");
    for (flags, array) in [(2, 0x8000), (FLAG_DURABLE, 0x8004), (FLAG_DURABLE, (1 << 20) - 8)] {
        put_batch_with(&e, 0x1000, flags, 0x8000, &d);
        poke(&e, 0x1000, |h| h.descriptors = array);
        e.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(status(&e, 0x1000).0, STATUS_BAD_BATCH, "flags {flags}, array at {array:#x}");
    }
    for bad in [
        Descriptor { src: 0x10000, dst: 0x10800, len: 4096 },
        Descriptor { src: 0x10000, dst: 0x20000, len: 0 },
        Descriptor { src: u64::MAX - 4, dst: 0x20000, len: 8 },
    ] {
        put_batch(&e, 0x1000, &[bad]);
        e.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(status(&e, 0x1000), (STATUS_BAD_DESCRIPTOR, 0), "{bad:?}");
    }
}

fn put_request(e: &CopyEngine, at: u64, first: u64, pages: u64, out: u64) {
    let request = DirtyRequest { magic: DIRTY_MAGIC, status: 0, first_page: first, pages, out };
    e.mem.write_slice(request.as_bytes(), GuestAddress(at)).unwrap();
}

fn request_status(e: &CopyEngine, at: u64) -> u32 {
    let mut request = DirtyRequest::default();
    e.mem.read_slice(request.as_mut_bytes(), GuestAddress(at)).unwrap();
    request.status
}

#[test]
fn dirty_log_requests_extract_the_asked_pages() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    // Pages 3, 64, 70 and 200 written.
    let mut log = vec![0u64; 4];
    for page in [3u64, 64, 70, 200] {
        log[(page / 64) as usize] |= 1 << (page % 64);
    }
    let tracker = DirtyTracker::new(1 << 20, Some(Box::new(move || Some(log.clone()))));
    let mut e = engine_on(mem).with_dirty_log(Arc::new(Mutex::new(tracker)));
    put_request(&e, 0x1000, 64, 140, 0x2000);
    e.write(REG_DIRTY, &0x1000u32.to_le_bytes());
    assert_eq!(request_status(&e, 0x1000), STATUS_DONE);
    assert_eq!(e.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 1 | 1 << 6);
    assert_eq!(e.mem.read_obj::<u64>(GuestAddress(0x2008)).unwrap(), 0);
    assert_eq!(e.mem.read_obj::<u64>(GuestAddress(0x2010)).unwrap(), 1 << (200 - 64 - 128));
    put_request(&e, 0x1000, 3, 5, 0x2000);
    e.write(REG_DIRTY, &0x1000u32.to_le_bytes());
    assert_eq!(e.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 1, "unaligned start");
    for (first, pages, out) in [(250, 10, 0x2000), (0, 8, (1 << 20) - 4), (0, 8, 0x2004)] {
        put_request(&e, 0x1000, first, pages, out);
        e.write(REG_DIRTY, &0x1000u32.to_le_bytes());
        assert_eq!(request_status(&e, 0x1000), STATUS_BAD_BATCH);
    }
    let mut plain = engine();
    put_request(&plain, 0x1000, 0, 8, 0x2000);
    plain.write(REG_DIRTY, &0x1000u32.to_le_bytes());
    assert_eq!(request_status(&plain, 0x1000), STATUS_UNSUPPORTED);
}

#[test]
fn bad_batches_are_refused_without_harm() {
    let mut e = engine();
    put_batch(&e, 0x1000, &[]);
    poke(&e, 0x1000, |h| h.magic = 0xdead);
    e.write(0, &0x1000u32.to_le_bytes());
    assert_eq!(status(&e, 0x1000).0, STATUS_BAD_BATCH, "bad magic");
    put_batch(&e, 0x1000, &[]);
    poke(&e, 0x1000, |h| h.count = MAX_DESCRIPTORS + 1);
    e.write(0, &0x1000u32.to_le_bytes());
    assert_eq!(status(&e, 0x1000).0, STATUS_BAD_BATCH, "too many descriptors");
    put_batch_with(&e, 0x1000, FLAG_DURABLE, (1 << 20) - 48, &[]);
    poke(&e, 0x1000, |h| h.count = 10);
    e.write(0, &0x1000u32.to_le_bytes());
    assert_eq!(status(&e, 0x1000).0, STATUS_BAD_BATCH, "descriptors past the end of RAM");
    e.write(0, &(((1u32 << 20) - 16).to_le_bytes())); // a header past the end of RAM
    e.write(0, &0x1004u32.to_le_bytes()); // misaligned: no status to write
    e.write(0, &u32::MAX.to_le_bytes()); // outside RAM
    e.write(0, &[1, 2]); // wrong width
    let mut id = [0u8; 4];
    e.read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), ENGINE_ID);
    assert_eq!(e.stats.lock().unwrap().batches, 0);
}

/// The sums the engine left at `at`, `n` of them.
fn sums_at(e: &CopyEngine, at: u64, n: usize) -> Vec<RangeSum> {
    let mut sums = vec![RangeSum::default(); n];
    e.mem.read_slice(sums.as_mut_bytes(), GuestAddress(at)).unwrap();
    sums
}

fn bytes_at(e: &CopyEngine, at: u64, len: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len as usize];
    e.mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
    bytes
}

/// The sums the engine returns are `nvram::plate::area_sum` of the bytes each copy wrote
/// (with the index of its first page) and, when asked, of those it overwrote, whole pages
/// and a short last one alike; a copy with no request of the overwritten sum gets 0 there.
#[test]
fn the_sums_returned_are_nvrams_of_the_bytes_written_and_overwritten() {
    use nvram::plate::area_sum;
    let mut e = engine();
    let pattern = |seed: u64, len: usize| -> Vec<u8> {
        (0..len as u64).map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ seed as u8).collect()
    };
    e.mem.write_slice(&pattern(1, 3 * 4096), GuestAddress(0x10000)).unwrap();
    e.mem.write_slice(&pattern(2, 3 * 4096), GuestAddress(0x20000)).unwrap();
    e.mem.write_slice(&pattern(3, 4096 + 100), GuestAddress(0x30000)).unwrap();
    let descriptors = [
        Descriptor { src: 0x10000, dst: 0x20000, len: 3 * 4096 },
        Descriptor { src: 0x30000, dst: 0x40000, len: 4096 + 100 },
    ];
    let old = [bytes_at(&e, 0x20000, 3 * 4096), bytes_at(&e, 0x40000, 4096 + 100)];
    put_batch(&e, 0x1000, &descriptors);
    let requests = [RangeSum::new(5, true), RangeSum { written: 77, overwritten: 77, ..RangeSum::new(0, false) }];
    e.mem.write_slice(requests.as_bytes(), GuestAddress(0x2000)).unwrap();
    poke(&e, 0x1000, |h| h.sums = 0x2000);
    e.write(0, &0x1000u32.to_le_bytes());
    assert_eq!(status(&e, 0x1000), (STATUS_DONE, 0));
    let sums = sums_at(&e, 0x2000, 2);
    assert_eq!(bytes_at(&e, 0x20000, 3 * 4096), pattern(1, 3 * 4096), "the copy is made");
    assert_eq!(sums[0].written, area_sum(&pattern(1, 3 * 4096), 5));
    assert_eq!(sums[0].overwritten, area_sum(&old[0], 5));
    assert_eq!((sums[0].first, sums[0].flags), (5, SUM_OVERWRITTEN), "the request is left as it was");
    assert_eq!(sums[1].written, area_sum(&pattern(3, 4096 + 100), 0));
    assert_eq!(sums[1].overwritten, 0, "not asked for");
    assert_ne!(sums[0].written, sums[0].overwritten);
    // Without a sums array the copies are the same and nothing else is written.
    e.mem.write_slice(&pattern(9, 3 * 4096), GuestAddress(0x10000)).unwrap();
    put_batch(&e, 0x1000, &descriptors[..1]);
    e.write(0, &0x1000u32.to_le_bytes());
    assert_eq!(status(&e, 0x1000), (STATUS_DONE, 0));
    assert_eq!(bytes_at(&e, 0x20000, 3 * 4096), pattern(9, 3 * 4096));
    assert_eq!(sums_at(&e, 0x2000, 1)[0], sums[0], "no sums asked, none written");
}

/// A refused batch returns no sum: an out-of-bounds descriptor, a sums array past the end of
/// RAM or misaligned, an unknown flag in a request; the requests stay as the guest wrote
/// them, and nothing is copied.
#[test]
fn a_refused_batch_returns_no_sum() {
    let mut e = engine();
    e.mem.write_slice(&[7u8; 4096], GuestAddress(0x10000)).unwrap();
    let good = Descriptor { src: 0x10000, dst: 0x20000, len: 4096 };
    let outside = Descriptor { src: 0x10000, dst: (1 << 20) - 10, len: 4096 };
    let requests = [RangeSum { written: 0x5eed, overwritten: 0x5eed, ..RangeSum::new(0, true) }; 2];
    /// The descriptors, where the sums are, a flag added to each request, the status.
    type Case<'a> = (&'a [Descriptor], u64, u64, (u32, u32));
    let cases: [Case; 4] = [
        (&[good, outside], 0x2000, 0, (STATUS_BAD_DESCRIPTOR, 1)),
        (&[good, good], 0x2000, 2, (STATUS_BAD_DESCRIPTOR, 0)),
        (&[good], (1 << 20) - 16, 0, (STATUS_BAD_BATCH, 0)),
        (&[good], 0x2004, 0, (STATUS_BAD_BATCH, 0)),
    ];
    for (descriptors, at, extra_flags, expected) in cases {
        let asked: Vec<RangeSum> =
            requests[..descriptors.len()].iter().map(|r| RangeSum { flags: r.flags | extra_flags, ..*r }).collect();
        if at + 32 * asked.len() as u64 <= 1 << 20 {
            e.mem.write_slice(asked.as_bytes(), GuestAddress(at)).unwrap();
        }
        put_batch(&e, 0x1000, descriptors);
        poke(&e, 0x1000, |h| h.sums = at);
        e.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(status(&e, 0x1000), expected, "sums at {at:#x}, flags {extra_flags}");
        if at + 32 * asked.len() as u64 <= 1 << 20 {
            assert_eq!(sums_at(&e, at, asked.len()), asked, "no sum written (sums at {at:#x})");
        }
        assert!(bytes_at(&e, 0x20000, 4096).iter().all(|&b| b == 0), "nothing copied");
    }
    assert_eq!(e.stats.lock().unwrap().batches, 0);
}

/// Sums alone (`FLAG_SUM_ONLY`): each descriptor's `written` is `area_sum` of its source
/// (whole pages and a short last one, with its first index), on one thread for a small batch
/// and on two for a large one; the destinations are ignored (here outside RAM) and nothing
/// but the sums array is written.
#[test]
fn sums_alone_are_the_sources_sums_and_write_nothing_else() {
    use nvram::engine::FLAG_SUM_ONLY;
    use nvram::plate::area_sum;
    let mut e = engine();
    let ram: Vec<u8> = (0..1u64 << 20).map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 57) as u8).collect();
    e.mem.write_slice(&ram, GuestAddress(0)).unwrap();
    let descriptors = [
        Descriptor { src: 0x10000, dst: u64::MAX - 4096, len: 3 * 4096 + 100 },
        Descriptor { src: 0x40000, dst: 0x40000, len: 80 * 4096 },
    ];
    for (n, first) in [(1, 7), (2, 0)] {
        let (at, array, sums_at_addr) = (0x1000, 0x1100, 0x2000);
        put_batch_with(&e, at, FLAG_SUM_ONLY, array, &descriptors[..n]);
        let requests = [RangeSum::new(first, false); 2];
        e.mem.write_slice(requests[..n].as_bytes(), GuestAddress(sums_at_addr)).unwrap();
        poke(&e, at, |h| h.sums = sums_at_addr);
        let before = bytes_at(&e, 0, 1 << 20);
        e.write(0, &(at as u32).to_le_bytes());
        assert_eq!(status(&e, at), (STATUS_DONE, 0), "{n} descriptors");
        let sums = sums_at(&e, sums_at_addr, n);
        for (d, sum) in descriptors[..n].iter().zip(&sums) {
            let src = &ram[d.src as usize..(d.src + d.len) as usize];
            assert_eq!(sum.written, area_sum(src, first), "{n} descriptors: {d:x?}");
            assert_eq!(sum.overwritten, 0);
        }
        // Nothing else changed: not the sources, not a destination inside RAM.
        let mut after = bytes_at(&e, 0, 1 << 20);
        after[sums_at_addr as usize..sums_at_addr as usize + n * 32]
            .copy_from_slice(&before[sums_at_addr as usize..sums_at_addr as usize + n * 32]);
        after[at as usize..at as usize + 16].copy_from_slice(&before[at as usize..at as usize + 16]);
        assert!(after == before, "{n} descriptors: only the sums and the status are written");
    }
    let stats = *e.stats().lock().unwrap();
    assert_eq!(stats.summed_only, 2 * (3 * 4096 + 100) + 80 * 4096);
    assert_eq!(stats.bytes, 0, "nothing copied");
    if std::thread::available_parallelism().map_or(1, usize::from) > 1 {
        assert_eq!(stats.parallel, 1, "the large batch on two threads");
    }
}

/// A batch of sums alone is refused without a sums array, with a sum asking for what a copy
/// overwrites, with a source outside RAM, and so is an unknown batch flag.
#[test]
fn a_bad_batch_of_sums_alone_is_refused() {
    use nvram::engine::FLAG_SUM_ONLY;
    let mut e = engine();
    let ok = Descriptor { src: 0x10000, dst: 0, len: 4096 };
    let ring = |e: &mut CopyEngine, flags: u64, d: Descriptor, sum: Option<RangeSum>| {
        put_batch_with(e, 0x1000, flags, 0x1100, &[d]);
        if let Some(sum) = sum {
            e.mem.write_slice(sum.as_bytes(), GuestAddress(0x2000)).unwrap();
            poke(e, 0x1000, |h| h.sums = 0x2000);
        }
        e.write(0, &0x1000u32.to_le_bytes());
        status(e, 0x1000)
    };
    assert_eq!(ring(&mut e, FLAG_SUM_ONLY, ok, Some(RangeSum::new(0, false))), (STATUS_DONE, 0));
    assert_eq!(ring(&mut e, FLAG_SUM_ONLY, ok, None), (STATUS_BAD_BATCH, 0), "no sums array");
    assert_eq!(ring(&mut e, FLAG_SUM_ONLY, ok, Some(RangeSum::new(0, true))), (STATUS_BAD_DESCRIPTOR, 0));
    let outside = Descriptor { src: (1 << 20) - 100, ..ok };
    assert_eq!(ring(&mut e, FLAG_SUM_ONLY, outside, Some(RangeSum::new(0, false))), (STATUS_BAD_DESCRIPTOR, 0));
    assert_eq!(ring(&mut e, 4, ok, Some(RangeSum::new(0, false))), (STATUS_BAD_BATCH, 0), "unknown flag");
}
