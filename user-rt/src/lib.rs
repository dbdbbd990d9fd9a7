//! The runtime of the NVM machine's user programs.
//!
//! A program is a static ELF executable the kernel loads into user spaces of its own, in
//! NVM and plated like every other, so that its code, data and stack outlive a crash
//! (`docs/abi.md` is the contract). This crate gives it what it needs to be one:
//!
//! - the system calls of [`nvram::abi::nr`] as safe functions ([`write`], [`yield_now`],
//!   [`sleep`], [`time_ns`], [`map`], [`unmap`], [`checkpoint`], [`report`], [`shutdown`],
//!   [`exit`]), their errors typed ([`Error`]);
//! - [`print!`] and [`println!`], which format into a buffer on the stack (there is no heap);
//! - [`entry!`], which defines the entry point the kernel jumps to and hands `main` its
//!   argument string;
//! - a panic handler that prints the panic and exits with [`EXIT_PANIC`] (feature
//!   `panic-handler`, on by default);
//! - the linker script (`link.ld`, found by the final link as `user-rt.ld`; a program's
//!   `.cargo/config.toml` names it, see `examples/`).
//!
//! The numbers, arguments and results come from `nvram::abi`, the very definitions the
//! kernel uses.
#![no_std]

mod print;

use core::fmt;

pub use nvram::abi::{self, Check, MAX_ARGS_LEN, NAME_LEN};
use nvram::abi::{err, nr, RESTORED, SAVED};

#[doc(hidden)]
pub use print::{print_args, Console};

/// Bytes of a page, the unit of [`map`].
pub const PAGE_SIZE: usize = 4096;
/// Most bytes the kernel writes to the console in one `write` call; [`write`] splits
/// longer text.
pub const MAX_WRITE: usize = 4096;
/// The exit code of a program that panicked (as Rust's own).
pub const EXIT_PANIC: u64 = 101;
/// The exit code of a program whose argument string is not UTF-8 (the kernel never hands
/// one over; [`entry!`] checks anyway rather than trust it).
pub const EXIT_BAD_ARGS: u64 = 102;

/// A system call's error: one of [`nvram::abi::err`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// An argument names memory the process may not read.
    BadAddress,
    /// A table or the frames ran out.
    NoMemory,
    /// An argument is out of range.
    Invalid,
    /// The call is not available in this boot (`checkpoint` with `plate=off`).
    Unsupported,
    /// The kernel has no system call of this number.
    NoSuchCall,
    /// An error result this runtime does not know (a newer kernel's), as the kernel gave it.
    Other(u64),
}

impl Error {
    /// `result` as a success value, or as the error it is.
    pub fn check(result: u64) -> Result<u64, Error> {
        if !err::is_error(result) {
            return Ok(result);
        }
        Err(match result {
            err::BAD_ADDRESS => Error::BadAddress,
            err::NO_MEMORY => Error::NoMemory,
            err::INVALID => Error::Invalid,
            err::UNSUPPORTED => Error::Unsupported,
            err::NO_SUCH_CALL => Error::NoSuchCall,
            other => Error::Other(other),
        })
    }

    /// The result the kernel gave (a small negative number, as a `u64`).
    pub fn code(self) -> u64 {
        match self {
            Error::BadAddress => err::BAD_ADDRESS,
            Error::NoMemory => err::NO_MEMORY,
            Error::Invalid => err::INVALID,
            Error::Unsupported => err::UNSUPPORTED,
            Error::NoSuchCall => err::NO_SUCH_CALL,
            Error::Other(code) => code,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadAddress => f.write_str("bad address"),
            Error::NoMemory => f.write_str("out of memory or table room"),
            Error::Invalid => f.write_str("invalid argument"),
            Error::Unsupported => f.write_str("not available in this boot"),
            Error::NoSuchCall => f.write_str("no such system call"),
            Error::Other(code) => write!(f, "error {}", *code as i64),
        }
    }
}

