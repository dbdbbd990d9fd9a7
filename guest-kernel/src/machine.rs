//! Stopping the machine through the exit device (`nvram::ports::EXIT`).

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

/// A graceful shutdown: everything needed to resume is already in NVM (the process table
/// holds every process's registers, once the interrupted one's are saved); write back every
/// cache line, then set the shutdown flag to "normal", last, and power off. The next boot
/// resumes exactly here (NVM continuation).
pub fn shutdown(k: &mut crate::kernel::Kernel, frame: &crate::interrupts::TrapFrame) -> ! {
    if let Some(current) = k.current {
        if crate::process::from_user(frame) {
            if let Some(p) = k.procs.get_mut(current) {
                p.regs = *frame;
            }
        }
    }
    crate::persist::write_back_all();
    k.header.shutdown_flag = nvram::header::ShutdownFlag::Normal as u32;
    k.header.seal();
    crate::nvm::store_header(&k.header);
    crate::println!("shut down: the machine's state is kept in NVM");
    exit(ExitCode::PowerOff)
}

/// Stops the machine with `code`. If no exit device answers (a machine without one), the
/// CPU halts with interrupts off.
pub fn exit(code: ExitCode) -> ! {
    let mut port = Port::<u32>::new(nvram::ports::EXIT);
    // SAFETY: the exit port has no other user; writing it stops the machine.
    unsafe { port.write(code.raw()) };
    halt_forever()
}

/// Halts this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
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
