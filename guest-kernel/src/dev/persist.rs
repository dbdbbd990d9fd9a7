//! Making stores durable: cache-line write-back to the persistence domain, then a fence.
//!
//! The instruction is chosen by CPUID, best first: `clwb` (writes back, keeps the line),
//! `clflushopt` (writes back and evicts, weakly ordered), `clflush` (strongly ordered).
//! The command line can force a choice (`flush=clflushopt`): under PVM the guest sees the
//! host's own CPUID, which offers `clwb`, but PVM's instruction emulator cannot run it, so
//! the VMM passes `flush=clflushopt` there.
//!
//! On a machine whose caches are outside the persistence domain (ADR) and which cannot see
//! flush instructions (an emulated one), the persist-barrier device (`nvram::persist`) asks
//! for each barrier to be announced: the flushed ranges are gathered, and the fence hands
//! them to the machine, which makes exactly those lines durable.

use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use nvram::cmdline::Flush;
use nvram::persist::{
    BarrierList, FlushedRange, BARRIER_MAGIC, BASE, DEVICE_ID, MAX_RANGES, MODE_ANNOUNCE, REG_BARRIER, REG_MODE,
    STATUS_DONE, STATUS_PENDING,
};
use raw_cpuid::CpuId;
use spin::Mutex;
use x86_64::instructions::port::Port;

const LINE: u64 = 64;

/// The flush instruction, as a value of [`FLUSH`].
fn code(insn: Flush) -> u8 {
    match insn {
        Flush::Clflush => 0,
        Flush::Clflushopt => 1,
        Flush::Clwb => 2,
    }
}

/// The flush instruction in use ([`code`]).
static FLUSH: AtomicU8 = AtomicU8::new(0);
/// Whether barriers must be announced to it.
static ANNOUNCE: AtomicBool = AtomicBool::new(false);

/// The ranges flushed since the last fence (identity-mapped: its address is physical).
static PENDING: Mutex<BarrierList> = Mutex::new(BarrierList::new());

/// Picks the flush instruction: `forced` if given, else the best CPUID offers; and finds
/// out whether the machine wants barriers announced. Returns the instruction and that.
/// From ring-3 kernel work too (the ports are read in kernel mode).
pub fn init(forced: Option<Flush>) -> (Flush, bool) {
    let insn = forced.unwrap_or_else(best_by_cpuid);
    FLUSH.store(code(insn), Ordering::Relaxed);
    // SAFETY: reading the device's registers has no side effect; without the device the
    // ports read all ones.
    let (id, mode) = crate::arch::ring3::privileged(|| unsafe {
        (Port::<u32>::new(BASE + REG_BARRIER).read(), Port::<u32>::new(BASE + REG_MODE).read())
    });
    let announce = id == DEVICE_ID && mode & MODE_ANNOUNCE != 0;
    ANNOUNCE.store(announce, Ordering::Relaxed);
    (insn, announce)
}

/// The best flush instruction CPUID (leaf 7) offers; `clflush` is in every x86-64 CPU.
fn best_by_cpuid() -> Flush {
    let features = CpuId::new().get_extended_feature_info();
    match features {
        Some(f) if f.has_clwb() => Flush::Clwb,
        Some(f) if f.has_clflushopt() => Flush::Clflushopt,
        _ => Flush::Clflush,
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
    if ANNOUNCE.load(Ordering::Relaxed) {
        record(FlushedRange { addr, len });
    }
}

/// Adds a flushed range to the next barrier (announcing the full list early: a flushed
/// line may become durable any time before the fence).
fn record(range: FlushedRange) {
    let mut pending = PENDING.lock();
    let count = pending.header.count as usize;
    if count > 0 && pending.ranges[count - 1].merge(range) {
        return;
    }
    if count == MAX_RANGES as usize {
        announce(&mut pending);
    }
    let count = pending.header.count as usize;
    pending.ranges[count] = range;
    pending.header.count += 1;
}

/// Hands the pending ranges to the machine, which makes them durable before returning.
fn announce(pending: &mut BarrierList) {
    if pending.header.count == 0 {
        return;
    }
    pending.header.magic = BARRIER_MAGIC;
    pending.header.status = STATUS_PENDING;
    let addr = pending as *const BarrierList as u64;
    // SAFETY: the doorbell takes the physical address of the list, which stays put and
    // locked while the machine reads it (the port write returns once it is done).
    // (From ring-3 kernel work, the port write traps to kernel mode: `ring3::port_write`.)
    unsafe { crate::arch::ring3::port_write(BASE + REG_BARRIER, addr as u32) };
    // SAFETY: the machine wrote the status in place.
    let status = unsafe { core::ptr::read_volatile(&pending.header.status) };
    if status != STATUS_DONE {
        crate::println!("persist barrier refused (status {status}, range {})", pending.header.failed);
    }
    pending.header.count = 0;
}

/// Orders all earlier flushes and stores before any later store: once it returns, every
/// flushed line is durable.
pub fn fence() {
    // SAFETY: a fence only orders memory operations.
    unsafe { core::arch::asm!("sfence", options(nostack, preserves_flags)) };
    if ANNOUNCE.load(Ordering::Relaxed) {
        announce(&mut PENDING.lock());
    }
}

/// Writes back every cache line (`wbinvd`), durably: before a graceful shutdown, so that
/// the next boot finds all of memory as it was.
pub fn write_back_all() {
    // SAFETY: writing back and invalidating the caches has no effect on memory contents.
    unsafe { core::arch::asm!("wbinvd", options(nostack, preserves_flags)) };
    if ANNOUNCE.load(Ordering::Relaxed) {
        let mut pending = PENDING.lock();
        pending.header.count = 0;
        // SAFETY: the write-back-all doorbell only makes memory durable; the value is ignored.
        unsafe { Port::<u32>::new(BASE + REG_MODE).write(0) };
    }
}
