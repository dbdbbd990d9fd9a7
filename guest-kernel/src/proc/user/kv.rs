//! `kv`: a key-value store (hash table in its own region) driven by a seeded, deterministic
//! stream of puts and deletes; it reports its operation count and running checksum, and
//! every few reports verifies the whole table.

use kernel_core::kv::Kv;

use super::{map, report, time_ns, Check, REPORT_EVERY_NS};
use crate::uprintln;

const NAME: &[u8; 16] = b"kv\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
/// Operations between looks at the clock.
const BATCH: u64 = 2_000;
/// Verify the table at every this many reports.
const VERIFY_EVERY: u64 = 5;

/// `verify_every`: verify the table at every this many reports (0: the default).
pub extern "C" fn main(seed: u64, pages: u64, verify_every: u64, _: u64) -> ! {
    let verify_every = if verify_every == 0 { VERIFY_EVERY } else { verify_every };
    let Some(region) = map(pages) else { super::exit(1) };
    let Ok(mut kv) = Kv::format(region, seed) else { super::exit(2) };
    uprintln!("kv: {} slots, seed {seed}", kv.capacity());
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
                        uprintln!("kv: {verified} after {} operations", kv.ops_done());
                        Check::Failed
                    }
                }
            } else {
                Check::Unknown
            };
            report(NAME, kv.ops_done(), kv.checksum(), check);
            if reports.is_multiple_of(20) {
                uprintln!(
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
