//! `fault`: runs briefly, then writes to kernel memory, which must get it killed while the
//! other processes go on.
//!
//! Its argument string is the kernel command line: `fault_ms=N`, how long it runs first
//! (default 300).
#![no_std]
#![no_main]

use nvram::cmdline::Cmdline;
use user_rt::{exit, println, report, sleep, Check};

const NAME: &str = "fault";

fn main(args: &str) -> u64 {
    let after_ms = Cmdline::parse(args, |_| {}).fault_ms;
    report(NAME, 1, 0, Check::Unknown);
    sleep(after_ms);
    println!("fault: writing to kernel memory");
    // SAFETY: deliberately invalid: the page holding the root header is kernel-only, so
    // this store faults and the kernel kills the process.
    unsafe { (nvram::layout::ROOT_HEADER as *mut u64).write_volatile(0xdead) };
    println!("fault: the write went through!");
    exit(1)
}

user_rt::entry!(main);
