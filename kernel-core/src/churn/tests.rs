use super::*;

extern crate std;
use std::collections::BTreeMap;
use std::vec;
use std::vec::Vec;

/// A kernel stand-in: hands out regions until `capacity` live ones, then refuses.
struct FakeKernel {
    regions: BTreeMap<u64, Vec<u64>>,
    next: u64,
    capacity: usize,
}

impl FakeKernel {
    fn new(capacity: usize) -> Self {
        Self { regions: BTreeMap::new(), next: 0x1000, capacity }
    }

    fn map(&mut self, pages: u64) -> Option<u64> {
        if self.regions.len() == self.capacity {
            return None;
        }
        let addr = self.next;
        self.next += (pages + 1) * PAGE as u64;
        self.regions.insert(addr, vec![0; pages as usize * WORDS]);
        Some(addr)
    }
}

fn run(ledger: &mut Ledger<'_>, kernel: &mut FakeKernel, ops: u64, grow: bool) {
    for _ in 0..ops {
        match ledger.next_op(grow) {
            Op::Map { pages } => match kernel.map(pages) {
                Some(addr) => {
                    let slot = ledger.mapped(addr, pages).expect("room in the ledger");
                    fill(&ledger.slot(slot), kernel.regions.get_mut(&addr).unwrap());
                }
                None => ledger.refused_map(),
            },
            Op::Unmap { slot } => {
                assert!(kernel.regions.remove(&ledger.slot(slot).addr).is_some());
                ledger.unmapped(slot);
            }
            Op::Rewrite { slot } => {
                let s = ledger.rewrite(slot);
                fill(&s, kernel.regions.get_mut(&s.addr).unwrap());
            }
        }
    }
}

fn region() -> Vec<u64> {
    vec![0u64; 8 * PAGE / 8]
}

fn bytes(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: a u64 slice viewed as its bytes (alignment only decreases).
    unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8) }
}

#[test]
fn the_stream_grows_past_the_kernels_capacity_and_every_region_verifies() {
    let mut mem = region();
    let mut ledger = Ledger::format(bytes(&mut mem), 7, 16).unwrap();
    let mut kernel = FakeKernel::new(100);
    run(&mut ledger, &mut kernel, 3000, true);
    assert!(ledger.refused() > 0, "maps were refused at the capacity");
    assert_eq!(ledger.live(), kernel.regions.len() as u64);
    assert!(ledger.live() >= 90, "the stream stays near the capacity: {}", ledger.live());
    assert_eq!(ledger.ops_done(), 3000);
    assert_eq!(ledger.maps() - ledger.unmaps(), ledger.live());
    ledger.verify(|s| kernel.regions[&s.addr].as_slice()).unwrap();
    // Past the stream: only rewrites, the regions stay.
    let live = ledger.live();
    run(&mut ledger, &mut kernel, 500, false);
    assert_eq!(ledger.live(), live);
    ledger.verify(|s| kernel.regions[&s.addr].as_slice()).unwrap();
}

#[test]
fn the_same_seed_gives_the_same_stream() {
    let (mut a, mut b) = (region(), region());
    let mut la = Ledger::format(bytes(&mut a), 3, 8).unwrap();
    let mut lb = Ledger::format(bytes(&mut b), 3, 8).unwrap();
    let (mut ka, mut kb) = (FakeKernel::new(50), FakeKernel::new(50));
    run(&mut la, &mut ka, 1000, true);
    run(&mut lb, &mut kb, 1000, true);
    assert_eq!(la.checksum(), lb.checksum());
    let mut c = region();
    let mut lc = Ledger::format(bytes(&mut c), 4, 8).unwrap();
    run(&mut lc, &mut FakeKernel::new(50), 1000, true);
    assert_ne!(la.checksum(), lc.checksum());
}

#[test]
fn a_word_from_another_region_or_an_older_version_fails_the_check() {
    let mut mem = region();
    let mut ledger = Ledger::format(bytes(&mut mem), 11, 4).unwrap();
    let mut kernel = FakeKernel::new(20);
    run(&mut ledger, &mut kernel, 200, true);
    assert!(ledger.live() >= 2);
    let (a, b) = (ledger.slot(0), ledger.slot(1));
    // A page of an older version (as a stale save area would restore it).
    let mut old = kernel.regions[&a.addr].clone();
    fill(&Slot { version: a.version.wrapping_sub(1), ..a }, &mut old);
    let older = kernel.regions.insert(a.addr, old).unwrap();
    assert_eq!(ledger.verify(|s| kernel.regions[&s.addr].as_slice()).unwrap_err().id, a.id);
    kernel.regions.insert(a.addr, older);
    // One word of another region's page.
    let word = kernel.regions[&a.addr][3];
    kernel.regions.get_mut(&b.addr).unwrap()[3] = word;
    let err = ledger.verify(|s| kernel.regions[&s.addr].as_slice()).unwrap_err();
    assert_eq!(err, Mismatch { id: b.id, page: 0, word: 3 });
}

#[test]
fn a_full_ledger_draws_no_maps() {
    let mut mem = vec![0u64; (HEADER + 4 * SLOT) / 8];
    let mut ledger = Ledger::format(bytes(&mut mem), 1, 2).unwrap();
    let mut kernel = FakeKernel::new(1000);
    run(&mut ledger, &mut kernel, 500, true);
    assert!(ledger.live() <= 4);
    assert_eq!(ledger.refused(), 0);
}

#[test]
fn a_region_too_small_or_misaligned_is_refused() {
    let mut mem = vec![0u64; 4];
    assert_eq!(Ledger::format(bytes(&mut mem), 1, 1).err(), Some(LedgerError::BadRegion));
    let mut mem = region();
    assert_eq!(Ledger::format(&mut bytes(&mut mem)[1..], 1, 1).err(), Some(LedgerError::BadRegion));
}
