//! `counter`: increments a counter in its own memory and reports it.
//!
//! Its argument string is the kernel command line: `counter_shutdown=N` shuts the machine
//! down (a system call) after N reports (0, the default: never).
#![no_std]
#![no_main]

use nvram::cmdline::Cmdline;
use user_rt::{exit, map, println, report, shutdown, time_ns, Check};

const NAME: &str = "counter";
/// Increments between looks at the clock.
const BATCH: u64 = 100_000;
/// Nanoseconds between heartbeats.
const REPORT_EVERY_NS: u64 = 100_000_000;

fn main(args: &str) -> u64 {
    let shutdown_after = Cmdline::parse(args, |_| {}).counter_shutdown;
    let Some(page) = map(1) else { exit(1) };
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
                println!("counter: {value}");
            }
            reports += 1;
            if reports == shutdown_after {
                println!("counter: shutting the machine down at {value}");
                shutdown();
                // SAFETY: as above.
                let now = unsafe { counter.read_volatile() };
                println!("counter: resumed after the shutdown at {now}");
            }
        }
    }
}

user_rt::entry!(main);
