//! The persist-barrier device (`nvram::persist`): the guest says which lines it wrote back;
//! the persistence domain makes them durable. Lists are checked whole before anything is
//! written back; a bad one is refused with a status and logged, never trusted.

use std::sync::{Arc, Mutex};

use nvram::engine::Completion;
use nvram::persist::{
    BarrierHeader, FlushedRange, BARRIER_MAGIC, COMPLETION_OFFSET, DEVICE_ID, HEADER_SIZE, MAX_RANGES, MODE_ANNOUNCE,
    REG_BARRIER, REG_MODE, STATUS_BAD_LIST, STATUS_BAD_RANGE, STATUS_DONE,
};
use tracing::{warn, Level};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::persistence::PersistenceDomain;
use crate::{BusDevice, LogLimit};

pub struct PersistBarrier {
    mem: GuestMemoryMmap<()>,
    domain: Arc<Mutex<PersistenceDomain>>,
    rejects_log: LogLimit,
}

impl PersistBarrier {
    pub fn new(mem: GuestMemoryMmap<()>, domain: Arc<Mutex<PersistenceDomain>>) -> Self {
        Self { mem, domain, rejects_log: LogLimit::per_second("persist barrier refused list", Level::WARN, 16) }
    }

    fn domain(&self) -> std::sync::MutexGuard<'_, PersistenceDomain> {
        self.domain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the barrier list at `addr`; its status and failing index (`None`: no list).
    fn barrier(&mut self, addr: u64) -> Option<(u32, u32)> {
        let mut head = BarrierHeader::default();
        if !addr.is_multiple_of(8) || self.mem.read_slice(head.as_mut_bytes(), GuestAddress(addr)).is_err() {
            return None;
        }
        if head.magic != BARRIER_MAGIC || head.count > MAX_RANGES {
            return Some((STATUS_BAD_LIST, 0));
        }
        let mut ranges = vec![FlushedRange::default(); head.count as usize];
        if self.mem.read_slice(ranges.as_mut_bytes(), GuestAddress(addr + HEADER_SIZE)).is_err() {
            return Some((STATUS_BAD_LIST, 0));
        }
        let result = self.domain().write_back(&ranges);
        match result {
            Ok(()) => Some((STATUS_DONE, 0)),
            Err(e) => {
                self.reject(&format_args!("persist barrier at {addr:#x} refused: {e}"));
                Some((STATUS_BAD_RANGE, e.index as u32))
            }
        }
    }

    fn reject(&mut self, why: &dyn std::fmt::Display) {
        if self.rejects_log.allow_now() {
            warn!("{why}");
        }
    }
}

