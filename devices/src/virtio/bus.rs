//! An MMIO bus: routes each guest load or store that exits to the VMM (a KVM `MmioRead` /
//! `MmioWrite`) to the device owning that guest physical address.

use tracing::warn;

/// A device reached by MMIO. `offset` is relative to the device's base address.
pub trait MmioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Slot {
    base: u64,
    len: u64,
    device: Box<dyn MmioDevice>,
}

impl Slot {
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
}

/// Routes MMIO accesses; an access nobody owns reads as all ones (like a missing device on
/// a real bus) and is logged, the first few times only.
#[derive(Default)]
pub struct MmioBus {
    slots: Vec<Slot>,
    unknown_accesses: u64,
}

/// How many accesses to unknown addresses are logged before the bus goes quiet.
const UNKNOWN_LOG_LIMIT: u64 = 16;

/// A device was registered over addresses another device owns, or over an empty or
/// wrapping range.
#[derive(Debug, thiserror::Error)]
#[error("MMIO range {base:#x}+{len:#x} overlaps a device already on the bus, or is empty or wraps")]
pub struct MmioOverlapError {
    base: u64,
    len: u64,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives addresses `base..base + len` to `device`.
    pub fn register(&mut self, base: u64, len: u64, device: Box<dyn MmioDevice>) -> Result<(), MmioOverlapError> {
        let err = MmioOverlapError { base, len };
        let end = base.checked_add(len).ok_or(MmioOverlapError { base, len })?;
        if len == 0 || self.slots.iter().any(|s| base < s.base + s.len && s.base < end) {
            return Err(err);
        }
        self.slots.push(Slot { base, len, device });
        Ok(())
    }

    /// The slot owning the whole access `addr..addr + len`: an access straddling a device's
    /// end is not given to it (a device must never see an offset beyond its window).
    fn find(&mut self, addr: u64, len: usize) -> Option<(&mut Slot, u64)> {
        let last = addr.checked_add((len as u64).saturating_sub(1))?;
        let slot = self.slots.iter_mut().find(|s| s.contains(addr) && s.contains(last))?;
        let offset = addr - slot.base;
        Some((slot, offset))
    }

    /// Handles a guest MMIO read; returns whether a device took it.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                slot.device.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.log_unknown("read", addr, data.len());
                false
            }
        }
    }

    /// Handles a guest MMIO write; returns whether a device took it.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                slot.device.write(offset, data);
                true
            }
            None => {
                self.log_unknown("write", addr, data.len());
                false
            }
        }
    }

    fn log_unknown(&mut self, what: &str, addr: u64, len: usize) {
        self.unknown_accesses += 1;
        if self.unknown_accesses <= UNKNOWN_LOG_LIMIT {
            warn!(addr = format_args!("{addr:#x}"), len, "guest MMIO {what} of an unknown address, ignored");
            if self.unknown_accesses == UNKNOWN_LOG_LIMIT {
                warn!("further MMIO accesses to unknown addresses are not logged");
            }
        }
    }

    /// How many accesses went to addresses no device owns.
    pub fn unknown_accesses(&self) -> u64 {
        self.unknown_accesses
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    struct Recorder(Log);

    impl MmioDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let log = Log::default();
        let mut bus = MmioBus::new();
        bus.register(0xd000_0000, 0x200, Box::new(Recorder(log.clone()))).unwrap();
        bus.register(0xd000_0200, 0x200, Box::new(Recorder(log.clone()))).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0xd000_0204, &mut data));
        assert_eq!(data, [4; 4]);
        assert!(bus.write(0xd000_0010, &[1, 2]));
        assert_eq!(log.lock().unwrap().as_slice(), &[(0x10, vec![1, 2])]);
    }

    #[test]
    fn unknown_and_straddling_accesses_read_as_ones() {
        let log = Log::default();
        let mut bus = MmioBus::new();
        bus.register(0x1000, 0x100, Box::new(Recorder(log.clone()))).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x10fe, &mut data), "an access over the end is nobody's");
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(u64::MAX, &[0; 8]), "a wrapping access is nobody's");
        assert!(!bus.write(0x2000, &[0]));
        assert_eq!(bus.unknown_accesses(), 3);
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn refuses_overlaps_empty_and_wrapping_ranges() {
        let mut bus = MmioBus::new();
        let dev = || Box::new(Recorder(Log::default()));
        bus.register(0x1000, 0x100, dev()).unwrap();
        assert!(bus.register(0x10ff, 0x10, dev()).is_err());
        assert!(bus.register(0x0f00, 0x101, dev()).is_err());
        assert!(bus.register(0x3000, 0, dev()).is_err());
        assert!(bus.register(u64::MAX - 4, 0x10, dev()).is_err());
        bus.register(0x1100, 0x100, dev()).unwrap();
    }
}
