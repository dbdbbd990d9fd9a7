//! `memtouch`: maps R regions of S KiB, and every interval dirties D KiB of them (one store
//! per page, round robin), to set the number of plates, the plated bytes and the dirty
//! bytes of a write-out.
//!
//! Its argument string is the kernel command line: `memtouch=R,S,D` (default 4,64,16) and
//! `memtouch_ms=N`, the interval (default 100).
#![no_std]
#![no_main]

use nvram::cmdline::Cmdline;
use user_rt::{exit, map, println, report, sleep, Check};

const NAME: &str = "memtouch";
const PAGE: u64 = 4096;

fn main(args: &str) -> u64 {
    let cmdline = Cmdline::parse(args, |_| {});
    let [regions, region_kib, dirty_kib] = cmdline.memtouch;
    let interval_ms = cmdline.memtouch_ms;
    let pages_per_region = region_kib.div_ceil(4).max(1);
    // The regions' addresses, in a region of their own.
    let Some(list) = map((regions * 8).div_ceil(PAGE).max(1)) else { exit(1) };
    let list = list.as_mut_ptr() as *mut u64;
    for i in 0..regions {
        let Some(region) = map(pages_per_region) else {
            println!("memtouch: out of memory after {i} regions");
            exit(1)
        };
        // SAFETY: `list` holds `regions` entries (sized above).
        unsafe { list.add(i as usize).write(region.as_mut_ptr() as u64) };
    }
    println!("memtouch: {regions} regions of {region_kib} KiB, {dirty_kib} KiB dirtied every {interval_ms} ms");
    let total_pages = regions * pages_per_region;
    let dirty_pages = dirty_kib.div_ceil(4).min(total_pages);
    let mut cursor = 0u64;
    let mut interval = 0u64;
    let mut checksum = 0u64;
    loop {
        interval += 1;
        for _ in 0..dirty_pages {
            let (region, page) = (cursor / pages_per_region, cursor % pages_per_region);
            // SAFETY: `region` < `regions` and `page` < `pages_per_region`: inside a mapped region.
            unsafe {
                let base = list.add(region as usize).read() as *mut u64;
                base.add((page * PAGE / 8) as usize).write_volatile(interval);
            }
            checksum = checksum.wrapping_add(interval);
            cursor = (cursor + 1) % total_pages;
        }
        report(NAME, interval, checksum, Check::Unknown);
        sleep(interval_ms);
    }
}

user_rt::entry!(main);
