//! COM1: a 16550 UART (vm-superio) whose output goes to the VMM's console.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

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
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SharedConsole>,
    /// Where the accesses to the UART's registers are counted
    /// ([`crate::MachineStatus::uart_accesses`]), when somewhere.
    status: Option<crate::StatusHandle>,
}

impl SerialConsole {
    /// A UART whose transmitted bytes go to `out`.
    pub fn new(interrupt: EventFd, out: SharedConsole) -> Self {
        Self { uart: Serial::new(EventFdTrigger::new(interrupt), out), status: None }
    }

    /// Counts the accesses to its registers in `status`: each is a VM exit, and a kernel
    /// that prints through the machine-control device has no reason to make them.
    pub fn with_status(self, status: crate::StatusHandle) -> Self {
        Self { status: Some(status), ..self }
    }

    fn count(&self) {
        if let Some(status) = &self.status {
            crate::control::lock(status).uart_accesses += 1;
        }
    }
}

/// The console's output, shared by the devices that print to it: the UART, byte by byte,
/// and the machine-control device, a line at a time (`nvram::control`'s console text). One
/// output, so that what both print comes out in the order the guest printed it.
#[derive(Clone)]
pub struct SharedConsole(Arc<Mutex<ConsoleOut>>);

impl SharedConsole {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(ConsoleOut::new(out))))
    }

    fn out(&self) -> std::sync::MutexGuard<'_, ConsoleOut> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Write for SharedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out().flush()
    }
}

/// Where the console's bytes go, until it fails: a reader that went away (`vmm boot |
/// head -1`), a full disk under `--console FILE`. The machine goes on without its console,
/// as a computer whose terminal was unplugged does; the loss is said once in the log.
pub struct ConsoleOut {
    out: Option<Box<dyn Write + Send>>,
}

impl ConsoleOut {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out: Some(out) }
    }

    fn lost(&mut self, e: &std::io::Error) {
        tracing::warn!(
            "the guest's console output is lost ({e}); the machine goes on, its console is dropped from now on"
        );
        self.out = None;
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(out) = &mut self.out {
            // Whole writes, so that a short write is not taken for a loss.
            if let Err(e) = out.write_all(buf) {
                self.lost(&e);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(Err(e)) = self.out.as_mut().map(|out| out.flush()) {
            self.lost(&e);
        }
        Ok(())
    }
}

impl BusDevice<u16> for SerialConsole {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        self.count();
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        self.count();
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // The output cannot fail (a lost console drops its bytes); an error here could
            // only come from raising the interrupt, which the guest then does not get.
            if let Err(e) = self.uart.write(offset, *byte) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::ConsoleOut;

    /// Takes `room` bytes, then fails as a closed pipe does; counts the writes tried.
    struct Closing {
        room: usize,
        kept: Arc<Mutex<Vec<u8>>>,
        tries: Arc<Mutex<usize>>,
    }

    impl Write for Closing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            *self.tries.lock().unwrap() += 1;
            let mut kept = self.kept.lock().unwrap();
            if kept.len() + buf.len() > self.room {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            kept.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_console_whose_reader_left_drops_its_bytes_and_stops_trying() {
        let (kept, tries) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
        let mut out = ConsoleOut::new(Box::new(Closing { room: 4, kept: kept.clone(), tries: tries.clone() }));
        for byte in b"hello, world" {
            assert_eq!(out.write(&[*byte]).unwrap(), 1, "the guest never sees the loss");
        }
        out.flush().unwrap();
        assert_eq!(kept.lock().unwrap().as_slice(), b"hell");
        assert_eq!(*tries.lock().unwrap(), 5, "four bytes, one failure, then no more tries");
    }
}
