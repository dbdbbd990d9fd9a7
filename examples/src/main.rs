//! tally: counts in a static, checkpoints every N counts (its argument; default 50,000,000),
//! and after a crash goes on from its last checkpoint.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
use user_rt::{checkpoint, println, report, Check, Checkpoint};

/// In the program's data segment: in NVM, and part of every checkpoint.
static COUNT: AtomicU64 = AtomicU64::new(0);

fn main(args: &str) -> u64 {
    let every = args.trim().parse().ok().filter(|&n| n > 0).unwrap_or(50_000_000);
    loop {
        let n = COUNT.fetch_add(1, Relaxed) + 1;
        if n.is_multiple_of(every) {
            match checkpoint() {
                Checkpoint::Saved => println!("tally: {n} saved"),
                Checkpoint::Restored => println!("tally: restored at {n}"),
                Checkpoint::Err(e) => println!("tally: no checkpoint at {n}: {e}"),
            }
            report("tally", n, n, Check::Unknown);
        }
    }
}

user_rt::entry!(main);
