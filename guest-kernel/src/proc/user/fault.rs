//! `fault`: runs briefly, then writes to kernel memory, which must get it killed while the
//! other processes go on.

use super::{report, sleep, Check};
use crate::uprintln;

const NAME: &[u8; 16] = b"fault\0\0\0\0\0\0\0\0\0\0\0";

pub extern "C" fn main(after_ms: u64, _: u64, _: u64, _: u64) -> ! {
    report(NAME, 1, 0, Check::Unknown);
    sleep(after_ms);
    uprintln!("fault: writing to kernel memory");
    // SAFETY: deliberately invalid: the page holding the root header is kernel-only, so
    // this store faults and the kernel kills the process.
    unsafe { (nvram::layout::ROOT_HEADER as *mut u64).write_volatile(0xdead) };
    uprintln!("fault: the write went through!");
    super::exit(1)
}
