//! The exit device: the guest writes an [`ExitCode`] to stop the machine.

use std::sync::{Arc, Mutex};

use nvram::exit::ExitCode;
use tracing::warn;

use crate::BusDevice;

/// What the guest asked for when it wrote to the exit port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// A known exit code.
    Code(ExitCode),
    /// A value no kernel of ours writes (a foreign kernel using the port its own way).
    Unknown(u32),
}

/// Records the first exit request; the vCPU loop polls [`ExitDevice::handle`] after each
/// write to the exit port and stops the machine once it is set.
#[derive(Debug, Clone, Default)]
pub struct ExitDevice {
    requested: Arc<Mutex<Option<GuestExit>>>,
}

impl ExitDevice {
    /// A device with no exit requested yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A shared view of the request, for the vCPU loop.
    pub fn handle(&self) -> Arc<Mutex<Option<GuestExit>>> {
        self.requested.clone()
    }
}

impl BusDevice<u16> for ExitDevice {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            warn!(offset, len = data.len(), "malformed write to the exit device, ignored");
            return;
        }
        let mut raw = [0u8; 4];
        raw[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(raw);
        let exit = ExitCode::from_raw(value).map_or(GuestExit::Unknown(value), GuestExit::Code);
        let mut requested = self.requested.lock().unwrap_or_else(|e| e.into_inner());
        requested.get_or_insert(exit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_first_exit_and_ignores_malformed_writes() {
        let mut dev = ExitDevice::new();
        let handle = dev.handle();
        dev.write(1, &[0]);
        dev.write(0, &[0; 8]);
        assert_eq!(*handle.lock().unwrap(), None);
        dev.write(0, &[2, 0, 0, 0]);
        dev.write(0, &[0]);
        assert_eq!(*handle.lock().unwrap(), Some(GuestExit::Code(ExitCode::Exception)));

        let mut foreign = ExitDevice::new();
        foreign.write(0, &[0x42]);
        assert_eq!(*foreign.handle().lock().unwrap(), Some(GuestExit::Unknown(0x42)));
    }
}
