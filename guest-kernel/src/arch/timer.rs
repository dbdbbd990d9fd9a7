//! Time: the PIT's periodic interrupt (through the PIC) for preemption and sleeping, and the
//! TSC for the current time.
//!
//! The timer rate is modest: under PVM each interrupt runs emulated kernel code. It is
//! [`HZ`] unless the boot asks for a finer one ([`set_hz`]: a write-out every millisecond
//! needs a tick every millisecond); preemption stays at one slice per [`SLICE_MS`].

use core::sync::atomic::{AtomicU64, Ordering};

use raw_cpuid::CpuId;
use x86_64::instructions::port::Port;

/// Timer interrupts per second, by default.
pub const HZ: u64 = 100;
/// The finest rate [`set_hz`] allows.
pub const MAX_HZ: u64 = 1000;
/// Milliseconds a process runs before the next one gets the CPU, whatever the rate.
pub const SLICE_MS: u64 = 10;
const PIT_HZ: u64 = 1_193_182;

/// The rate this boot runs the timer at (set before [`init`]).
static RATE_HZ: AtomicU64 = AtomicU64::new(HZ);

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

fn outb(port: u16, value: u8) {
    // SAFETY: PIC and PIT ports; this module is their only user.
    unsafe { Port::<u8>::new(port).write(value) };
}

/// Sets the timer's rate: `hz` clamped to [`HZ`]..=[`MAX_HZ`]. Before [`init`] and before
/// any conversion to ticks.
pub fn set_hz(hz: u64) {
    RATE_HZ.store(hz.clamp(HZ, MAX_HZ), Ordering::Relaxed);
}

/// The timer's rate.
pub fn hz() -> u64 {
    RATE_HZ.load(Ordering::Relaxed)
}

/// The rate a boot needs for periodic write-outs every `ms`: [`HZ`] when that is a whole
/// number of its ticks, [`MAX_HZ`] otherwise.
pub fn hz_for_interval(ms: Option<u64>) -> u64 {
    match ms {
        Some(ms) if !ms.saturating_mul(HZ).is_multiple_of(1000) => MAX_HZ,
        _ => HZ,
    }
}

/// Ticks of one scheduling slice ([`SLICE_MS`]).
pub fn slice_ticks() -> u64 {
    ms_to_ticks(SLICE_MS).max(1)
}

/// Remaps the PIC to vectors 32..48, unmasks the timer and the machine-control request line
/// (`nvram::control::REQUEST_IRQ`), and starts the PIT at [`hz`].
pub fn init(tsc_khz: u64) {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
    // ICW1..ICW4 for both PICs: edge triggered, cascaded, vectors 0x20 and 0x28, 8086 mode.
    for (port, value) in [
        (0x20, 0x11),
        (0xa0, 0x11),
        (0x21, 0x20),
        (0xa1, 0x28),
        (0x21, 0x04),
        (0xa1, 0x02),
        (0x21, 0x01),
        (0xa1, 0x01),
        (0x21, !(1 | (1 << nvram::control::REQUEST_IRQ))), // IRQ 0 and the request line
        (0xa1, 0xff),
    ] {
        outb(port, value);
    }
    let divisor = (PIT_HZ / hz()) as u16;
    outb(0x43, 0x34); // channel 0, lobyte/hibyte, rate generator
    outb(0x40, divisor as u8);
    outb(0x40, (divisor >> 8) as u8);
    let khz = if tsc_khz != 0 { tsc_khz } else { cpuid_tsc_khz().unwrap_or_else(calibrate_tsc_khz) };
    TSC_KHZ.store(khz, Ordering::Relaxed);
}

/// The TSC frequency as CPUID tells it (leaf 0x15: the crystal's frequency and the TSC's
/// ratio to it), when the CPU enumerates it: exact, and no 10 ms of emulated polling.
fn cpuid_tsc_khz() -> Option<u64> {
    let hz = CpuId::new().get_tsc_info()?.tsc_frequency()?;
    Some(hz / 1000).filter(|&khz| khz != 0)
}

/// Measures the TSC against the PIT's channel 2 when the VMM does not tell the frequency
/// (under QEMU, say): 10 ms of PIT counting.
fn calibrate_tsc_khz() -> u64 {
    let ticks = PIT_HZ / 100;
    // SAFETY: PIT channel 2 and its gate (port 0x61); used by nobody else.
    unsafe {
        let mut gate = Port::<u8>::new(0x61);
        let g = gate.read();
        gate.write((g & !0x02) | 0x01);
        outb(0x43, 0xb0); // channel 2, lobyte/hibyte, one-shot
        outb(0x42, ticks as u8);
        outb(0x42, (ticks >> 8) as u8);
        let start = rdtsc();
        while gate.read() & 0x20 == 0 {}
        (rdtsc() - start) / 10
    }
}

/// Acknowledges interrupt `irq` at the PIC.
pub fn end_of_interrupt(irq: u8) {
    if irq >= 8 {
        outb(0xa0, 0x20);
    }
    outb(0x20, 0x20);
}

pub fn rdtsc() -> u64 {
    // SAFETY: reading the TSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Nanoseconds since boot.
pub fn now_ns() -> u64 {
    let khz = tsc_khz().max(1);
    let elapsed = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    (u128::from(elapsed) * 1_000_000 / u128::from(khz)) as u64
}

/// Timer ticks in `ms` milliseconds, rounded up.
pub fn ms_to_ticks(ms: u64) -> u64 {
    ms.saturating_mul(hz()).div_ceil(1000)
}
