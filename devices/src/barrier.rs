//! The persist-barrier device (`nvram::persist`): the guest says which lines it wrote back;
//! the persistence domain makes them durable. Lists are checked whole before anything is
//! written back; a bad one is refused with a status and logged, never trusted.

use std::sync::{Arc, Mutex};

use nvram::persist::{
    FlushedRange, BARRIER_MAGIC, DEVICE_ID, HEADER_SIZE, MAX_RANGES, MODE_ANNOUNCE, RANGE_SIZE, REG_BARRIER, REG_MODE,
    STATUS_BAD_LIST, STATUS_BAD_RANGE, STATUS_DONE,
};
use tracing::warn;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::persistence::PersistenceDomain;
use crate::PioDevice;

const REJECT_LOG_LIMIT: u64 = 16;

pub struct PersistBarrier {
    mem: GuestMemoryMmap<()>,
    domain: Arc<Mutex<PersistenceDomain>>,
    rejected: u64,
}

impl PersistBarrier {
    pub fn new(mem: GuestMemoryMmap<()>, domain: Arc<Mutex<PersistenceDomain>>) -> Self {
        Self { mem, domain, rejected: 0 }
    }

    fn domain(&self) -> std::sync::MutexGuard<'_, PersistenceDomain> {
        self.domain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the barrier list at `addr`; its status and failing index (`None`: no list).
    fn barrier(&mut self, addr: u64) -> Option<(u32, u32)> {
        let mut head = [0u8; HEADER_SIZE as usize];
        if !addr.is_multiple_of(8) || self.mem.read_slice(&mut head, GuestAddress(addr)).is_err() {
            return None;
        }
        let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let (magic, count) = (word(0), word(4));
        if magic != BARRIER_MAGIC || count > MAX_RANGES {
            return Some((STATUS_BAD_LIST, 0));
        }
        let mut raw = vec![0u8; (u64::from(count) * RANGE_SIZE) as usize];
        if self.mem.read_slice(&mut raw, GuestAddress(addr + HEADER_SIZE)).is_err() {
            return Some((STATUS_BAD_LIST, 0));
        }
        let ranges: Vec<FlushedRange> = raw
            .chunks_exact(RANGE_SIZE as usize)
            .map(|c| FlushedRange {
                addr: u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                len: u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
            })
            .collect();
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
        self.rejected += 1;
        if self.rejected <= REJECT_LOG_LIMIT {
            warn!("{why}");
        }
    }
}

impl PioDevice for PersistBarrier {
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
                        let mut word = [0u8; 8];
                        word[..4].copy_from_slice(&status.to_le_bytes());
                        word[4..].copy_from_slice(&failed.to_le_bytes());
                        if self.mem.write_slice(&word, GuestAddress(addr + 8)).is_ok() {
                            self.domain().stored(addr + 8, 8);
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
        let mut bytes = Vec::new();
        for w in [magic, ranges.len() as u32, 0, 0] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        for &(addr, len) in ranges {
            bytes.extend_from_slice(&addr.to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
        }
        d.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    fn status(d: &PersistBarrier, at: u64) -> (u32, u32) {
        (d.mem.read_obj(GuestAddress(at + 8)).unwrap(), d.mem.read_obj(GuestAddress(at + 12)).unwrap())
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
        d.mem.write_obj(MAX_RANGES + 1, GuestAddress(0x1004)).unwrap();
        d.write(REG_BARRIER, &0x1000u32.to_le_bytes());
        assert_eq!(status(&d, 0x1000).0, STATUS_BAD_LIST, "too many ranges");
        put_list(&d, (1 << 20) - 16, BARRIER_MAGIC, &[]);
        d.mem.write_obj(4u32, GuestAddress((1 << 20) - 12)).unwrap();
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
