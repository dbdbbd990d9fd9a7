//! The workloads: user programs that run in ring 3, each in its own virtual space.
//!
//! They are linked into the kernel image, and user mode may read and run the kernel's text
//! and read-only data (see `paging`), but nothing else of the kernel's: so their code must
//! keep every piece of state in its stack or in the memory it maps, never in a static. Their
//! data structures come from `kernel-core`, which is tested on the host. The numbers of the
//! system calls are in `crate::proc::syscall`.

pub mod churn;
pub mod counter;
pub mod deleter;
pub mod fault;
pub mod kv;
pub mod memtouch;

use core::fmt::{self, Write};

use crate::proc::syscall::nr;

#[inline(always)]
fn syscall(number: u64, a: u64, b: u64, c: u64, d: u64) -> u64 {
    let result;
    // SAFETY: `int3` enters the kernel's system-call path, which preserves every register
    // but rax (the result) and touches only memory the arguments name, after checking it.
    unsafe {
        core::arch::asm!(
            "int3",
            inlateout("rax") number => result,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            options(nostack)
        );
    }
    result
}

/// Writes `text` to the console.
pub fn write(text: &str) {
    syscall(nr::WRITE, text.as_ptr() as u64, text.len() as u64, 0, 0);
}

/// Sleeps `ms` milliseconds.
pub fn sleep(ms: u64) {
    syscall(nr::SLEEP, ms, 0, 0, 0);
}

/// Gives the CPU to the next process.
#[allow(dead_code, reason = "part of the user runtime; no workload yields yet")]
pub fn yield_now() {
    syscall(nr::YIELD, 0, 0, 0, 0);
}

/// Nanoseconds since boot.
pub fn time_ns() -> u64 {
    syscall(nr::TIME, 0, 0, 0, 0)
}

/// Maps `pages` zeroed pages; returns them as a byte slice.
pub fn map(pages: u64) -> Option<&'static mut [u8]> {
    let addr = syscall(nr::MAP, pages, 0, 0, 0);
    if addr as i64 <= 0 {
        return None;
    }
    // SAFETY: the kernel attached `pages` fresh, zeroed, writable pages at `addr` to this
    // process alone; they stay until unmapped.
    Some(unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, (pages * 4096) as usize) })
}

/// Deletes the user space mapped at `addr`; 0 on success.
///
/// # Safety
///
/// No reference into the mapping (the slice [`map`] returned) may be used afterwards: its
/// pages are gone.
pub unsafe fn unmap(addr: u64) -> u64 {
    syscall(nr::UNMAP, addr, 0, 0, 0)
}

/// Shuts the machine down gracefully; returns (0) when the machine is booted again.
pub fn shutdown() -> u64 {
    syscall(nr::SHUTDOWN, 0, 0, 0, 0)
}

/// Ends the process.
pub fn exit(code: u64) -> ! {
    syscall(nr::EXIT, code, 0, 0, 0);
    unreachable_exit()
}

fn unreachable_exit() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Asks for a write-out of the machine's state: `plate::SAVED` once committed, and
/// `plate::RESTORED` when the process resumes from it after a crash (as `fork` tells parent
/// from child).
pub fn checkpoint() -> u64 {
    syscall(nr::CHECKPOINT, 0, 0, 0, 0)
}

/// The outcome of a workload's self-check, for [`report`].
#[derive(Clone, Copy)]
pub enum Check {
    Unknown = 0,
    Passed = 1,
    Failed = 2,
}

/// Sends a heartbeat to the VMM. `name` must be readable by the process (a constant).
pub fn report(name: &'static [u8; 16], progress: u64, checksum: u64, check: Check) {
    syscall(nr::REPORT, name.as_ptr() as u64, progress, checksum, check as u64);
}

/// A formatter into a buffer on the caller's stack (user code has no heap and no statics).
pub struct Line {
    buf: [u8; 128],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        Self { buf: [0; 128], len: 0 }
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Prints a formatted line to the console from user mode.
#[macro_export]
macro_rules! uprintln {
    ($($arg:tt)*) => {{
        let mut line = $crate::proc::user::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut line, "\n");
        $crate::proc::user::write(line.as_str());
    }};
}

/// Nanoseconds between heartbeats.
pub const REPORT_EVERY_NS: u64 = 100_000_000;
