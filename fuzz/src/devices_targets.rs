//! The devices, as a hostile guest drives them: guest RAM filled from the input, then a
//! sequence of register accesses the input chooses. The records the devices read from RAM
//! (machine-control messages, copy batches, barrier lists, virtqueues) are the input's
//! bytes, so every length, address and count in them is the fuzzer's.

use std::sync::{Arc, Mutex};

use devices::{BusDevice, CopyEngine, MachineControl, PersistBarrier, PersistenceDomain};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::alloc_bound;

/// Guest RAM of the device targets.
const RAM: u64 = 1 << 20;
/// Bytes of the input that are register accesses; the rest is RAM's content.
const OPS_BYTES: usize = 96;
/// One access: register, width and flags, value.
const OP_BYTES: usize = 6;

fn ram(content: &[u8]) -> GuestMemoryMmap<()> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("map test RAM");
    let len = content.len().min(RAM as usize);
    mem.write_slice(&content[..len], GuestAddress(0)).expect("fill test RAM");
    mem
}

/// The accesses an input asks for: `(offset, width, value)`, reads where `value`'s low
/// bit says so; offsets within `len` mostly, values inside RAM mostly (they are record
/// addresses), so that the records in RAM are reached.
fn accesses(ops: &[u8], len: u64) -> impl Iterator<Item = (u64, usize, u32, bool)> + '_ {
    ops.chunks_exact(OP_BYTES).map(move |op| {
        let offset = if op[0] & 0x80 == 0 { u64::from(op[0]) % len } else { u64::from(op[0]) };
        let width = [4, 4, 4, 1, 2, 8, 4, 3][usize::from(op[1] & 7)];
        let raw = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        let value = if op[1] & 0x40 == 0 { (raw % RAM as u32) & !7 } else { raw };
        (offset, width, value, op[1] & 0x20 != 0)
    })
}

fn drive<A: Copy + TryFrom<u64>>(device: &mut dyn BusDevice<A>, data: &[u8], len: u64) {
    let ops = &data[..data.len().min(OPS_BYTES)];
    for (offset, width, value, read) in accesses(ops, len) {
        let Ok(offset) = A::try_from(offset) else { continue };
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&value.to_le_bytes());
        if read {
            device.read(offset, &mut bytes[..width]);
        } else {
            device.write(offset, &bytes[..width]);
        }
    }
}

fn content(data: &[u8]) -> &[u8] {
    data.get(OPS_BYTES.min(data.len())..).unwrap_or(&[])
}

/// The machine-control device: messages of every kind, with every length and name.
/// Returns how many messages it accepted (the seeds' check that they reach past the
/// refusals).
pub fn machine_control(data: &[u8]) -> u64 {
    alloc_bound::within(|| {
        let mut device = MachineControl::new(ram(content(data)), 2_000_000);
        let status = device.status();
        drive::<u16>(&mut device, data, u64::from(nvram::control::LEN));
        let accepted = devices::control::lock(&status).accepted;
        accepted
    })
}

/// The copy engine: batches and dirty-log requests (over a dirty log of its own). Returns
/// the batches it copied and the requests it refused.
pub fn copy_engine(data: &[u8]) -> (u64, u64) {
    alloc_bound::within(|| {
        let mem = ram(content(data));
        let domain = Arc::new(Mutex::new(PersistenceDomain::eadr(mem.clone(), false)));
        // KVM's log stands in as every other page written.
        let words = (RAM / 4096).div_ceil(64) as usize;
        let log: devices::dirty::DirtyFetch = Box::new(move || Some(vec![0x5555_5555_5555_5555; words]));
        let tracker = Arc::new(Mutex::new(devices::dirty::DirtyTracker::new(RAM, Some(log))));
        let mut device = CopyEngine::new(mem, domain).with_dirty_log(tracker);
        let stats = device.stats();
        drive::<u16>(&mut device, data, u64::from(nvram::engine::LEN));
        let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
        (stats.batches, stats.rejected)
    })
}

/// The persist barrier: range lists. Returns the barriers it carried out.
pub fn persist_barrier(data: &[u8]) -> u64 {
    alloc_bound::within(|| {
        let mem = ram(content(data));
        let domain = Arc::new(Mutex::new(PersistenceDomain::eadr(mem.clone(), false)));
        let mut device = PersistBarrier::new(mem, domain.clone());
        drive::<u16>(&mut device, data, u64::from(nvram::persist::LEN));
        let barriers = domain.lock().unwrap_or_else(|e| e.into_inner()).stats().barriers;
        barriers
    })
}

/// No interrupt line: the virtio target only counts on the device's answers in RAM.
struct NoInterrupt;

impl devices::virtio::Interrupt for NoInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// virtio-blk over MMIO: the register file (feature negotiation, queue setup, notify)
/// and the queues and requests in RAM, on a small disk file. Returns whether the device
/// came up (its driver status reached DRIVER_OK without a need for reset).
pub fn virtio_blk(data: &[u8]) -> bool {
    use devices::virtio::{BlockBackend, Disk, MmioBlock, MmioVersion};
    // One scratch disk a thread: the disk is locked while open, and the test harness runs
    // callers on several threads of one process at once.
    static THREADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    thread_local! {
        static DIR: std::path::PathBuf = {
            let n = THREADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("fuzz-virtio-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a scratch directory");
            dir
        };
    }
    let path = DIR.with(|dir| dir.join("disk.img"));
    let disk = Disk::open(&path, 64 << 10).expect("a scratch disk");
    alloc_bound::within(|| {
        let version = if data.first().is_some_and(|b| b & 1 == 1) { MmioVersion::Legacy } else { MmioVersion::Modern };
        let backend = BlockBackend::new(disk, "fuzz");
        let mut device = MmioBlock::new(version, ram(content(data)), backend, Box::new(NoInterrupt));
        // The register file is 0x100 bytes of 4-byte registers, then the config space.
        let ops = &data[..data.len().min(OPS_BYTES)];
        for (offset, width, value, read) in accesses(ops, 0x100) {
            let offset = offset * 4 % nvram::mmio::VIRTIO_BLK_LEN;
            let mut bytes = value.to_le_bytes();
            if read {
                BusDevice::<u64>::read(&mut device, offset, &mut bytes[..width.min(4)]);
            } else {
                BusDevice::<u64>::write(&mut device, offset, &bytes[..width.min(4)]);
            }
        }
        device.status() & 0xf == 0xf && !device.needs_reset()
    })
}
