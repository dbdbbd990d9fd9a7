//! `kv`: a key-value store (hash table in its own region) driven by a seeded, deterministic
//! stream of puts and deletes; it reports its operation count and running checksum, and
//! every few reports verifies the whole table.
//!
//! Its argument string is the kernel command line: `kv_seed=N` (default 1), `kv_pages=N`
//! (the table's region, default 64) and `kv_verify_every=N` (verify at every N reports; 0,
//! the default: every 5).
#![no_std]
#![no_main]

use kernel_core::kv::Kv;
use nvram::cmdline::Cmdline;
use user_rt::{exit, map, println, report, time_ns, Check};

const NAME: &str = "kv";
/// Operations between looks at the clock.
const BATCH: u64 = 2_000;
/// Verify the table at every this many reports.
const VERIFY_EVERY: u64 = 5;
/// Nanoseconds between heartbeats.
const REPORT_EVERY_NS: u64 = 100_000_000;

fn main(args: &str) -> u64 {
    let cmdline = Cmdline::parse(args, |_| {});
    let (seed, pages) = (cmdline.kv_seed, cmdline.kv_pages);
    let verify_every = if cmdline.kv_verify_every == 0 { VERIFY_EVERY } else { cmdline.kv_verify_every };
    let Some(region) = map(pages) else { exit(1) };
    let Ok(mut kv) = Kv::format(region, seed) else { exit(2) };
    println!("kv: {} slots, seed {seed}", kv.capacity());
    let mut last_report = 0;
    let mut reports = 0u64;
    // The last verification's outcome, for the console (where QEMU, which has no
    // machine-control device, shows it).
    let mut verified = "not verified yet";
    loop {
        kv.step(BATCH);
        let now = time_ns();
        if now - last_report >= REPORT_EVERY_NS {
            last_report = now;
            let check = if reports.is_multiple_of(verify_every) {
                match kv.verify() {
                    Ok(()) => {
                        verified = "table verified";
                        Check::Passed
                    }
                    Err(_) => {
                        verified = "table verification FAILED";
                        println!("kv: {verified} after {} operations", kv.ops_done());
                        Check::Failed
                    }
                }
            } else {
                Check::Unknown
            };
            report(NAME, kv.ops_done(), kv.checksum(), check);
            if reports.is_multiple_of(20) {
                println!(
                    "kv: {} operations, {} live keys, checksum {:#018x}, {verified}",
                    kv.ops_done(),
                    kv.live(),
                    kv.checksum()
                );
            }
            reports += 1;
        }
    }
}

user_rt::entry!(main);
