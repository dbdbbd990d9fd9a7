//! The machine's buses: each routes a guest access to the device owning its address.
//!
//! One [`Bus`] serves both address spaces: [`PioBus`] (16-bit ports, a guest `in`/`out`)
//! and [`MmioBus`] (guest physical addresses, a load or store that exits to the VMM as a
//! KVM `MmioRead` / `MmioWrite`). Devices implement [`BusDevice`] for the address type of
//! the bus they sit on.

use std::fmt;

use tracing::{warn, Level};

use crate::LogLimit;

/// An address on a bus: a port (`u16`) or a guest physical address (`u64`). The bus does its
/// arithmetic in `u64`; an address that does not fit back into `Self` is past the end of
/// the address space.
pub trait BusAddress: Copy + Ord + Into<u64> + TryFrom<u64> + fmt::LowerHex + Send + 'static {
    /// What addresses of this space are called in the log and in errors.
    const NAME: &'static str;
}

impl BusAddress for u16 {
    const NAME: &'static str = "port";
}

impl BusAddress for u64 {
    const NAME: &'static str = "MMIO address";
}

/// A device on a bus of addresses `A`. `offset` is relative to the device's base address.
pub trait BusDevice<A>: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: A, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: A, data: &[u8]);
}

struct Slot<A> {
    base: A,
    /// The device's last address (inclusive, so that a window ending at the top of the
    /// address space has one).
    last: A,
    device: Box<dyn BusDevice<A>>,
}

impl<A: BusAddress> Slot<A> {
    fn contains(&self, addr: A) -> bool {
        self.base <= addr && addr <= self.last
    }
}

/// The last address of `base..base + len`, or `None` when the range is empty or runs past
/// the end of the address space.
fn last_address<A: BusAddress>(base: A, len: u64) -> Option<A> {
    let last = base.into().checked_add(len.checked_sub(1)?)?;
    A::try_from(last).ok()
}

/// A port-I/O bus.
pub type PioBus = Bus<u16>;
/// An MMIO bus.
pub type MmioBus = Bus<u64>;

/// Routes accesses to devices by address; an access nobody owns (like a missing device on a
/// real bus) reads as all ones and is logged, a few times a second only, so that a guest
/// polling a missing device cannot flood the log.
pub struct Bus<A> {
    slots: Vec<Slot<A>>,
    unknown_accesses: u64,
    unknown_log: LogLimit,
}

impl<A> Default for Bus<A> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            unknown_accesses: 0,
            unknown_log: LogLimit::per_second("guest access to an unknown address", Level::WARN, 16),
        }
    }
}

/// A device was registered over addresses another device owns, or over an empty range or
/// one running past the end of the address space.
#[derive(Debug, thiserror::Error)]
#[error("{space} range {base:#x}+{len:#x} overlaps a device already on the bus, or is empty or wraps")]
pub struct OverlapError {
    space: &'static str,
    base: u64,
    len: u64,
}

