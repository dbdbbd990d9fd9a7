//! Stopping the machine through the exit device (`nvram::ports::EXIT`).

use nvram::exit::ExitCode;
use x86_64::instructions::port::Port;

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
