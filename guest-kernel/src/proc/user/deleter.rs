//! `deleter`: fills a region with a known pattern, asks for a checkpoint, then deletes the
//! region (a space deleted after a checkpoint). Resumed from that checkpoint after a crash,
//! it finds the region back and checks every word of it.
//!
//! Reports: progress 1 once the region is deleted, 2 once it was found back after a
//! restore, with the check's result.

use kernel_core::rng::mix;

use super::{checkpoint, map, report, sleep, Check};
use crate::plate::{RESTORED, SAVED};
use crate::uprintln;

const NAME: &[u8; 16] = b"deleter\0\0\0\0\0\0\0\0\0";
const PAGES: u64 = 4;

fn pattern(i: usize) -> u64 {
    mix(i as u64 ^ 0x5eed)
}

pub extern "C" fn main(_: u64, _: u64, _: u64, _: u64) -> ! {
    let Some(region) = map(PAGES) else { super::exit(1) };
    // SAFETY: the region is PAGES pages, mapped writable, 8-byte aligned; viewed as words.
    let words = unsafe { core::slice::from_raw_parts_mut(region.as_mut_ptr() as *mut u64, region.len() / 8) };
    for (i, w) in words.iter_mut().enumerate() {
        *w = pattern(i);
    }
    let sum = words.iter().fold(0u64, |s, w| s.wrapping_add(*w));
    let (progress, check) = match checkpoint() {
        SAVED => {
            // SAFETY: this branch never touches `region` or `words` again (the restored
            // timeline, where the region is mapped again, takes the other branch).
            if unsafe { super::unmap(region.as_mut_ptr() as u64) } != 0 {
                super::exit(2);
            }
            uprintln!("deleter: region deleted after the checkpoint");
            (1, Check::Unknown)
        }
        RESTORED => {
            let intact = words.iter().enumerate().all(|(i, w)| *w == pattern(i));
            uprintln!("deleter: restored; the deleted region is back {}", if intact { "intact" } else { "DAMAGED" });
            (2, if intact { Check::Passed } else { Check::Failed })
        }
        _ => super::exit(3),
    };
    loop {
        report(NAME, progress, sum, check);
        sleep(50);
    }
}
