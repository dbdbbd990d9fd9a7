//! Making stores durable: cache-line write-back to the persistence domain, then a fence.
//!
//! The instruction is chosen by CPUID, best first: `clwb` (writes back, keeps the line),
//! `clflushopt` (writes back and evicts, weakly ordered), `clflush` (strongly ordered).
//! The command line can force a choice (`flush=clflushopt`): under PVM the guest sees the
//! host's own CPUID, which offers `clwb`, but PVM's instruction emulator cannot run it, so
//! the VMM passes `flush=clflushopt` there.

use core::sync::atomic::{AtomicU8, Ordering};

const LINE: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FlushInsn {
    Clflush = 0,
    Clflushopt = 1,
    Clwb = 2,
}

impl FlushInsn {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "clflush" => Some(Self::Clflush),
            "clflushopt" => Some(Self::Clflushopt),
            "clwb" => Some(Self::Clwb),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Clflush => "clflush",
            Self::Clflushopt => "clflushopt",
            Self::Clwb => "clwb",
        }
    }
}

static FLUSH: AtomicU8 = AtomicU8::new(FlushInsn::Clflush as u8);

/// Picks the flush instruction: `forced` if given, else the best CPUID offers.
pub fn init(forced: Option<FlushInsn>) -> FlushInsn {
    let insn = forced.unwrap_or_else(best_by_cpuid);
    FLUSH.store(insn as u8, Ordering::Relaxed);
    insn
}

fn best_by_cpuid() -> FlushInsn {
    let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
    if leaf7.ebx & (1 << 24) != 0 {
        FlushInsn::Clwb
    } else if leaf7.ebx & (1 << 23) != 0 {
        FlushInsn::Clflushopt
    } else {
        FlushInsn::Clflush
    }
}

/// Writes back every cache line of `addr..addr + len` and waits until they are durable.
pub fn persist(addr: u64, len: u64) {
    flush(addr, len);
    fence();
}

/// Writes back every cache line of `addr..addr + len`, without waiting (see [`fence`]).
pub fn flush(addr: u64, len: u64) {
    if len == 0 {
        return;
    }
    let insn = FLUSH.load(Ordering::Relaxed);
    let mut line = addr & !(LINE - 1);
    while line < addr + len {
        // SAFETY: flushing a line of mapped memory has no effect on its contents.
        unsafe {
            match insn {
                2 => core::arch::asm!("clwb [{}]", in(reg) line, options(nostack, preserves_flags)),
                1 => core::arch::asm!("clflushopt [{}]", in(reg) line, options(nostack, preserves_flags)),
                _ => core::arch::asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags)),
            }
        }
        line += LINE;
    }
}

/// Orders all earlier flushes and stores before any later store.
pub fn fence() {
    // SAFETY: a fence only orders memory operations.
    unsafe { core::arch::asm!("sfence", options(nostack, preserves_flags)) };
}