/// Makes system call `number` with arguments `a`..`d`; its raw result.
///
/// # Safety
///
/// The call must not invalidate memory the program still uses: an `unmap` of a region a
/// live reference points into, or a pointer argument the kernel writes through, is
/// undefined behaviour. The wrappers of this crate are the safe way in.
#[inline(always)]
pub unsafe fn syscall(number: u64, a: u64, b: u64, c: u64, d: u64) -> u64 {
    let result;
    // SAFETY: `int3` enters the kernel's system-call path (ABI: number in rax, arguments
    // in rdi, rsi, rdx, r10, result in rax), which preserves every other register and
    // switches to the kernel's stack (nothing is pushed on ours); what the call does to the
    // program's memory is the caller's contract.
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

/// Writes `text` to the console (in pieces of at most [`MAX_WRITE`] bytes, cut between
/// characters, since the kernel takes no more at once).
pub fn write(text: &str) -> Result<(), Error> {
    let mut rest = text;
    while !rest.is_empty() {
        let mut n = rest.len().min(MAX_WRITE);
        while !rest.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: the kernel only reads `rest[..n]`, which is ours and valid.
        let written = Error::check(unsafe { syscall(nr::WRITE, rest.as_ptr() as u64, n as u64, 0, 0) })?;
        if written != n as u64 {
            // The kernel writes all it is given or refuses: anything else is not ours to loop on.
            return Err(Error::Other(written));
        }
        rest = &rest[n..];
    }
    Ok(())
}

/// Gives the CPU to the next process.
pub fn yield_now() {
    // SAFETY: `yield` touches no memory of the program.
    unsafe { syscall(nr::YIELD, 0, 0, 0, 0) };
}

/// Sleeps `ms` milliseconds.
pub fn sleep(ms: u64) {
    // SAFETY: `sleep` touches no memory of the program.
    unsafe { syscall(nr::SLEEP, ms, 0, 0, 0) };
}

/// Nanoseconds since this boot of the machine (after a restore the clock starts again: it
/// is not persistent).
pub fn time_ns() -> u64 {
    // SAFETY: `time` touches no memory of the program.
    unsafe { syscall(nr::TIME, 0, 0, 0, 0) }
}

/// Maps a new region of `pages` zeroed, writable pages (a user space of its own, in NVM and
/// plated: it is part of every checkpoint); `None` when the kernel refuses (`pages` is 0
/// or too many, or a table or the frames ran out).
pub fn map(pages: u64) -> Option<&'static mut [u8]> {
    // SAFETY: `map` only creates memory; it touches none the program has.
    let addr = Error::check(unsafe { syscall(nr::MAP, pages, 0, 0, 0) }).ok()?;
    let len = usize::try_from(pages).ok()?.checked_mul(PAGE_SIZE)?;
    if addr == 0 {
        return None;
    }
    // SAFETY: the kernel attached `pages` fresh, zeroed, writable pages at `addr` to this
    // process alone; they stay until `unmap`, whose caller promises not to use them after.
    Some(unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) })
}

/// Deletes the region [`map`] gave at `addr`.
///
/// # Safety
///
/// No reference into the region (the slice [`map`] returned, or anything borrowed from it)
/// may be used afterwards: its pages are gone.
pub unsafe fn unmap(addr: u64) -> Result<(), Error> {
    // SAFETY: the caller gives up every reference into the region.
    Error::check(unsafe { syscall(nr::UNMAP, addr, 0, 0, 0) }).map(|_| ())
}

/// What [`checkpoint`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// The write-out is committed; the program goes on.
    Saved,
    /// The machine crashed after that write-out and was restored from it: the program
    /// resumes here, with the registers, memory and stack it had when it asked.
    Restored,
    /// No write-out was made.
    Err(Error),
}

impl Checkpoint {
    /// The system call's result as the kernel gave it (for messages).
    pub fn raw(self) -> u64 {
        match self {
            Checkpoint::Saved => SAVED,
            Checkpoint::Restored => RESTORED,
            Checkpoint::Err(e) => e.code(),
        }
    }
}

