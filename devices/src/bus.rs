//! A port-I/O bus: routes each guest `in`/`out` to the device that owns the port.

use tracing::warn;

/// A device reached by port I/O. `offset` is relative to the device's first port.
pub trait PioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Slot {
    base: u16,
    len: u16,
    device: Box<dyn PioDevice>,
}

/// Routes port accesses; accesses to ports nobody owns read as all ones and are logged
/// (the first few of them, so that a guest polling a missing device cannot flood the log).
#[derive(Default)]
pub struct PioBus {
    slots: Vec<Slot>,
    unknown_accesses: u64,
}

/// How many accesses to unknown ports are logged before the bus goes quiet.
const UNKNOWN_LOG_LIMIT: u64 = 16;

/// A device was registered over ports another device already owns.
#[derive(Debug, thiserror::Error)]
#[error("ports {base:#x}..{end:#x} overlap a device already on the bus")]
pub struct OverlapError {
    base: u16,
    end: u32,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives ports `base..base + len` to `device`.
    pub fn register(&mut self, base: u16, len: u16, device: Box<dyn PioDevice>) -> Result<(), OverlapError> {
        let end = u32::from(base) + u32::from(len);
        let overlaps = self.slots.iter().any(|s| {
            let s_end = u32::from(s.base) + u32::from(s.len);
            u32::from(base) < s_end && u32::from(s.base) < end
        });
        if overlaps || len == 0 {
            return Err(OverlapError { base, end });
        }
        self.slots.push(Slot { base, len, device });
        Ok(())
    }

    fn find(&mut self, port: u16) -> Option<(&mut Slot, u16)> {
        self.slots.iter_mut().find(|s| port >= s.base && u32::from(port) < u32::from(s.base) + u32::from(s.len)).map(
            |s| {
                let offset = port - s.base;
                (s, offset)
            },
        )
    }

    /// Handles a guest `in`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((slot, offset)) => slot.device.read(offset, data),
            None => {
                data.fill(0xff);
                self.log_unknown("read", port, data.len());
            }
        }
    }

    /// Handles a guest `out`.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        match self.find(port) {
            Some((slot, offset)) => slot.device.write(offset, data),
            None => self.log_unknown("write", port, data.len()),
        }
    }

    fn log_unknown(&mut self, what: &str, port: u16, len: usize) {
        self.unknown_accesses += 1;
        if self.unknown_accesses <= UNKNOWN_LOG_LIMIT {
            warn!(port = format_args!("{port:#x}"), len, "guest {what} of an unknown port, ignored");
            if self.unknown_accesses == UNKNOWN_LOG_LIMIT {
                warn!("further accesses to unknown ports are not logged");
            }
        }
    }

    /// How many accesses went to ports no device owns.
    pub fn unknown_accesses(&self) -> u64 {
        self.unknown_accesses
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<(u16, Vec<u8>)>>>;

    struct Recorder(Log);

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_port_and_rejects_overlaps() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut bus = PioBus::new();
        bus.register(0x10, 4, Box::new(Recorder(log.clone()))).unwrap();
        assert!(bus.register(0x12, 4, Box::new(Recorder(log.clone()))).is_err());
        assert!(bus.register(0x0e, 4, Box::new(Recorder(log.clone()))).is_err());
        bus.register(0x14, 1, Box::new(Recorder(log.clone()))).unwrap();

        bus.write(0x13, &[7]);
        bus.write(0x14, &[8, 9]);
        let mut byte = [0u8; 1];
        bus.read(0x12, &mut byte);
        assert_eq!(byte, [2]);
        assert_eq!(*log.lock().unwrap(), vec![(3, vec![7]), (0, vec![8, 9])]);
    }

    #[test]
    fn unknown_ports_read_as_ones_and_are_counted() {
        let mut bus = PioBus::new();
        let mut data = [0u8; 4];
        bus.read(0xffff, &mut data);
        assert_eq!(data, [0xff; 4]);
        for _ in 0..100 {
            bus.write(0x80, &[1]);
        }
        assert_eq!(bus.unknown_accesses(), 101);
    }
}
