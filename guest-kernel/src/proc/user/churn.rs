//! `churn`: a hostile stream of maps, unmaps and rewrites of regions of random sizes
//! (`kernel_core::churn`), run up to and past the capacity of every table the kernel has
//! (user spaces, plates, pending deletions, frames). A refused map (or unmap) is a clean
//! error to the process: it counts it and goes on. Every region's pages hold a pattern of its id and
//! version; the whole set is checked against the ledger (in its own region, restored with
//! the data) at every report, so after every restore too.
//!
//! Reports: progress = operations done, checksum = the ledger's checksum of the stream,
//! and the check's result.

use kernel_core::churn::{self, Ledger, Op, Slot};

use super::{map, report, time_ns, unmap, Check, REPORT_EVERY_NS};
use crate::uprintln;

const NAME: &[u8; 16] = b"churn\0\0\0\0\0\0\0\0\0\0\0";
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

/// `seed`: the stream's seed; `ops`: its length (then only rewrites); `max_pages`: most
/// pages of one region.
pub extern "C" fn main(seed: u64, ops: u64, max_pages: u64, _: u64) -> ! {
    let Some(region) = map(LEDGER_PAGES) else { super::exit(1) };
    let Ok(mut ledger) = Ledger::format(region, seed, max_pages) else { super::exit(2) };
    uprintln!("churn: seed {seed}, {ops} operations, regions of 1 to {max_pages} pages");
    let mut last_report = 0;
    let mut reports = 0u64;
    let mut first_refusal = true;
    loop {
        for _ in 0..BATCH {
            match ledger.next_op(ledger.ops_done() < ops) {
                Op::Map { pages } => match map(pages) {
                    Some(r) => match ledger.mapped(r.as_ptr() as u64, pages) {
                        Some(slot) => churn::fill(&ledger.slot(slot), words(&ledger.slot(slot))),
                        None => super::exit(3),
                    },
                    None => {
                        if first_refusal {
                            uprintln!("churn: a map of {pages} pages refused with {} regions live", ledger.live());
                            first_refusal = false;
                        }
                        ledger.refused_map();
                    }
                },
                Op::Unmap { slot } => {
                    let addr = ledger.slot(slot).addr;
                    // SAFETY: once unmapped, the ledger forgets the region at once; nothing else
                    // refers to it.
                    if unsafe { unmap(addr) } == 0 {
                        ledger.unmapped(slot);
                    } else {
                        // A clean refusal (a table full): the region stays, and stays checked.
                        if ledger.unmaps_refused() == 0 {
                            uprintln!("churn: an unmap refused with {} regions live", ledger.live());
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
                    uprintln!("churn: verification FAILED: region {} page {} word {}", m.id, m.page, m.word);
                    Check::Failed
                }
            };
            report(NAME, ledger.ops_done(), ledger.checksum(), check);
            if reports.is_multiple_of(20) {
                uprintln!(
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