/// Asks for a write-out of the whole machine's state: returns [`Checkpoint::Saved`] once it
/// is committed, and returns a second time, with [`Checkpoint::Restored`], in the machine
/// restored from it after a crash (as `fork` tells the parent from the child).
pub fn checkpoint() -> Checkpoint {
    // SAFETY: a write-out copies the program's memory; it changes none of it.
    match Error::check(unsafe { syscall(nr::CHECKPOINT, 0, 0, 0, 0) }) {
        Ok(SAVED) => Checkpoint::Saved,
        Ok(RESTORED) => Checkpoint::Restored,
        Ok(other) => Checkpoint::Err(Error::Other(other)),
        Err(e) => Checkpoint::Err(e),
    }
}

/// Sends a heartbeat to the VMM (`vmm ctl status` shows the last one of each program):
/// `name` (its first [`NAME_LEN`] bytes, cut between characters), how far the program got,
/// a checksum of its state and the verdict of its self-check.
pub fn report(name: &str, progress: u64, checksum: u64, check: Check) {
    let mut n = name.len().min(NAME_LEN);
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    let mut padded = [0u8; NAME_LEN];
    padded[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: the kernel reads the NAME_LEN bytes of `padded`, on our stack, and nothing else.
    unsafe { syscall(nr::REPORT, padded.as_ptr() as u64, progress, checksum, check as u64) };
}

/// Shuts the machine down gracefully; returns when the machine is booted again (the
/// whole machine resumes where it stopped).
pub fn shutdown() {
    // SAFETY: a shutdown writes the program's state out; it changes none of it.
    unsafe { syscall(nr::SHUTDOWN, 0, 0, 0, 0) };
}

/// Ends the process with `code` (the kernel prints it).
pub fn exit(code: u64) -> ! {
    // SAFETY: `exit` does not return; nothing of the program is used after it.
    unsafe { syscall(nr::EXIT, code, 0, 0, 0) };
    // The kernel never schedules an exited process again.
    loop {
        core::hint::spin_loop();
    }
}

/// The argument string the kernel handed to the entry point (`rdi`, `rsi`), for [`entry!`].
///
/// # Safety
///
/// `ptr..ptr + len` must be readable for the rest of the program's life, as the kernel's
/// copy at the top of the stack is (or `len` 0).
#[doc(hidden)]
pub unsafe fn args_from_entry(ptr: *const u8, len: usize) -> &'static str {
    if ptr.is_null() || len == 0 {
        return "";
    }
    // SAFETY: the caller's contract; at most MAX_ARGS_LEN bytes, as the kernel promises.
    let bytes = unsafe { core::slice::from_raw_parts(ptr, len.min(MAX_ARGS_LEN)) };
    match core::str::from_utf8(bytes) {
        Ok(args) => args,
        Err(e) => {
            println!("user-rt: the argument string is not UTF-8 (from byte {})", e.valid_up_to());
            exit(EXIT_BAD_ARGS)
        }
    }
}

/// Defines the program's entry point, `_start(args, len)` (the ELF's entry; `docs/abi.md`),
/// which calls `main` with the argument string and exits with what it returns:
///
/// ```ignore
/// fn main(args: &str) -> u64 {
///     user_rt::println!("hello, {args}");
///     0
/// }
/// user_rt::entry!(main);
/// ```
///
/// `main` must be a `fn(&str) -> u64`; one that never returns may be `-> !` coerced
/// (`loop {}` as its last expression).
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        extern "C" fn _start(args: *const u8, len: usize) -> ! {
            let main: fn(&'static str) -> u64 = $main;
            // SAFETY: the kernel enters here with rdi and rsi naming the program's argument
            // string, a copy at the top of its stack, which lives as long as the program.
            let args = unsafe { $crate::args_from_entry(args, len) };
            $crate::exit(main(args))
        }
    };
}

#[cfg(all(feature = "panic-handler", not(test)))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("program {info}");
    exit(EXIT_PANIC)
}
