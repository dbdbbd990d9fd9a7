//! The plate function's bookkeeping, natively: the very code the guest kernel runs for a
//! write-out and a restore of the paper's configuration (456 plates, 1.4 MB dirtied per
//! interval), on the host, with the copies left out. Under PVM the guest's kernel mode is
//! emulated and the same work takes about 100 ms (`cargo bench --bench plate`); this is what
//! it costs where kernel mode runs natively (VT-x, SVM).
//!
//! `cargo bench --bench bookkeeping`

use criterion::{criterion_group, criterion_main, Criterion};
use kernel_core::plates::{self, CopyRange, Persist};
use nvram::plate::{self, Plate, PlateKind, PlateTable};

const PAGE: u64 = 4096;
/// Five plates the kernel always has (two fixed tables, a kernel space, two page-table
/// pools), then `memtouch`'s 450 regions of 18 KiB (5 pages) and its list of regions.
const USER_PLATES: u64 = 451;
const REGION_PAGES: u64 = 5;
/// 1400 KiB dirtied per interval, round robin over the regions, as `memtouch` does.
const DIRTY_PAGES: u64 = 350;

/// Counts what would be copied; moves nothing. Reads (for the save areas' checksums) see
/// zero pages: hashing them costs what hashing the real pages would.
struct Dry {
    ranges: u64,
    zeros: Vec<u8>,
}

impl Default for Dry {
    fn default() -> Self {
        Self { ranges: 0, zeros: vec![0; 64 * PAGE as usize] }
    }
}

impl Persist for Dry {
    fn copy(&mut self, ranges: &[CopyRange]) -> bool {
        self.ranges += ranges.len() as u64;
        true
    }
    fn flush(&mut self, _addr: u64, _len: u64) {}
    fn fence(&mut self) {}
    fn write_slot(&mut self, _slot: usize, table: &PlateTable) {
        std::hint::black_box(table);
    }
    fn read(&self, _addr: u64, len: u64) -> &[u8] {
        &self.zeros[..len as usize]
    }
}

/// Where the plates' regions start: they follow each other from there, so a plate's first
/// page index is `(src - SRC_BASE) / PAGE`, as in the guest.
const SRC_BASE: u64 = 0x100_0000;

fn table() -> Box<PlateTable> {
    // SAFETY: a PlateTable is plain integers; all zeros is a valid value.
    let mut t: Box<PlateTable> = unsafe { Box::new_zeroed().assume_init() };
    t.format();
    let mut next = SRC_BASE;
    let mut area = 0x800_0000u64;
    let mut add = |t: &mut PlateTable, kind: PlateKind, id: u32, pages: u64| {
        let plate = Plate::new(kind, id, next, pages, [area, area + pages * PAGE]);
        next += pages * PAGE;
        area += 2 * pages * PAGE;
        t.add(plate).expect("room for the paper's plates");
    };
    add(&mut t, PlateKind::Fixed, 0, 17);
    add(&mut t, PlateKind::Fixed, 1, 2);
    add(&mut t, PlateKind::KernelSpace, 0, 64);
    add(&mut t, PlateKind::PageTables, 0, 16);
    add(&mut t, PlateKind::PageTables, 1, 16);
    for id in 0..USER_PLATES {
        add(&mut t, PlateKind::UserSpace, id as u32, REGION_PAGES);
    }
    t
}

fn bookkeeping(c: &mut Criterion) {
    let mut live = table();
    let pages: u64 = live.plates().iter().map(|p| p.pages).sum();
    let words = (pages as usize).div_ceil(64) + 1;
    let mut stale = vec![u64::MAX; words];
    let mut dirty = vec![0u64; words];
    let index = |p: &Plate| (p.src - SRC_BASE) / PAGE;
    let user_base = index(&live.plates()[5]);
    let mut cursor = 0u64;
    let mut generation = 0u64;
    let mut group = c.benchmark_group("bookkeeping, natively");
    group.bench_function("write-out plan and commit, 456 plates, 350 dirty pages", |b| {
        b.iter(|| {
            // memtouch's interval: 350 pages round robin over the user regions.
            dirty.fill(0);
            for _ in 0..DIRTY_PAGES {
                let bit = user_base + cursor;
                dirty[(bit / 64) as usize] |= 1 << (bit % 64);
                cursor = (cursor + 1) % (USER_PLATES * REGION_PAGES);
            }
            let mut dry = Dry::default();
            let stats = plates::write_out(
                &mut live,
                generation,
                (generation % 2) as usize,
                &mut stale,
                index,
                |p, first_page, n| match PlateKind::try_from(p.kind).ok() {
                    Some(PlateKind::UserSpace) => plates::bits_at(&dirty, index(p) + first_page, n),
                    _ => u64::MAX,
                },
                &mut dry,
            );
            generation += 1;
            std::hint::black_box((stats, dry.ranges))
        })
    });
    let committed = {
        let mut t = table();
        // Every plate has a valid area, as after a write-out: the restore copies them all.
        for p in t.plates_mut() {
            p.valid = 1;
        }
        t.generation = 7;
        t.seal();
        t
    };
    let other = table();
    group.bench_function("restore plan, 456 plates (find the committed slot, list the copies)", |b| {
        b.iter(|| {
            let slot = plate::committed([&committed, &other]).expect("a committed slot");
            let mut dry = Dry::default();
            let pages = plates::restore(if slot == 0 { &committed } else { &other }, &mut dry, &[], |_| false);
            assert_eq!(dry.ranges, committed.count as u64, "every plate listed");
            std::hint::black_box((pages, dry.ranges))
        })
    });
    group.finish();
}

criterion_group!(benches, bookkeeping);
criterion_main!(benches);
