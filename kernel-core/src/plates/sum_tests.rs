//! A write-out's content checksums come from the copier (`Persist::copy_summed`): each
//! area's sum moves by what its copies wrote less what they overwrote, batch by batch,
//! whichever batch a plate's copies fall in.

extern crate std;

use std::boxed::Box;
use std::vec;
use std::vec::Vec;

use zerocopy::FromZeros;

use nvram::engine::SUM_OVERWRITTEN;
use nvram::plate::{PlateKind, PlateTable};

use super::*;

/// A copier that copies nothing and returns, per range, `written` = its source address and
/// `overwritten` = its destination's (when asked): sums that name the range they come from.
#[derive(Default)]
struct NamingCopier {
    batches: Vec<usize>,
    asked_overwritten: usize,
}

impl Persist for NamingCopier {
    fn copy(&mut self, _: &[CopyRange]) -> bool {
        unreachable!("a copier that can sum is asked for sums")
    }

    fn copy_summed(&mut self, ranges: &[CopyRange], sums: &mut [RangeSum]) -> bool {
        self.batches.push(ranges.len());
        for (r, s) in ranges.iter().zip(sums.iter_mut()) {
            assert_eq!(s.first, 0, "each copy starts at its plate's page 0");
            s.written = r.src;
            if s.flags & SUM_OVERWRITTEN != 0 {
                self.asked_overwritten += 1;
                s.overwritten = r.dst;
            }
        }
        true
    }

    fn flush(&mut self, _: u64, _: u64) {}
    fn fence(&mut self) {}
    fn write_slot(&mut self, _: usize, _: &PlateTable) {}

    fn read(&self, _: u64, _: u64) -> &[u8] {
        unreachable!("the copier sums: nothing is read besides")
    }
}

/// 300 plates of two pages: 300 copies in two batches. The first write-out fills each
/// area A whole, the second area B whole (it never had a copy): each sum from zero, what
/// the copies overwrote not asked for. The third copies page 0 into area A again, and moves
/// A's known sum by what it wrote less what it overwrote.
#[test]
fn each_area_sum_moves_by_its_copies_across_batches() {
    let mut live = PlateTable::new_box_zeroed().expect("a plate table fits in memory");
    live.format();
    let n = 300u64;
    let plate = |i: u64| (0x100_0000 + i * 0x2000, [0x200_0000 + i * 0x2000, 0x300_0000 + i * 0x2000]);
    for i in 0..n {
        let (src, area) = plate(i);
        live.add(Plate::new(PlateKind::UserSpace, i as u32, src, 2, area)).unwrap();
    }
    let mut stale = vec![u64::MAX; (2 * n as usize).div_ceil(64)];
    let mut nvm = NamingCopier::default();
    let mut write_out_with = |live: &mut Box<PlateTable>, generation: u64, nvm: &mut NamingCopier, dirty: u64| {
        let slot = generation as usize % 2;
        write_out(live, generation, slot, &mut stale, |p| 2 * u64::from(p.id), |_, _, _| dirty, nvm)
    };
    write_out_with(&mut live, 0, &mut nvm, u64::MAX);
    assert_eq!(nvm.batches, [256, 44]);
    for (i, p) in live.plates().iter().enumerate() {
        assert_eq!((p.valid, p.summed, p.sum[0]), (1, 1, plate(i as u64).0), "plate {i}");
    }
    write_out_with(&mut live, 1, &mut nvm, 1);
    assert_eq!(nvm.asked_overwritten, 0, "whole copies: nothing of the old pages is asked");
    write_out_with(&mut live, 2, &mut nvm, 1);
    assert_eq!(nvm.asked_overwritten, n as usize, "area A's sum was known at the third");
    for (i, p) in live.plates().iter().enumerate() {
        let (src, area) = plate(i as u64);
        assert_eq!((p.valid, p.summed), (1, 3), "plate {i}");
        assert_eq!(p.sum, [src.wrapping_add(src).wrapping_sub(area[0]), src], "plate {i}");
    }
}
