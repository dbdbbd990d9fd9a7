//! `counter`: increments a counter in its own memory and reports it.

use super::{map, report, time_ns, Check, REPORT_EVERY_NS};
use crate::uprintln;

const NAME: &[u8; 16] = b"counter\0\0\0\0\0\0\0\0\0";
/// Increments between looks at the clock.
const BATCH: u64 = 100_000;

/// `shutdown_after`: shut the machine down (a system call) after this many reports; 0: never.
pub extern "C" fn main(shutdown_after: u64, _: u64, _: u64, _: u64) -> ! {
    let Some(page) = map(1) else { super::exit(1) };
    let counter = page.as_mut_ptr() as *mut u64;
    let mut last_report = 0;
    let mut reports = 0u64;
    loop {
        for _ in 0..BATCH {
            // SAFETY: `counter` points into the page mapped above; volatile so that every
            // increment is a store to (persistent) memory, as the workload promises.
            unsafe { counter.write_volatile(counter.read_volatile() + 1) };
        }
        let now = time_ns();
        if now - last_report >= REPORT_EVERY_NS {
            last_report = now;
            // SAFETY: as above.
            let value = unsafe { counter.read_volatile() };
            report(NAME, value, value, Check::Unknown);
            if reports.is_multiple_of(20) {
                uprintln!("counter: {value}");
            }
            reports += 1;
            if reports == shutdown_after {
                uprintln!("counter: shutting the machine down at {value}");
                super::shutdown();
                // SAFETY: as above.
                let now = unsafe { counter.read_volatile() };
                uprintln!("counter: resumed after the shutdown at {now}");
            }
        }
    }
}
