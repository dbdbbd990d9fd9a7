//! `churn`: a hostile stream of maps, unmaps and rewrites of regions of random sizes
//! (`kernel_core::churn`), run up to and past the capacity of every table the kernel has
//! (user spaces, plates, pending deletions, frames). A refused map (or unmap) is a clean
//! error to the process: it counts it and goes on. Every region's pages hold a pattern of its id and
//! version; the whole set is checked against the ledger (in its own region, restored with
//! the data) at every report, so after every restore too.
//!
//! Reports: progress = operations done, checksum = the ledger's checksum of the stream,
//! and the check's result.
//!
//! Its argument string is the kernel command line: `churn_seed=N`, `churn_ops=N` and
//! `churn_pages=N` (see `main`).

#![no_std]
#![no_main]

use kernel_core::churn::{self, Ledger, Op, Slot};
use nvram::cmdline::Cmdline;
use user_rt::{exit, map, println, report, time_ns, unmap, Check};

const NAME: &str = "churn";
/// Nanoseconds between heartbeats.
const REPORT_EVERY_NS: u64 = 100_000_000;
/// Pages of the ledger: room for more live regions than the kernel's user-space table
/// holds, so that the kernel, not the ledger, is what refuses.
const LEDGER_PAGES: u64 = 8;
/// Operations between looks at the clock.
const BATCH: u64 = 16;

/// The words of a live region (the ledger's slot says where and how big).
fn words(slot: &Slot) -> &'static mut [u64] {
    // SAFETY: the slot describes a region this process mapped (writable, page-aligned) and
    // has not unmapped: the ledger forgets a region before nothing else refers to it.
    unsafe { core::slice::from_raw_parts_mut(slot.addr as *mut u64, slot.pages as usize * 512) }
}

/// `churn_seed`: the stream's seed; `churn_ops`: its length (then only rewrites);
/// `churn_pages`: most pages of one region.
fn main(args: &str) -> u64 {
    let cmdline = Cmdline::parse(args, |_| {});
    let (seed, ops, max_pages) = (cmdline.churn_seed, cmdline.churn_ops, cmdline.churn_pages);
    let Some(region) = map(LEDGER_PAGES) else { exit(1) };
    let Ok(mut ledger) = Ledger::format(region, seed, max_pages) else { exit(2) };
    println!("churn: seed {seed}, {ops} operations, regions of 1 to {max_pages} pages");
    let mut last_report = 0;
    let mut reports = 0u64;
    let mut first_refusal = true;
    loop {
        for _ in 0..BATCH {
            match ledger.next_op(ledger.ops_done() < ops) {
                Op::Map { pages } => match map(pages) {
                    Some(r) => match ledger.mapped(r.as_ptr() as u64, pages) {
                        Some(slot) => churn::fill(&ledger.slot(slot), words(&ledger.slot(slot))),
                        None => exit(3),
                    },
                    None => {
                        if first_refusal {
                            println!("churn: a map of {pages} pages refused with {} regions live", ledger.live());
                            first_refusal = false;
                        }
                        ledger.refused_map();
                    }
                },
                Op::Unmap { slot } => {
                    let addr = ledger.slot(slot).addr;
                    // SAFETY: once unmapped, the ledger forgets the region at once; nothing else
                    // refers to it.
                    if unsafe { unmap(addr) }.is_ok() {
                        ledger.unmapped(slot);
                    } else {
                        // A clean refusal (a table full): the region stays, and stays checked.
                        if ledger.unmaps_refused() == 0 {
                            println!("churn: an unmap refused with {} regions live", ledger.live());
                        }
                        ledger.refused_unmap();
                    }
                }
                Op::Rewrite { slot } => {
                    let s = ledger.rewrite(slot);
                    churn::fill(&s, words(&s));
                }
            }
        }
        let now = time_ns();
        if now - last_report >= REPORT_EVERY_NS {
            last_report = now;
            let check = match ledger.verify(|s| words(s)) {
                Ok(()) => Check::Passed,
                Err(m) => {
                    println!("churn: verification FAILED: region {} page {} word {}", m.id, m.page, m.word);
                    Check::Failed
                }
            };
            report(NAME, ledger.ops_done(), ledger.checksum(), check);
            if reports.is_multiple_of(20) {
                println!(
                    "churn: {} operations, {} regions live, {} maps ({} refused), {} unmaps ({} refused), {}",
                    ledger.ops_done(),
                    ledger.live(),
                    ledger.maps(),
                    ledger.refused(),
                    ledger.unmaps(),
                    ledger.unmaps_refused(),
                    if matches!(check, Check::Passed) { "all verified" } else { "verification FAILED" }
                );
            }
            reports += 1;
        }
    }
}

user_rt::entry!(main);
