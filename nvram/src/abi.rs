//! The user-program ABI: what a program and the kernel agree on, defined once for both.
//!
//! A program is a static ELF64 x86-64 executable (`ET_EXEC`) linked inside
//! [`PROGRAM_BASE`]`..`[`PROGRAM_END`]. The kernel loads each `PT_LOAD` segment into a user
//! space of the program's own (in NVM, plated like every other user space, so the code
//! and data outlive crashes), maps a stack of [`STACK_PAGES`] pages and enters the ELF's
//! entry point at CPL 3 with:
//!
//! - `rdi`: the address of the program's argument string (UTF-8, not NUL-terminated), a
//!   copy at the top of its stack;
//! - `rsi`: its length in bytes (at most [`MAX_ARGS_LEN`]);
//! - `rsp`: 16-byte aligned minus 8, as after a `call`; every other register zero.
//!
//! System calls are entered with `int3` (number in `rax`, arguments in `rdi`, `rsi`, `rdx`,
//! `r10`), left with `iretq`; the result is in `rax`, an error is one of [`err`]. Every
//! other register is preserved. `docs/abi.md` describes each call.
//!
//! Addresses the kernel hands out with `map` lie in [`USER_BASE`]`..`[`PROGRAM_BASE`], so
//! they never meet a program's segments.

/// First virtual address of the user spaces `map` gives (PML4 entry 1; entry 0 is the
/// kernel's identity map, shared by every space).
pub const USER_BASE: u64 = 0x0080_0000_0000;
/// Where a program's segments may start: the top of what `map` may hand out.
pub const PROGRAM_BASE: u64 = 0x4000_0000_0000;
/// Where a program's segments must end.
pub const PROGRAM_END: u64 = PROGRAM_BASE + (1 << 30);
/// End of the user half.
pub const USER_END: u64 = 0x8000_0000_0000;

/// Pages of a program's stack.
pub const STACK_PAGES: u64 = 8;
/// Longest argument string a program is given.
pub const MAX_ARGS_LEN: usize = 1024;
/// Most bytes a program's segments may occupy in memory, together (16 MiB).
pub const MAX_IMAGE_BYTES: u64 = 16 << 20;
/// Most `PT_LOAD` segments a program may have.
pub const MAX_SEGMENTS: usize = 16;

/// The version of what the kernel keeps in NVM about processes and their spaces (the
/// layout of the process table, of the saved registers, of the user spaces and of the
/// program's view of them). An image records it; a kernel of another version refuses the
/// image. Unlike a build hash, an unrelated change to the kernel leaves it as it is.
pub const NVM_ABI_VERSION: u32 = 1;

/// System-call numbers.
pub mod nr {
    /// `write(ptr, len)`: writes UTF-8 bytes to the console; the bytes written.
    pub const WRITE: u64 = 0;
    /// `yield()`: gives the CPU to the next process; 0.
    pub const YIELD: u64 = 1;
    /// `sleep(ms)`: sleeps that many milliseconds; 0.
    pub const SLEEP: u64 = 2;
    /// `time()`: nanoseconds since boot.
    pub const TIME: u64 = 3;
    /// `map(pages)`: a new user space of zeroed, writable pages; its address.
    pub const MAP: u64 = 4;
    /// `unmap(addr)`: deletes the user space mapped at `addr`; 0.
    pub const UNMAP: u64 = 5;
    /// `exit(code)`: ends the process; does not return.
    pub const EXIT: u64 = 6;
    /// `checkpoint()`: a write-out; [`SAVED`](super::SAVED) now, and
    /// [`RESTORED`](super::RESTORED) when the process resumes from it after a crash.
    pub const CHECKPOINT: u64 = 7;
    /// `report(name, progress, checksum, check)`: a heartbeat to the VMM; 0.
    pub const REPORT: u64 = 8;
    /// `shutdown()`: a graceful shutdown; returns 0 when the machine is booted again.
    pub const SHUTDOWN: u64 = 9;
}

/// Error results (as `u64`, the two's complement of small numbers, as Linux's `-errno`).
pub mod err {
    /// An argument names memory the process may not read.
    pub const BAD_ADDRESS: u64 = -14i64 as u64;
    /// A table or the frames ran out.
    pub const NO_MEMORY: u64 = -12i64 as u64;
    /// An argument is out of range.
    pub const INVALID: u64 = -22i64 as u64;
    /// A device failed: with `plate_store=disk`, a disk request of the write-out.
    pub const IO: u64 = -5i64 as u64;
    /// The call is not available in this boot (for example `checkpoint` with `plate=off`).
    pub const UNSUPPORTED: u64 = -38i64 as u64;
    /// No system call has this number.
    pub const NO_SUCH_CALL: u64 = -38i64 as u64 - 1;

    /// Whether a result is one of the errors (no success result is that large).
    pub const fn is_error(result: u64) -> bool {
        result > -4096i64 as u64
    }
}

/// `checkpoint`'s result in the process that asked for it, once the write-out is committed.
pub const SAVED: u64 = 0;
/// `checkpoint`'s result when the process resumes from that write-out after a crash (as
/// `fork` tells the parent from the child).
pub const RESTORED: u64 = 1;

/// The verdict of a program's self-check in a `report` (the VMM shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Check {
    Unknown = 0,
    Passed = 1,
    Failed = 2,
}

/// Bytes of a `report`'s name (NUL-padded).
pub const NAME_LEN: usize = crate::control::NAME_LEN;

const _: () = assert!(USER_BASE < PROGRAM_BASE && PROGRAM_BASE < PROGRAM_END && PROGRAM_END <= USER_END);
const _: () = assert!(PROGRAM_BASE.is_multiple_of(1 << 39), "programs start in a PML4 entry of their own");
