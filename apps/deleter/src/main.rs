//! `deleter`: deletes spaces after a checkpoint, and checks after a restore that no deletion
//! damaged what the checkpoint holds.
//!
//! With `regions` 0 (the default): fills a region with a known pattern, asks for a
//! checkpoint, deletes the region, then maps (and writes) every frame it can get, so that
//! save areas freed too early are handed out and overwritten before the crash. Resumed from
//! that checkpoint after a crash, it finds the region back and checks every word of it.
//!
//! With `regions` N > 0: maps N one-page regions and checkpoints, unmaps them all (N save
//! areas pending deletion at once), maps N new ones (their ids are the deleted ones'),
//! writes version 2 of each and checkpoints, then writes version 3 (after the checkpoint:
//! a crash loses it). Resumed from the second checkpoint, every new region must hold its
//! version 2: a stale plate of a deleted region, or a new region left without a plate,
//! shows as a version 3 or a foreign page.
//!
//! Reports: progress 1 once the deletions (and the writes after them) are done, 2 once it
//! was resumed after a restore, with the check's result.
//!
//! Its argument string is the kernel command line: `deleter=N` sets `regions`.

#![no_std]
#![no_main]

use kernel_core::rng::mix;
use nvram::cmdline::Cmdline;
use user_rt::{checkpoint, exit, map, println, report, sleep, unmap, Check, Checkpoint};

const NAME: &str = "deleter";
const PAGES: u64 = 4;
/// Pages of each large mapping that takes up the free frames after the deletion.
const FILL_PAGES: u64 = 1024;
/// Most regions of the bulk mode: the real-memory table holds 1,024 runs of frames, and the
/// process table, this process's page-table pool, its two segments (code, constants), its
/// stack and its address book take six.
const MAX_REGIONS: u64 = 1018;
const WORDS_PER_PAGE: usize = 512;

fn pattern(i: usize) -> u64 {
    mix(i as u64 ^ 0x5eed)
}

/// Word `i` of bulk region `k` at `version`.
fn version_word(k: usize, i: usize, version: u64) -> u64 {
    mix(((k as u64) << 32) ^ (i as u64) ^ (version << 56) ^ 0xde1e7e)
}

fn main(args: &str) -> u64 {
    let regions = Cmdline::parse(args, |_| {}).deleter;
    let (progress, sum, check) = if regions == 0 { one_region() } else { bulk(regions) };
    loop {
        report(NAME, progress, sum, check);
        sleep(50);
    }
}

/// One region, deleted after the checkpoint; its frames and every other free one reused.
fn one_region() -> (u64, u64, Check) {
    let Some(region) = map(PAGES) else { exit(1) };
    // SAFETY: the region is PAGES pages, mapped writable, 8-byte aligned; viewed as words.
    let words = unsafe { core::slice::from_raw_parts_mut(region.as_mut_ptr() as *mut u64, region.len() / 8) };
    for (i, w) in words.iter_mut().enumerate() {
        *w = pattern(i);
    }
    let sum = words.iter().fold(0u64, |s, w| s.wrapping_add(*w));
    match checkpoint() {
        Checkpoint::Saved => {
            // SAFETY: this branch never touches `region` or `words` again (the restored
            // timeline, where the region is mapped again, takes the other branch).
            if unsafe { unmap(region.as_mut_ptr() as u64) }.is_err() {
                exit(2);
            }
            // Take every frame left, the freed ones included (the allocator hands them out
            // once the others are gone), and write over all of it: save areas freed before
            // the next commit would be among them.
            let mut taken = 0u64;
            for pages in [FILL_PAGES, PAGES, 1] {
                while let Some(fill) = map(pages) {
                    for chunk in fill.chunks_exact_mut(4096) {
                        chunk[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                    }
                    taken += pages;
                }
            }
            println!("deleter: region deleted after the checkpoint; {taken} pages allocated and written since");
            (1, sum, Check::Unknown)
        }
        Checkpoint::Restored => {
            let intact = words.iter().enumerate().all(|(i, w)| *w == pattern(i));
            println!("deleter: restored; the deleted region is back {}", if intact { "intact" } else { "DAMAGED" });
            (2, sum, if intact { Check::Passed } else { Check::Failed })
        }
        Checkpoint::Err(_) => exit(3),
    }
}

/// The regions' addresses, kept in a region of their own (user code has no heap).
fn addresses(regions: u64) -> &'static mut [u64] {
    let pages = (regions * 8).div_ceil(4096);
    let Some(book) = map(pages) else { exit(1) };
    // SAFETY: `pages` pages mapped writable, 8-byte aligned; `regions` words fit in them.
    unsafe { core::slice::from_raw_parts_mut(book.as_mut_ptr() as *mut u64, regions as usize) }
}

/// The page at `addr` (a one-page region this workload mapped), as words.
fn page(addr: u64) -> &'static mut [u64] {
    // SAFETY: `addr` is a one-page region mapped writable by this process and not unmapped
    // while the slice is used.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, WORDS_PER_PAGE) }
}

fn write_version(addrs: &[u64], version: u64) {
    for (k, &addr) in addrs.iter().enumerate() {
        for (i, w) in page(addr).iter_mut().enumerate() {
            *w = version_word(k, i, version);
        }
    }
}

/// Maps a one-page region for each entry of `addrs`, and notes its address there.
fn map_all(addrs: &mut [u64]) {
    let n = addrs.len();
    for (k, a) in addrs.iter_mut().enumerate() {
        let Some(p) = map(1) else {
            println!("deleter: map {k} of {n} failed");
            exit(1)
        };
        *a = p.as_mut_ptr() as u64;
    }
}

/// Many regions deleted between two write-outs, as many made again.
fn bulk(regions: u64) -> (u64, u64, Check) {
    let regions = regions.min(MAX_REGIONS);
    let addrs = addresses(regions);
    map_all(addrs);
    write_version(addrs, 1);
    let first = checkpoint();
    if first != Checkpoint::Saved {
        println!("deleter: the first checkpoint gave {:#x}", first.raw());
        exit(3);
    }
    for &a in addrs.iter() {
        // SAFETY: the slices into these pages are gone (`page` borrows for one call).
        if unsafe { unmap(a) }.is_err() {
            println!("deleter: unmap of {a:#x} refused");
            exit(2);
        }
    }
    map_all(addrs);
    write_version(addrs, 2);
    match checkpoint() {
        Checkpoint::Saved => {
            write_version(addrs, 3);
            println!("deleter: {regions} regions deleted and made again between two write-outs");
            (1, regions, Check::Unknown)
        }
        Checkpoint::Restored => {
            let bad = addrs
                .iter()
                .enumerate()
                .filter(|&(k, &a)| page(a).iter().enumerate().any(|(i, w)| *w != version_word(k, i, 2)))
                .count();
            println!("deleter: restored; {bad} of {regions} regions differ from the checkpoint");
            (2, regions, if bad == 0 { Check::Passed } else { Check::Failed })
        }
        Checkpoint::Err(_) => exit(3),
    }
}

user_rt::entry!(main);
