//! Stopping the machine through the exit device (`nvram::ports::EXIT`). (The graceful
//! shutdown, which saves the processes first, is `proc::trap::shutdown`.)

use core::sync::atomic::{AtomicU64, Ordering};

use nvram::exit::ExitCode;
use x86_64::instructions::port::Port;

static POWER_OFF_AT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Powers off when the timer reaches `tick`.
pub fn power_off_at(tick: u64) {
    POWER_OFF_AT.store(tick, Ordering::Relaxed);
}

/// Whether the time set by [`power_off_at`] has come.
pub fn power_off_due(tick: u64) -> bool {
    tick >= POWER_OFF_AT.load(Ordering::Relaxed)
}

/// Stops the machine with `code`. If no exit device answers (a machine without one), the
/// CPU halts with interrupts off. From ring-3 kernel work too: the port is written, and
/// the CPU halted, in kernel mode.
pub fn exit(code: ExitCode) -> ! {
    crate::arch::ring3::privileged(|| {
        let mut port = Port::<u32>::new(nvram::ports::EXIT);
        // SAFETY: the exit port has no other user; writing it stops the machine.
        unsafe { port.write(code.raw()) };
        crate::arch::halt_forever()
    });
    // Not reached: the closure does not return.
    crate::arch::halt_forever()
}

/// Reads and writes ports that no device of the machine owns, of every width, and reports
/// what came back: a well-behaved VMM answers all ones and carries on.
pub fn poke_unknown_ports() {
    let mut ones = true;
    for port in [0x80u16, 0x510, 0x2f8, 0xcf8, 0xffff] {
        // SAFETY: these ports have no device on this machine; accessing them has no effect
        // beyond the VMM's log.
        unsafe {
            Port::<u8>::new(port).write(0x5a);
            Port::<u16>::new(port).write(0x5a5a);
            Port::<u32>::new(port).write(0x5a5a_5a5a);
            ones &= Port::<u8>::new(port).read() == 0xff;
            ones &= Port::<u16>::new(port).read() == 0xffff;
            ones &= Port::<u32>::new(port).read() == 0xffff_ffff;
        }
    }
    crate::println!("unknown ports poked: reads {}", if ones { "all ones" } else { "NOT all ones" });
}
