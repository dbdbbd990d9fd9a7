//! COM1: a 16550 UART (vm-superio) whose output goes to the VMM's console.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::PioDevice;

/// Raises the UART's interrupt by writing to an `EventFd` registered with KVM as an irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an event fd (the VMM registers a clone of it as the IRQ line's irqfd).
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The guest's console.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART whose transmitted bytes go to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(EventFdTrigger::new(interrupt), out) }
    }
}

impl PioDevice for SerialConsole {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A failing console (a closed pipe) must not stop the machine; the bytes are lost.
            let _ = self.uart.write(offset, *byte);
        }
    }
}