impl BusDevice<u16> for PersistBarrier {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data.len()) {
            (REG_BARRIER, 4) => data.copy_from_slice(&DEVICE_ID.to_le_bytes()),
            (REG_MODE, 4) => {
                let mode = if self.domain().wants_barriers() { MODE_ANNOUNCE } else { 0 };
                data.copy_from_slice(&mode.to_le_bytes());
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (offset, &[a, b, c, d]) = (offset, data) else {
            self.reject(&format_args!("persist barrier: write of {} bytes at offset {offset} ignored", data.len()));
            return;
        };
        match offset {
            REG_MODE => self.domain().write_back_all(),
            REG_BARRIER => {
                let addr = u64::from(u32::from_le_bytes([a, b, c, d]));
                match self.barrier(addr) {
                    Some((status, failed)) => {
                        let completion = Completion { status, failed };
                        let at = addr + COMPLETION_OFFSET;
                        if self.mem.write_slice(completion.as_bytes(), GuestAddress(at)).is_ok() {
                            self.domain().stored(at, completion.as_bytes().len() as u64);
                        }
                        if status == STATUS_BAD_LIST {
                            self.reject(&format_args!("persist barrier: bad list at {addr:#x}"));
                        }
                    }
                    None => self.reject(&format_args!("persist barrier: no list at {addr:#x}")),
                }
            }
            _ => self.reject(&format_args!("persist barrier: write at offset {offset} ignored")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> PersistBarrier {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let domain = PersistenceDomain::eadr(mem.clone(), false);
        PersistBarrier::new(mem, Arc::new(Mutex::new(domain)))
    }

    fn put_list(d: &PersistBarrier, at: u64, magic: u32, ranges: &[(u64, u64)]) {
        let head = BarrierHeader { magic, count: ranges.len() as u32, status: 0, failed: 0 };
        d.mem.write_slice(head.as_bytes(), GuestAddress(at)).unwrap();
        let ranges: Vec<FlushedRange> = ranges.iter().map(|&(addr, len)| FlushedRange { addr, len }).collect();
        d.mem.write_slice(ranges.as_bytes(), GuestAddress(at + HEADER_SIZE)).unwrap();
    }

    fn header(d: &PersistBarrier, at: u64) -> BarrierHeader {
        let mut head = BarrierHeader::default();
        d.mem.read_slice(head.as_mut_bytes(), GuestAddress(at)).unwrap();
        head
    }

    fn status(d: &PersistBarrier, at: u64) -> (u32, u32) {
        let head = header(d, at);
        (head.status, head.failed)
    }

    /// Sets the count of the list at `at` (a test's corruption).
    fn set_count(d: &PersistBarrier, at: u64, count: u32) {
        let head = BarrierHeader { count, ..header(d, at) };
        d.mem.write_slice(head.as_bytes(), GuestAddress(at)).unwrap();
    }

    #[test]
    fn lists_are_checked_whole() {
        let mut d = device();
        let mut id = [0u8; 4];
        d.read(REG_BARRIER, &mut id);
        assert_eq!(u32::from_le_bytes(id), DEVICE_ID);
        d.read(REG_MODE, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0, "eADR without sync needs no barriers");

        put_list(&d, 0x1000, BARRIER_MAGIC, &[(0x2000, 64), (0x4000, 4096)]);
        d.write(REG_BARRIER, &0x1000u32.to_le_bytes());
        assert_eq!(status(&d, 0x1000), (STATUS_DONE, 0));
        assert_eq!(d.domain().stats().ranges, 2);

        put_list(&d, 0x1000, BARRIER_MAGIC, &[(0x2000, 64), ((1 << 20) - 32, 64)]);
        d.write(REG_BARRIER, &0x1000u32.to_le_bytes());
        assert_eq!(status(&d, 0x1000), (STATUS_BAD_RANGE, 1));
        put_list(&d, 0x1000, 0xbad, &[]);
        d.write(REG_BARRIER, &0x1000u32.to_le_bytes());
        assert_eq!(status(&d, 0x1000).0, STATUS_BAD_LIST);
        put_list(&d, 0x1000, BARRIER_MAGIC, &[]);
        set_count(&d, 0x1000, MAX_RANGES + 1);
        d.write(REG_BARRIER, &0x1000u32.to_le_bytes());
        assert_eq!(status(&d, 0x1000).0, STATUS_BAD_LIST, "too many ranges");
        put_list(&d, (1 << 20) - 16, BARRIER_MAGIC, &[]);
        set_count(&d, (1 << 20) - 16, 4);
        d.write(REG_BARRIER, &(((1u32 << 20) - 16).to_le_bytes()));
        assert_eq!(status(&d, (1 << 20) - 16).0, STATUS_BAD_LIST, "ranges past the end of RAM");
        d.write(REG_BARRIER, &0x1004u32.to_le_bytes()); // misaligned
        d.write(REG_BARRIER, &u32::MAX.to_le_bytes()); // outside RAM
        d.write(REG_BARRIER, &[1]); // wrong width
        d.write(REG_MODE, &0u32.to_le_bytes()); // write back all
        assert_eq!(d.domain().stats().barriers, 1);
        assert_eq!(d.domain().stats().write_back_alls, 1);
    }
}