impl<A: BusAddress> Bus<A> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives addresses `base..base + len` to `device`.
    pub fn register(&mut self, base: A, len: A, device: Box<dyn BusDevice<A>>) -> Result<(), OverlapError> {
        let err = || OverlapError { space: A::NAME, base: base.into(), len: len.into() };
        let last = last_address(base, len.into()).ok_or_else(err)?;
        if self.slots.iter().any(|s| base <= s.last && s.base <= last) {
            return Err(err());
        }
        self.slots.push(Slot { base, last, device });
        Ok(())
    }

    /// The slot owning the whole access `addr..addr + len`, and the offset in it: an access
    /// straddling a device's end is not given to it (a device must never see an offset
    /// beyond its window), nor is one wrapping around the end of the address space.
    fn find(&mut self, addr: A, len: usize) -> Option<(&mut Slot<A>, A)> {
        let last = last_address(addr, (len as u64).max(1))?;
        let slot = self.slots.iter_mut().find(|s| s.contains(addr) && s.contains(last))?;
        // In range: `slot.base <= addr`, both fit in `A`.
        let offset = A::try_from(addr.into() - slot.base.into()).ok()?;
        Some((slot, offset))
    }

    /// Handles a guest read; returns whether a device took it.
    pub fn read(&mut self, addr: A, data: &mut [u8]) -> bool {
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

    /// Handles a guest write; returns whether a device took it.
    pub fn write(&mut self, addr: A, data: &[u8]) -> bool {
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

    fn log_unknown(&mut self, what: &str, addr: A, len: usize) {
        self.unknown_accesses += 1;
        if self.unknown_log.allow_now() {
            let space = A::NAME;
            warn!(addr = format_args!("{addr:#x}"), len, "guest {what} of an unknown {space}, ignored");
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

    type Log<A> = Arc<Mutex<Vec<(A, Vec<u8>)>>>;

    /// Reads fill the buffer with the offset's low byte; writes are logged.
    struct Recorder<A>(Log<A>);

    impl<A: BusAddress> BusDevice<A> for Recorder<A> {
        fn read(&mut self, offset: A, data: &mut [u8]) {
            data.fill(offset.into() as u8);
        }
        fn write(&mut self, offset: A, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_port_and_rejects_overlaps() {
        let log = Log::<u16>::default();
        let mut bus = PioBus::new();
        bus.register(0x10, 4, Box::new(Recorder(log.clone()))).unwrap();
        assert!(bus.register(0x12, 4, Box::new(Recorder(log.clone()))).is_err());
        assert!(bus.register(0x0e, 4, Box::new(Recorder(log.clone()))).is_err());
        bus.register(0x14, 2, Box::new(Recorder(log.clone()))).unwrap();

        assert!(bus.write(0x13, &[7]));
        assert!(bus.write(0x14, &[8, 9]));
        let mut byte = [0u8; 1];
        assert!(bus.read(0x12, &mut byte));
        assert_eq!(byte, [2]);
        assert!(!bus.write(0x13, &[1, 2]), "an access over a device's end is nobody's, even with a device next to it");
        assert_eq!(*log.lock().unwrap(), vec![(3, vec![7]), (0, vec![8, 9])]);
    }

    #[test]
    fn unknown_ports_read_as_ones_and_are_counted() {
        let mut bus = PioBus::new();
        let mut data = [0u8; 4];
        assert!(!bus.read(0xffff, &mut data));
        assert_eq!(data, [0xff; 4]);
        for _ in 0..100 {
            bus.write(0x80, &[1]);
        }
        assert_eq!(bus.unknown_accesses(), 101);
    }

    #[test]
    fn ports_up_to_the_last_one_can_be_owned_but_not_wrapped() {
        let log = Log::<u16>::default();
        let mut bus = PioBus::new();
        bus.register(0xfff0, 0x10, Box::new(Recorder(log.clone()))).unwrap();
        assert!(bus.register(0xfff8, 0x10, Box::new(Recorder(log.clone()))).is_err(), "runs past port 0xffff");
        assert!(bus.register(0x100, 0, Box::new(Recorder(log.clone()))).is_err(), "empty");
        let mut byte = [0u8; 1];
        assert!(bus.read(0xffff, &mut byte));
        assert_eq!(byte, [0xf]);
        assert!(!bus.write(0xffff, &[0; 2]), "a wrapping access is nobody's");
        assert_eq!(bus.unknown_accesses(), 1);
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let log = Log::<u64>::default();
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
        let log = Log::<u64>::default();
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
        let dev = || Box::new(Recorder(Log::<u64>::default()));
        bus.register(0x1000, 0x100, dev()).unwrap();
        assert!(bus.register(0x10ff, 0x10, dev()).is_err());
        assert!(bus.register(0x0f00, 0x101, dev()).is_err());
        assert!(bus.register(0x3000, 0, dev()).is_err());
        assert!(bus.register(u64::MAX - 4, 0x10, dev()).is_err());
        bus.register(0x1100, 0x100, dev()).unwrap();
    }
}
